"""The swapped-operand TileLang absorb kernel (tokens on the wgmma's 64-row side) vs the package's
row kernel (query rows on it, padded to 64), for calls of <= 32 query rows: A/B in one process.
Needs the package of commit 25af277.

Variants (tilelang_decode.SWAP, read per call, so each graph captures its variant):
  rows  build_absorb_program: 64-row score and output tiles, half of them padding at 32 rows
  swap  build_absorb_swap_program: S^T = c . q^T (m64 n32), O^T += c^T . P^T (4 x m64 n32 per
        warpgroup), softmax max reduced across the warpgroup once per tile, l per element and
        reduced once at the end

Method and command line: ``../ab_graphs.absorb_ab`` (run 1 ran the same loop written out here).
"""

import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [".", os.path.dirname(here)]
from ab_graphs import absorb_ab  # noqa: E402
from gqla_megatron.kernels import tilelang_decode as tld  # noqa: E402

CHECKS = [  # (shapes, B, L, s_q, splits or None = the planner's): 32 heads, s_q 1 = 32 rows
    ("llama3-8b", 1, 32768, 1, None), ("llama3-8b", 8, 8192, 1, None), ("llama3-8b", 4, 4096, 1, 7),
    ("llama3-8b", 3, 1000, 1, 1),
]
CELLS = [("llama3-8b", B, L, 1) for B, L in (  # (shapes, B, L, s_q)
    (8, 32768), (32, 8192), (1, 8192), (1, 32768), (8, 4096), (32, 4096), (128, 8192), (32, 32768),
    (1, 1024), (128, 1024), (2, 8192), (4, 4096), (128, 2048))]


if __name__ == "__main__":
    absorb_ab({"rows": (tld, {"SWAP": False}), "swap": (tld, {"SWAP": True})}, CHECKS, CELLS)
