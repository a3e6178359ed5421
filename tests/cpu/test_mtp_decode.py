"""CPU tier: multi-token prediction. The reference MTP forward against Megatron-Core 0.16.1's
MultiTokenPredictionLayer (loss and gradients: an MTP GPTModel cannot return plain logits), and
MTP speculative decoding in the engine: tokens identical to plain greedy decoding on both paths,
drafts exactly those of the reference MTP forward (acceptance counts predicted from it)."""

import pytest
import torch

from gqla_megatron import reference as ref
from gqla_megatron import reference_model as refm
from gqla_megatron.config import GQLAConfig
from gqla_megatron.inference.engine import GQLAEngine, SamplingParams
from gqla_megatron.roofline import get_device
from gqla_megatron.testing import FP32_PARITY, FP32_PARITY_MAX, assert_close_report, random_model_weights

H100 = get_device("H100")
CFG = GQLAConfig(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_lora_rank=32,
                 qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, q_lora_rank=24)


def with_mtp(mw, cfg, depths, seed=0):
    """Random MTP depths on top of reference weights (norms near 1, eh_proj ~ 1/sqrt(2D))."""
    g = torch.Generator().manual_seed(1000 + seed)
    D = cfg.hidden_size
    donor = random_model_weights(cfg, vocab=mw.embedding.shape[0], layers=depths, seed=500 + seed)
    mw.mtp = [refm.MTPWeights(enorm=1 + 0.1 * torch.randn(D, generator=g), hnorm=1 + 0.1 * torch.randn(D, generator=g),
                              eh_proj=torch.randn(D, 2 * D, generator=g) / (2 * D) ** 0.5, layer=lw,
                              final_norm=1 + 0.1 * torch.randn(D, generator=g)) for lw in donor.layers]
    return mw


# ---- reference MTP vs Megatron ---------------------------------------------------------
@pytest.mark.parametrize("depths", [1, 2])
def test_reference_mtp_loss_and_grads_match_megatron(depths):
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

    from gqla_megatron.megatron import adapters, build_gqla_gpt_model, tiny_config
    from gqla_megatron.testing import model_parallel

    V, S = 96, 12
    with model_parallel(1, 1):
        cfg = tiny_config(mtp_num_layers=depths)
        torch.manual_seed(3)
        model = build_gqla_gpt_model(cfg, vocab_size=V, max_sequence_length=64)
        g = torch.Generator().manual_seed(0)
        tok = torch.randint(0, V, (2, S), generator=g)
        labels = torch.roll(tok, -1, 1)
        mask = torch.ones(2, S)
        mask[1, -3:] = 0
        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        MTPLossLoggingHelper.tracker.clear()
        model.train()  # dropout is 0; training mode makes Megatron log the MTP loss
        loss = model(tok, torch.arange(S)[None].expand(2, S), None, labels=labels, loss_mask=mask)
        (loss * mask).sum().backward()
        got = MTPLossLoggingHelper.tracker["values"].clone()
        MTPLossLoggingHelper.tracker.clear()

        sd = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        assert adapters.num_mtp_layers(sd) == depths
        mw = adapters.model_to_reference(sd, cfg.gqla, cfg.num_layers, mtp_num_layers=depths)
        losses = refm.mtp_losses(tok, labels, mw, cfg.gqla, mask)
        assert_close_report("MTP loss per depth", got, torch.stack(losses).detach(), rel_l2=FP32_PARITY, rel=FP32_PARITY_MAX)
        # gradients: the main per-token loss (masked sum) + 0.1 / D * each depth's mean loss
        main = refm.forward(tok, mw, cfg.gqla)
        ce = torch.nn.functional.cross_entropy(main.flatten(0, 1), labels.flatten(), reduction="none")
        total = (ce * mask.flatten()).sum() + cfg.mtp_loss_scaling_factor / depths * sum(losses)
        total.backward()
        for n, p in model.named_parameters():
            if n.startswith("mtp.") or n == "embedding.word_embeddings.weight":
                assert_close_report(f"grad {n}", p.grad, sd[n].grad, rel_l2=2 * FP32_PARITY, rel=FP32_PARITY_MAX)
        # a wrong concat order ([hidden ; embedding]) must be caught
        m0 = mw.mtp[0]
        D = cfg.hidden_size
        swapped = refm.MTPWeights(m0.enorm, m0.hnorm, torch.cat([m0.eh_proj[:, D:], m0.eh_proj[:, :D]], 1),
                                  m0.layer, m0.final_norm)
        bad = refm.mtp_losses(tok, labels, refm.ModelWeights(mw.embedding, mw.layers, mw.final_norm, mw.output,
                                                             mw.eps, [swapped]), cfg.gqla, mask)
        assert abs(bad[0].item() - got[0].item()) > 1e-3
