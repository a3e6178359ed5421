"""SmolLM2-135M-Instruct TransGQLA at one KV budget, with and without Hessian (NLL-gradient)
weighted calibration statistics: held-out perplexity of both (no healing).

Same data and settings as tests/cpu/test_transgqla.py::test_smollm2_two_kv_budgets
(calibration: Python-docs howto/faq; held-out: tutorial; 512-token windows).
Usage: python benchmarks/conversion_smollm2_cpu/hessian_ppl.py [--calib-windows 4]
       [--eval-windows 4] [--rank 128] [--rope-dim 32] [--freqfold 4]
"""

import argparse
import time

import torch

from gqla_megatron import reference_model as rm
from gqla_megatron.conversion import gguf_import as gi
from gqla_megatron.conversion import textdata as td
from gqla_megatron.conversion import transgqla as tg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-windows", type=int, default=4, help="512-token calibration windows")
    ap.add_argument("--eval-windows", type=int, default=4, help="512-token held-out windows")
    ap.add_argument("--rank", type=int, default=128, help="kv_lora_rank r")
    ap.add_argument("--rope-dim", type=int, default=32, help="d_r")
    ap.add_argument("--freqfold", type=int, default=4, help="freqfold")
    ap.add_argument("--hessian-batch", type=int, default=1, help="windows per autograd pass")
    a = ap.parse_args()
    torch.manual_seed(0)
    w, cfg, contents = gi.load_gguf_model()
    tok = gi.build_tokenizer(contents.metadata)
    cal = td.token_windows(tok.encode(td.python_docs_text("calibration", max_chars=400000)).ids,
                           512, a.calib_windows)
    ev = td.token_windows(tok.encode(td.python_docs_text("heldout", max_chars=200000)).ids,
                          512, a.eval_windows)
    print(f"calibration {cal.numel()} tokens, held-out {ev.numel()} tokens; r={a.rank} "
          f"d_r={a.rope_dim} freqfold={a.freqfold}")
    t0 = time.time()
    ppl_src = td.perplexity(lambda t: gi.gqa_forward(t, w, cfg), ev)
    print(f"source GQA                PPL {ppl_src:8.3f}   ({time.time() - t0:.0f} s)")
    for hess in (False, True):
        t0 = time.time()
        stats = tg.collect_attention_stats(w, cfg, cal, hessian_weighting=hess,
                                           batch=a.hessian_batch if hess else 4)
        t_stats = time.time() - t0
        mw, gcfg, rep = tg.convert_model(w, cfg, kv_lora_rank=a.rank, rope_dim=a.rope_dim,
                                         freqfold=a.freqfold, stats=stats, hessian_weighting=hess)
        ppl = td.perplexity(lambda t: rm.forward(t, mw, gcfg), ev)
        ke = [l.kv_energy for l in rep.layers]
        re_ = [l.rope_energy for l in rep.layers]
        print(f"GQLA {'hessian' if hess else 'plain  '}              PPL {ppl:8.3f}   (stats "
              f"{t_stats:.0f} s; weighted KV energy kept mean {sum(ke) / len(ke):.3f}, RoPE "
              f"energy mean {sum(re_) / len(re_):.3f})")


if __name__ == "__main__":
    main()
