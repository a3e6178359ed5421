"""EXPERIMENT (session 7): the absorb kernel's output stores, before and after, in one process.

The timeline experiment (../timeline, run 1) showed each program spending 6.4-11 us between its
last P.V product and its last output store: every thread stored 128 scattered 8-byte pieces
straight from the wgmma accumulator layout, each after an IEEE division by l. The package
kernel now multiplies by 1 / l (once per row) into shared memory over the latent ring (free
after the KV loop) and copies each warpgroup's half out with 16-byte vector stores.

This times the package kernel against the previous one (commit 8ad831b's
``gqla_megatron/kernels/tilelang_decode.py``, written to ``old_kernel.py`` here by cmd.sh's
local step: ``git show 8ad831b:gqla_megatron/kernels/tilelang_decode.py``), alternating the two
per cell, CUDA-graph replays with the write flush as the grid, and checks both against float64
on the same inputs.

Run 1 (``run1.log``; ``tests.log``: the GPU tests of the TileLang kernel, 31 passed, first): both
kernels give the same max error against float64 in all four checks (ragged, split and direct,
s_q 1 and 2); new / old speed 1.04-1.08x in the 32-tile cells (B=32 x 8k 72 -> 77 % of copy,
B=8 x 32k 71 -> 76 %, s_q 2 73 -> 75 %, B=128 x 2k 76 -> 83 %), 1.12x at B=128 x 1k, 1.21x at
B=1 x 32k, 0.99-1.03x in the cells of 129+ tiles per program (within the run's noise).

Run (one H200, carry [".tlkit"]): cmd.sh. (Since run 1 the checks and timings live in
``../ab_graphs.py``, shared with epilogue_split_ab; the same measurements, one print format.)
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(HERE))

from ab_graphs import compare_absorb_modules, load_kernel_module  # noqa: E402
from gqla_megatron.kernels import tilelang_decode as new  # noqa: E402


def main():
    old = load_kernel_module(open(os.path.join(HERE, "old_kernel.py")).read(), "tld_old")
    compare_absorb_modules(
        [("old", old), ("new", new)],
        checks=((3, 1000, 1, 3), (3, 1000, 2, 1), (2, 4100, 1, 5), (5, 700, 2, 2)),
        cells=((128, 2048, 1), (32, 8192, 1), (8, 32768, 1), (32, 8192, 2), (128, 8192, 1), (128, 8192, 2),
               (32, 32768, 1), (128, 1024, 1), (1, 32768, 1), (128, 32768, 2)),
        dev=torch.device("cuda"))


if __name__ == "__main__":
    main()
