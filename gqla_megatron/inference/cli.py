"""gqla-serve: generate with a GQLA checkpoint on the decode path chosen for this hardware.

    gqla-serve generate --load runs/tiny --prompt-ids "1 2 3" --prompt-ids "7 8" --decode-path auto
    gqla-serve generate --load runs/tiny --tokenizer tokenizer.json --prompt "def main():" --max-new-tokens 64
    gqla-serve generate --load runs/tiny_mtp --prompt-ids "1 2 3" --mtp-speculative   # MTP drafts, greedy

Tensor parallel (TP = number of processes; heads and whole KV groups per rank):
    torchrun --standalone --nproc-per-node 4 serve/generate.py generate --load runs/tiny --prompt-ids "1 2 3"

Prints the chosen path with the predicted step time of both paths, the KV-cache bytes per token
of each path (per rank under TP), and one line per request.
"""

from __future__ import annotations

import argparse
import sys


def build_parser():
    p = argparse.ArgumentParser(prog="gqla-serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate for a batch of prompts")
    g.add_argument("--load", required=True, help="GQLA checkpoint: gqla-pretrain / gqla-convert directory, or an "
                   "HF directory in the GQLA layout (gqla-convert export-hf)")
    g.add_argument("--prompt-ids", action="append", default=[], help="a prompt as space-separated token ids")
    g.add_argument("--prompt", action="append", default=[], help="a text prompt (needs --tokenizer or a tokenizer.json in the checkpoint)")
    g.add_argument("--prompt-file", help="one text prompt per line (needs --tokenizer)")
    g.add_argument("--tokenizer", help="HF tokenizers tokenizer.json (default: the checkpoint's, if any)")
    g.add_argument("--decode-path", choices=("auto", "absorb", "gqa"), default="auto", help="decode path")
    g.add_argument("--decode-backend", default="auto", help="decode backend name (registry)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--stop-token", type=int, action="append", default=[], help="stop token id")
    g.add_argument("--max-seq-len", type=int, default=None, help="cache capacity (default: the model's)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--mtp-speculative", action="store_true",
                   help="speculative decoding with the checkpoint's MTP layers (greedy only)")
    g.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="drafts per step with --mtp-speculative (default: every MTP layer)")
    g.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs for the decode step (GPU)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _generate(args)
    except ValueError as e:
        print(f"gqla-serve: error: {e}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    from gqla_megatron.inference.engine import GQLAEngine, SamplingParams
    from gqla_megatron.inference.loader import load_checkpoint

    texts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    if not (args.prompt_ids or texts):
        raise ValueError("give at least one --prompt-ids, --prompt or --prompt-file")
    if args.mtp_speculative and args.temperature > 0:
        raise ValueError("--mtp-speculative is greedy only: drop --temperature")
    if args.num_speculative_tokens is not None and not args.mtp_speculative:
        raise ValueError("--num-speculative-tokens needs --mtp-speculative")
    import os

    import torch
    import torch.distributed as dist

    tp_group, rank = None, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        tp_group, rank = dist.group.WORLD, dist.get_rank()
    mw, cfg, run, ckpt_tok = load_checkpoint(args.load)
    tok = None
    tok_path = args.tokenizer or (ckpt_tok if texts else None)
    if texts and not tok_path:
        raise ValueError("--prompt/--prompt-file need --tokenizer (the checkpoint has no tokenizer.json)")
    if tok_path:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tok_path)
    prompts = [[int(t) for t in s.split()] for s in args.prompt_ids] + [tok.encode(t).ids for t in texts]
    if tok is not None and tok.get_vocab_size() > mw.embedding.shape[0]:
        raise ValueError(f"--tokenizer has {tok.get_vocab_size()} tokens but the checkpoint's vocabulary "
                         f"is {mw.embedding.shape[0]}: tokenizer and checkpoint do not match")
    engine = GQLAEngine(mw, cfg, decode_path=args.decode_path, decode_backend=args.decode_backend,
                        max_batch=len(prompts), max_seq_len=args.max_seq_len or run["seq_length"],
                        tp_group=tp_group, device="cuda" if torch.cuda.is_available() else "cpu",
                        speculative=args.mtp_speculative, num_speculative_tokens=args.num_speculative_tokens,
                        cuda_graphs=args.cuda_graphs)
    results = engine.generate(prompts, SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        stop_tokens=tuple(args.stop_token), seed=args.seed))
    if rank != 0:
        return 0
    print(f"TP {engine.tp}: " + engine.decision.summary())
    print(f"decode backend: {engine.backend.name}" +
          "".join(f"; rejected {k}: {v}" for k, v in engine.rejected_backends.items()))
    if engine.warmed:
        print("compiled at load: " + "; ".join(engine.warmed))
    print(f"KV-cache bytes per token per rank (all layers, {engine.dtype}): absorb {engine.cache_bytes_per_token('absorb'):,} "
          f"| gqa {engine.cache_bytes_per_token('gqa'):,}")
    if engine.speculative:
        st = engine.stats
        print(f"MTP speculative: {st['num_speculative_tokens']} draft(s) per step, acceptance "
              f"{st['acceptance_rate']:.3f} ({st['accepted']}/{st['drafted']}), "
              f"{st['tokens_per_step']:.3f} tokens per step")
    for i, r in enumerate(results):
        if r.error:
            print(f"[{i}] error: {r.error}")
        elif tok is not None and i >= len(args.prompt_ids):
            print(f"[{i}] {tok.decode(r.tokens)!r}")
        else:
            print(f"[{i}] {' '.join(map(str, r.tokens))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
