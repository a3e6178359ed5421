"""EXPERIMENT (session 7): the split calls' fp32 epilogue -- staged in shared memory, or stored
straight from the accumulator now that the division is gone?

After the staged epilogue (../epilogue_ab) the timeline (../timeline, runs 2-3) shows 1.9-2.1 us
for the direct (bf16) output but 3.7-4.6 us for the split calls' fp32 partials, which are staged
in two 32-row halves. The session-6 kernel stored straight from the wgmma accumulator layout AND
divided by l per element; this isolates the stores: a copy of the package kernel whose split
branch stores ``o * (1 / l)`` straight from the accumulator (float2 per thread, rows past ROWS
skipped), against the package kernel, alternating per cell in one process, after checking both
against float64 (ragged, several split counts). The variant is written to a temporary module
(TileLang parses the kernel source from its file); the package file is not changed.

Run 1 (``run1.log``, at commit 674cd47): identical max errors against float64 in all four checks;
regstore / staged 1.01-1.02x in the split cells (B=32 x 8k 90.9 -> 89.4 us, 79 -> 81 % of copy;
B=8 x 32k 78 -> 80 %), 1.06-1.09x at B=1 x 8k / 32k and B=8 x 4k, 1.01x at B=32 x 32k. So the
division, not the store pattern, was what cost most in session 6; the package kernel now stores
split partials this way (commit 8787be5) and keeps staging for the direct bf16 output. After
that commit the script's STAGED anchor no longer matches the package file: it ran at 674cd47.
The GPU test suite did not run on 8787be5 (the session's device time ran out): the checks here
ran on the same store code, which is the session-6 store loop with the division replaced by a
per-row reciprocal.

Run (one H200, carry [".tlkit"]): cmd.sh. (Since run 1 the checks and timings live in
``../ab_graphs.py``, shared with epilogue_ab; the same measurements, one print format.)
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(HERE))

from ab_graphs import compare_absorb_modules, load_kernel_module  # noqa: E402
from gqla_megatron.kernels import tilelang_decode as pkg  # noqa: E402

STAGED = """            for i, j in T.Parallel(BM, H2):
                if i < BM // 2:
                    lo[i, j] = o[i, j] * inv[i]
                else:
                    hi[i - BM // 2, j] = o[i, j] * inv[i]
            T.copy(lo, OUT[b, m0:m0 + BM // 2, pid_p, col:col + H2], annotations=NO_TMA)
            T.copy(hi, OUT[b, m0 + BM // 2:m0 + BM, pid_p, col:col + H2], annotations=NO_TMA)
"""
REGSTORE = """            for i, j in T.Parallel(BM, H2):
                if m0 + i < rows:
                    OUT[b, m0 + i, pid_p, col + j] = o[i, j] * inv[i]
"""


def load_variant():
    src = open(os.path.join(ROOT, "gqla_megatron", "kernels", "tilelang_decode.py")).read()
    if src.count(STAGED) != 1:
        raise SystemExit("the package kernel's split epilogue changed: update STAGED")
    return load_kernel_module(src.replace(STAGED, REGSTORE), "tld_regstore")


def main():
    var = load_variant()
    compare_absorb_modules(
        [("staged", pkg), ("regstore", var)],
        checks=((3, 1000, 1, 3), (2, 4100, 1, 5), (5, 700, 2, 2), (1, 3000, 2, 7)),
        cells=((32, 8192, 1), (8, 32768, 1), (32, 8192, 2), (8, 32768, 2), (1, 8192, 1), (1, 32768, 1),
               (8, 4096, 1), (32, 32768, 1)),
        dev=torch.device("cuda"))


if __name__ == "__main__":
    main()
