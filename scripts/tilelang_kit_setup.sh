# Sourced on the GPU machine (see scripts/make_tilelang_kit.sh): unpacks .tlkit into /tmp/tlsite
# once per machine and kit (the marker names the tarball's size), puts the checkout and it on
# PYTHONPATH, points TileLang at the machine's nvcc.
_tl_mark="/tmp/tlsite/.ok-$(stat -c %s .tlkit/tilelang-site.tar.xz)" || return 1
if [ ! -f "$_tl_mark" ]; then
  rm -rf /tmp/tlsite && mkdir -p /tmp/tlsite && tar -C /tmp/tlsite -xJf .tlkit/tilelang-site.tar.xz \
    && touch "$_tl_mark" || return 1
fi
export PYTHONPATH="$PWD:/tmp/tlsite${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  export CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
fi
export TILELANG_CACHE_DIR="${TILELANG_CACHE_DIR:-/tmp/tilelang_cache}"
