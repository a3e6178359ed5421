# Device command of run 9 (one H200; carry [".tlkit"])
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run9; mkdir -p $W
timeout ${PROF_S:-400} python3 benchmarks/decode_kernels_h200/run9_tilelang_profile/profile.py 2>&1 | grep -v "TileLang:" > $W/profile.log; cat $W/profile.log
