"""The seesaw schedule of the TileLang absorb kernel (both consumer warpgroups compute the scores
and softmax of alternate tiles and half of every tile's output) vs the package's schedule (one
warpgroup computes every tile's scores and softmax and the left half of the output, the other the
right half): A/B in one process. Needs the package of commit b36fea9.

Variants (tilelang_decode.SEESAW, read per call, so each graph captures its variant):
  one     build_absorb_program
  seesaw  build_absorb_seesaw_program
  (checks: 32 and 128 heads, split and direct)

Method and command line: ``../ab_graphs.absorb_ab`` (run 1 ran the same loop written out here).
"""

import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [".", os.path.dirname(here)]
from ab_graphs import absorb_ab  # noqa: E402
from gqla_megatron.kernels import tilelang_decode as tld  # noqa: E402

CHECKS = [  # (shapes, B, L, s_q, splits or None = the planner's)
    ("llama3-8b", 1, 32768, 1, None), ("llama3-8b", 8, 8192, 2, None), ("llama3-8b", 4, 4096, 1, 7),
    ("llama3-8b", 3, 1000, 1, 1), ("h128", 2, 8192, 1, None), ("h128", 3, 1000, 2, 1),
]
CELLS = [  # (shapes, B, L, s_q)
    ("llama3-8b", 8, 32768, 1), ("llama3-8b", 32, 8192, 1), ("llama3-8b", 8, 32768, 2),
    ("llama3-8b", 32, 8192, 2), ("llama3-8b", 1, 8192, 1), ("llama3-8b", 1, 32768, 1),
    ("llama3-8b", 128, 8192, 1), ("llama3-8b", 128, 8192, 2), ("llama3-8b", 8, 4096, 1),
    ("h128", 32, 32768, 1), ("h128", 128, 4096, 1), ("h128", 8, 32768, 1), ("h128", 32, 4096, 2),
    ("h128", 128, 4096, 2), ("h128", 8, 4096, 2), ("h128", 1, 32768, 1),
]


if __name__ == "__main__":
    absorb_ab({"one": (tld, {"SEESAW": False}), "seesaw": (tld, {"SEESAW": True})}, CHECKS, CELLS, flop=True)
