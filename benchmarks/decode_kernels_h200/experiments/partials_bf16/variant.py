"""The TileLang absorb module with its split partials stored in the input dtype (bf16) instead of
fp32: the package source, patched as text and imported from a temporary file
(``ab_graphs.load_kernel_module``), so the package file stays as it is.

The split epilogue then stores exactly as the direct one does: o * (1 / l) cast to bf16, staged in
shared memory over the latent ring, 16-byte vector stores by the warpgroup's 128 threads (the
partial tile of one program, one split: 64 rows x r, half the fp32 bytes). The log-sum-exp stays
fp32, and the Triton combine kernel loads bf16 partials and accumulates in fp32 (its arithmetic
promotes bf16 x fp32 to fp32).
"""

import inspect

from gqla_megatron.kernels import tilelang_decode as tld

PATCHES = [
    # the partial buffer's dtype in the split kernel's signature
    ("OPART: T.Tensor((B, rows, NSPLIT, r), acc)", "OPART: T.Tensor((B, rows, NSPLIT, r), dtype)"),
    # the split store: staged like the direct output
    ("""            for i, j in T.Parallel(BM, H2):
                if m0 + i < rows:
                    OUT[b, m0 + i, pid_p, col + j] = o[i, j] * inv[i]
""", """            for i, j in T.Parallel(BM, H2):
                stage[i, j] = T.cast(o[i, j] * inv[i], dtype)
            T.copy(stage, OUT[b, m0:m0 + BM, pid_p, col:col + H2], annotations=NO_TMA)
"""),
    # the wrapper allocates the partials in the input dtype
    ("opart = torch.empty(B, rows, nsplit, R, dtype=torch.float32, device=q_abs.device)",
     "opart = torch.empty(B, rows, nsplit, R, dtype=q_abs.dtype, device=q_abs.device)"),
]


def source() -> str:
    src = inspect.getsource(tld)
    for old, new in PATCHES:
        if src.count(old) != 1:
            raise RuntimeError(f"patch target not found exactly once in tilelang_decode.py: {old[:60]!r}")
        src = src.replace(old, new)
    return src


def load():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ab_graphs import load_kernel_module

    return load_kernel_module(source(), "tld_bf16_partials")
