#!/usr/bin/env bash
# Build ./.tlkit: TileLang 0.1.15 and its runtime dependencies for the GPU machine (Python 3.12,
# no registry there), as one xz tarball (~49 MiB: the wheels would be ~83 MiB, over the 64 MiB a
# device call carries). Run on the CPU machine; the device command then starts with
#   source scripts/tilelang_kit_setup.sh && ...
# carrying [".tlkit"] (the .devkit does not fit beside it; the decode kernels need neither
# megatron-core nor Transformer Engine).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
$PIP download -q --no-deps -d "$work/whl" --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    tilelang==0.1.15 "apache-tvm-ffi==0.1.12" "torch-c-dlpack-ext==0.1.5" "cloudpickle==3.1.3" \
    "ml-dtypes==0.6.0" "z3-solver==4.15.4.0"
$PIP install -q --no-deps --no-compile --target "$work/site" --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    "$work"/whl/*.whl
# not needed at run time: TVM's C++ sources (tilelang imports its other backends' python modules)
rm -rf "$work/site/tilelang/3rdparty/tvm/src"
mkdir -p .tlkit
tar -C "$work/site" -cJf .tlkit/tilelang-site.tar.xz.tmp .
mv .tlkit/tilelang-site.tar.xz.tmp .tlkit/tilelang-site.tar.xz
ls -l .tlkit
