"""Quickstart on the embedded default (tiny GQLA model, CPU, about 10 s):

    python examples/quickstart_cpu.py [--new-tokens 16] [--seed 0]

1. builds a 2-layer GQLA GPT with Megatron-Core (local spec) on CPU,
2. prefills a batch of prompts in the expanded (training) form with Megatron,
3. decodes greedily on BOTH decode paths (MQA-absorb: latent cache; GQA: per-group K/V
   cache) with the reference engine, switching one copy from absorb to gqa mid-generation,
4. checks every path against Megatron's full-sequence forward and prints the KV-cache bytes
   per token of each path.
Exit status is 1 if the paths disagree.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gqla_megatron import reference as ref  # noqa: E402
from gqla_megatron import reference_model as refm  # noqa: E402
from gqla_megatron.config import GQLAConfig  # noqa: E402
from gqla_megatron.megatron import adapters, build_gqla_gpt_model, tiny_config  # noqa: E402
from gqla_megatron.testing import model_parallel  # noqa: E402

VOCAB = 256


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per prompt")
    p.add_argument("--prompt-len", type=int, default=12, help="prompt length")
    p.add_argument("--batch", type=int, default=2, help="number of prompts")
    p.add_argument("--seed", type=int, default=0, help="init and prompt seed")
    args = p.parse_args(argv)

    with model_parallel(1, 1, seed=args.seed):
        cfg = tiny_config()
        torch.manual_seed(args.seed)
        model = build_gqla_gpt_model(cfg, vocab_size=VOCAB, max_sequence_length=128).eval()
        g = cfg.gqla
        print(f"model: GQLA GPT, {cfg.num_layers} layers, D={g.hidden_size}, h_q={g.num_attention_heads}, "
              f"g={g.num_query_groups}, r={g.kv_lora_rank}, d_n={g.qk_head_dim}, d_r={g.qk_pos_emb_head_dim}, "
              f"d_v={g.v_head_dim}, r_q={g.q_lora_rank}; "
              f"{sum(p.numel() for p in model.parameters()):,} params")
        prompts = torch.randint(0, VOCAB, (args.batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(args.seed))
        mw = adapters.model_to_reference(dict(model.named_parameters()), g, cfg.num_layers)

        def megatron_logits(tokens):
            pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
            with torch.no_grad():
                return model(tokens, pos, None)

        # prefill (expanded form, Megatron) -> first token; then decode per path
        first = megatron_logits(prompts)[:, -1].argmax(-1, keepdim=True)
        results = {}
        for path in ("absorb", "gqa", "absorb->gqa"):
            caches = refm.empty_caches(path.split("->")[0], g, mw, args.batch)
            with torch.no_grad():
                _, caches = refm.decode(prompts, mw, g, caches)
                tokens, logits = [first], []
                for step in range(args.new_tokens):
                    if path == "absorb->gqa" and step == args.new_tokens // 2:
                        caches = [ref.expand_cache(c, l.attn, g) for c, l in zip(caches, mw.layers)]
                    lg, caches = refm.decode(tokens[-1], mw, g, caches)
                    logits.append(lg[:, -1])
                    tokens.append(lg[:, -1].argmax(-1, keepdim=True))
            results[path] = (torch.cat(tokens, 1), torch.stack(logits, 1))

        seq = torch.cat([prompts, results["absorb"][0]], 1)
        full = megatron_logits(seq[:, :-1])[:, args.prompt_len:]
        ok = True
        print(f"\ngenerated {args.new_tokens} tokens x {args.batch} prompts (greedy)")
        for path, (toks, lg) in results.items():
            same = torch.equal(toks, results["absorb"][0])
            diff = (lg - full).abs().max().item()
            ok &= same and diff < 1e-4
            print(f"  {path:12s} tokens identical to absorb: {same}   max |logit - Megatron full forward| = {diff:.2e}")
        print(f"  first prompt continuation: {results['gqa'][0][0].tolist()}")

        print("\nKV-cache bytes per token (bf16, all layers; GQA path stores the shared RoPE key once)")
        for name, c, layers in [("this tiny model", g, cfg.num_layers),
                                ("LLaMA-3-8B shapes (32 layers)",
                                 GQLAConfig(hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                                            kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
                                            v_head_dim=128), 32)]:
            a = refm.cache_bytes_per_token("absorb", c, layers)
            q = refm.cache_bytes_per_token("gqa", c, layers)
            # a GQA model with g KV heads of dims d_n (K) and d_v (V), no latent
            base = 2 * c.num_query_groups * (c.qk_head_dim + c.v_head_dim) * layers
            print(f"  {name:30s} absorb {a:7,d} B   gqa {q:7,d} B   (same-shape GQA: {base:,d} B; "
                  f"absorb = {100 * a / base:.3f} % of it)")
        print("\nOK: both decode paths agree with the Megatron model" if ok else "\nFAIL: paths disagree")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
