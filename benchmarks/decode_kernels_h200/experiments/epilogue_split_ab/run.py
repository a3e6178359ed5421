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

Run (one H200, carry [".tlkit"]): cmd.sh
"""

import importlib.util
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(HERE, "..", "epilogue_ab"))

from gqla_megatron import bench_decode as bd  # noqa: E402
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
    src = src.replace(STAGED, REGSTORE).replace("from . import triton_decode as td",
                                                "from gqla_megatron.kernels import triton_decode as td")
    path = os.path.join(tempfile.mkdtemp(prefix="tld_regstore_"), "tld_regstore.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("tld_regstore", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    from run import reference  # ../epilogue_ab/run.py: float64 absorb attention

    dev = torch.device("cuda")
    var = load_variant()
    rates = bd.measure_rates(dev, copy_mib=1024, gemm_n=8192)
    print(f"copy {rates['copy_tbps']:.2f} TB/s", flush=True)
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    flush = bd.L2Flush(dev, "write")
    for B, L, S, ns in ((3, 1000, 1, 3), (2, 4100, 1, 5), (5, 700, 2, 2), (1, 3000, 2, 7)):
        x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0, seed=1)
        x["lengths"] = torch.randint(0, L - S + 1, (B,), device=dev, dtype=x["lengths"].dtype)
        ref = reference(x, S, shp.heads)
        for name, mod in (("staged", pkg), ("regstore", var)):
            o = torch.full_like(x["q"], float("nan"))
            mod.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"], out=o,
                              num_splits=ns)
            print(f"check {name:8s} B={B} L={L} s_q={S} splits={ns}: max abs err vs float64 "
                  f"{(o.double() - ref).abs().max().item():.2e}", flush=True)
        del x
    for B, L, S in ((32, 8192, 1), (8, 32768, 1), (32, 8192, 2), (8, 32768, 2), (1, 8192, 1), (1, 32768, 1),
                    (8, 4096, 1), (32, 32768, 1)):
        x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0)
        out = torch.empty_like(x["q"])
        nbytes = bd.cache_bytes("absorb", shp, B, L, 2) + bd.qo_bytes("absorb", shp, B, S, 2)
        ideal = nbytes / (rates["copy_tbps"] * 1e12) * 1e6
        fns = {name: (lambda mod=mod: mod.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"],
                                                       x["scale"], out=out, max_len=x["L"], validate=False))
               for name, mod in (("staged", pkg), ("regstore", var))}
        times = {k: [] for k in fns}
        for _ in range(3):
            for name in fns:
                times[name].append(bd.time_graph(fns[name], dev, warmup=3, iters=30, flush=flush) * 1e6)
        t = {k: sorted(v)[1] for k, v in times.items()}
        print(f"B={B:3d} L={L:5d} s_q={S} splits={pkg.plan_splits(B, S * shp.heads, L, dev):3d}: staged "
              f"{t['staged']:7.1f} us ({ideal / t['staged']:4.0%})  regstore {t['regstore']:7.1f} us "
              f"({ideal / t['regstore']:4.0%})  regstore/staged speed {t['staged'] / t['regstore']:.3f}x  "
              f"[{' '.join(f'{v:.1f}' for v in times['staged'])} | {' '.join(f'{v:.1f}' for v in times['regstore'])}]",
              flush=True)
        del x, out


if __name__ == "__main__":
    main()
