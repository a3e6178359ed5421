"""Architecture config of one GQLA attention layer, free of Megatron and torch.distributed.

Field names follow Megatron-Core's ``MLATransformerConfig`` so that the Megatron config
(``gqla_megatron.megatron.config.GQLATransformerConfig``) and this one map 1:1; the math
symbol of each field (as in ``reference.py`` and docs/design.md) is given in its doc line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class GQLAConfig:
    """Shapes of a GQLA attention layer (one layer; all layers of a model share it)."""

    hidden_size: int
    """D: model width."""
    num_attention_heads: int
    """h_q: query heads."""
    num_query_groups: int
    """g: KV groups; the K/V up-projections W_UK, W_UV are shared by the h_q/g heads of a group."""
    kv_lora_rank: int
    """r: width of the KV latent c that the MQA-absorb path caches."""
    qk_head_dim: int
    """d_n: non-RoPE (content) query/key head dim."""
    qk_pos_emb_head_dim: int
    """d_r: decoupled RoPE dim; one RoPE key of this width per token is shared by all heads."""
    v_head_dim: int
    """d_v: value head dim."""
    q_lora_rank: Optional[int] = None
    """r_q: query latent width (W_DQ then W_UQ); None means one full-rank W_Q."""
    rotary_base: float = 10000.0
    """RoPE base theta of the decoupled RoPE part."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of the RMSNorms on the q and kv latents."""
    qk_layernorm: bool = True
    """RMSNorm on the q latent (if any) and the kv latent, as DeepSeek-V2/V3 do."""

    def __post_init__(self):
        for name in ("hidden_size", "num_attention_heads", "num_query_groups", "kv_lora_rank",
                     "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            _positive_int(name, getattr(self, name))
        if self.q_lora_rank is not None:
            _positive_int("q_lora_rank", self.q_lora_rank)
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_query_groups ({self.num_query_groups}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.qk_pos_emb_head_dim % 2:
            raise ValueError(
                f"qk_pos_emb_head_dim ({self.qk_pos_emb_head_dim}) must be even: RoPE rotates pairs")
        if not self.rotary_base > 0:
            raise ValueError(f"rotary_base must be > 0, got {self.rotary_base}")
        if not self.layernorm_epsilon > 0:
            raise ValueError(f"layernorm_epsilon must be > 0, got {self.layernorm_epsilon}")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        """m = h_q / g."""
        return self.num_attention_heads // self.num_query_groups

    @property
    def q_head_dim(self) -> int:
        """d_n + d_r: width of one query/key head in the expanded form."""
        return self.qk_head_dim + self.qk_pos_emb_head_dim

    @property
    def softmax_scale(self) -> float:
        """sigma = (d_n + d_r)^-1/2; the absorb path keeps it (it is NOT (r + d_r)^-1/2)."""
        return self.q_head_dim ** -0.5

    @property
    def absorb_cache_elems_per_token(self) -> int:
        """Values cached per token per layer on the MQA-absorb path: r + d_r."""
        return self.kv_lora_rank + self.qk_pos_emb_head_dim

    def gqa_cache_elems_per_token(self, rope_per_group: bool = False) -> int:
        """Values cached per token per layer on the GQA path.

        ``rope_per_group=False``: the shared RoPE key is stored once (g(d_n+d_v) + d_r; this
        project's layout and the paper's count). ``True``: it is stored inside every group's
        K head (g(d_n+d_r+d_v)), the layout of stock GQA kernels.
        """
        g = self.num_query_groups
        if rope_per_group:
            return g * (self.qk_head_dim + self.qk_pos_emb_head_dim + self.v_head_dim)
        return g * (self.qk_head_dim + self.v_head_dim) + self.qk_pos_emb_head_dim

    @property
    def compress_is_exact(self) -> bool:
        """GQA cache -> latent cache is exact iff W_UKV (g(d_n+d_v) x r) can have full column rank."""
        return self.num_query_groups * (self.qk_head_dim + self.v_head_dim) >= self.kv_lora_rank

    def megatron_shape(self) -> dict:
        """The GQLA dims as Megatron config fields (the ``shape`` of
        ``training.models.transformer_config``)."""
        return dict(num_query_groups=self.num_query_groups, kv_lora_rank=self.kv_lora_rank,
                    q_lora_rank=self.q_lora_rank, qk_head_dim=self.qk_head_dim,
                    qk_pos_emb_head_dim=self.qk_pos_emb_head_dim, v_head_dim=self.v_head_dim)

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_run_args(cls, args: dict) -> "GQLAConfig":
        """The config recorded in a checkpoint's run args (gqla-pretrain / gqla-convert:
        ``gqla_train_state.json``). The norm epsilon is ``norm_epsilon`` (gqla-pretrain's flag) or
        ``layernorm_epsilon`` (gqla-convert); absent fields take gqla-pretrain's defaults. A
        missing shape field raises KeyError naming it."""
        eps = args.get("norm_epsilon", args.get("layernorm_epsilon"))
        return cls(hidden_size=args["hidden_size"], num_attention_heads=args["num_attention_heads"],
                   num_query_groups=args["num_query_groups"], kv_lora_rank=args["kv_lora_rank"],
                   qk_head_dim=args["qk_head_dim"], qk_pos_emb_head_dim=args["qk_pos_emb_head_dim"],
                   v_head_dim=args["v_head_dim"], q_lora_rank=args.get("q_lora_rank"),
                   rotary_base=float(args.get("rotary_base") or 10000.0),
                   layernorm_epsilon=float(1e-5 if eps is None else eps),
                   qk_layernorm=bool(args.get("qk_layernorm", True)))

    @classmethod
    def from_dict(cls, d: dict) -> "GQLAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GQLAConfig field(s): {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GQLAConfig":
        return cls.from_dict(json.loads(text))
