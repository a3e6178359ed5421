"""EXPERIMENT (session 6): what the split-KV combine pass costs, and whether wider programs help.

Run 13 timed the TileLang absorb split kernel alone at 99 us of a 115 us cell (B=32 x 8k): the
combine pass (Triton ``_combine``: one program per (query row, column block, sequence), column
blocks of 128 -- narrower at small B -- so 4096 programs of 2 KB each there) and its launch cost
~15 us for 8 MB of partials that are still in L2. This times, per cell, the whole call with:
  * the combine replaced by nothing ("split only": the floor any combine can reach),
  * the package combine (the planner's column block),
  * column blocks fixed at 64 / 128 / 256 / 512 (absorb) or 32 / 64 / 128 (gqa),
as CUDA-graph replays, L2 flushed (write) before each, one process. Outputs of every combine
variant are compared with the package combine's.

Run (one H200, carry [".tlkit"]): cmd.sh
"""

import os
import sys

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..", "..")))

from gqla_megatron import bench_decode as bd  # noqa: E402
from gqla_megatron.kernels import triton_decode as td  # noqa: E402

ORIG = td._run_combine


def fixed(block_dv, num_warps=4):
    def run(opart, lse, out, H, DV, nsplit, device):
        B, rows = lse.shape[0], lse.shape[1]
        bdv = min(block_dv, td._pow2(DV))
        split_pad = td._pow2(nsplit)
        grid = (rows, triton.cdiv(DV, bdv), B)
        td._combine[grid](opart, lse, out,
                          opart.stride(0), opart.stride(1), opart.stride(2), lse.stride(0), lse.stride(1),
                          out.stride(0), out.stride(1), out.stride(2), nsplit, H,
                          DV=DV, SPLIT_PAD=split_pad, SPLIT_BLOCK=min(64, split_pad), BLOCK_DV=bdv,
                          num_warps=num_warps, num_stages=1)
    return run


def main():
    dev = torch.device("cuda")
    flush = bd.L2Flush(dev, "write")
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    cells = [("absorb", "tilelang", B, L, S) for (B, L) in ((1, 32768), (8, 32768), (32, 8192), (32, 32768))
             for S in (1, 2)]
    cells += [("absorb", "triton", 8, 8192, 1), ("gqa", "triton", 1, 8192, 1), ("gqa", "triton", 1, 32768, 1),
              ("gqa", "triton", 8, 8192, 1), ("gqa", "triton", 8, 32768, 2)]
    for path, kern, B, L, S in cells:
        x = bd.make_inputs(path, shp, B, L, S, torch.bfloat16, dev, 0)
        fn, _, note = (bd._method_tilelang if kern == "tilelang" else bd._method_triton)(path, shp, x)
        widths = (64, 128, 256, 512) if path == "absorb" else (32, 64, 128)
        variants = [("split only", lambda *a: None), ("package", ORIG)] + [(f"dv{w}", fixed(w)) for w in widths]
        res, ref = {}, None
        for name, comb in variants:
            td._run_combine = comb
            try:
                res[name] = bd.time_graph(fn, dev, warmup=3, iters=30, flush=flush) * 1e6
                out = fn()
                torch.cuda.synchronize()
                if name == "package":
                    ref = out.clone()
                elif ref is not None and name != "split only":
                    err = float((out.float() - ref.float()).abs().max())
                    if err > 0:
                        res[name + " max|diff|"] = err
            finally:
                td._run_combine = ORIG
        base = res["package"]
        print(f"{kern} {path} B={B} L={L} s_q={S} splits={note.get('num_splits')}: "
              + " | ".join(f"{k} {v:.1f}" + ("" if "diff" in k else "us") for k, v in res.items())
              + f" | combine share {base - res['split only']:.1f} us of {base:.1f}", flush=True)
        del x


if __name__ == "__main__":
    main()
