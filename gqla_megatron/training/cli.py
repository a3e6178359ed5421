"""gqla-pretrain: GQLA pretraining on Megatron-Core (torchrun, TP/PP/SP/DP, FP8 via TE).

One process, CPU, the embedded tiny recipe on mock data:
    gqla-pretrain --recipe tiny_cpu --mock-data --train-iters 20 --save runs/tiny
Four processes on one node (TP=2 x PP=2), real data, W&B offline:
    WANDB_MODE=offline torchrun --standalone --nproc-per-node 4 pretrain/pretrain_gqla.py \\
        --recipe tiny_cpu --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --data-path data/pydocs_text_document --save runs/tp2pp2 --wandb-project gqla
Two nodes (run on each, NODE_RANK = 0 / 1):
    torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint $MASTER:29500 pretrain/pretrain_gqla.py --recipe gqla_8b_shape \\
        --fp8-format hybrid --fp8-recipe delayed --data-path 1.0 data/corpus_text_document \\
        --save /ckpt/gqla8b --load /ckpt/gqla8b --save-interval 500
Baselines of the same shape: --attention mla | gqa. Resume: --load DIR (same as --save).
Flag names are Megatron-LM's; a recipe sets defaults that explicit flags override.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gqla_megatron.training.recipes import RECIPES, get_recipe

MODEL_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_lora_rank", "q_lora_rank", "qk_head_dim",
               "qk_pos_emb_head_dim", "v_head_dim", "vocab_size", "seq_length")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gqla-pretrain", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = p.add_argument_group("run")
    g.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="named run recipe")
    g.add_argument("--attention", choices=("gqla", "mla", "gqa"), default=None,
                   help="attention of the model (mla/gqa: same-shape baselines)")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default=None,
                   help="layer spec backend (recipe default)")
    g.add_argument("--engine", choices=("megatron", "deepspeed"), default="megatron",
                   help="optimizer engine: Megatron DDP + optimizer, or DeepSpeed ZeRO")
    g.add_argument("--seed", type=int, default=None, help="random seed")
    g.add_argument("--init-layout-invariant", action="store_true",
                   help="draw every weight from a per-name seed so TP/PP/DP layouts start identical")
    m = p.add_argument_group("model (recipe defaults)")
    for name in MODEL_FLAGS:
        m.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=name)
    m.add_argument("--mtp-num-layers", type=int, default=None, help="multi-token prediction depth")
    m.add_argument("--rotary-base", type=float, default=None, help="RoPE base (default 10000)")
    m.add_argument("--norm-epsilon", type=float, default=None, help="RMSNorm epsilon (default 1e-5)")
    m.add_argument("--qk-layernorm", action=argparse.BooleanOptionalAction, default=None,
                   help="RMSNorm on the q/kv latents (GQLA/MLA; default on; TransGQLA output has none)")
    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=None, help="TP size")
    par.add_argument("--pipeline-model-parallel-size", type=int, default=None, help="PP size")
    par.add_argument("--sequence-parallel", action="store_true", default=None, help="sequence parallel")
    par.add_argument("--use-distributed-optimizer", action="store_true", help="shard optimizer state over DP")
    par.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=2, help="DeepSpeed ZeRO stage")
    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=None, help="samples per micro-batch")
    t.add_argument("--global-batch-size", type=int, default=None, help="samples per iteration")
    t.add_argument("--train-iters", type=int, default=None, help="iterations")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate")
    t.add_argument("--min-lr", type=float, default=None, help="final learning rate (cosine)")
    t.add_argument("--lr-warmup-iters", type=int, default=None, help="linear warmup iterations")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    t.add_argument("--clip-grad", type=float, default=None, help="gradient-norm clip")
    t.add_argument("--adam-beta1", type=float, default=None, help="Adam beta1")
    t.add_argument("--adam-beta2", type=float, default=None, help="Adam beta2")
    t.add_argument("--bf16", action="store_true", default=None, help="bf16 params and compute")
    t.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 params and compute")
    t.add_argument("--fp8-format", choices=("e4m3", "hybrid"), default=None, help="FP8 via TE")
    t.add_argument("--fp8-recipe", choices=("delayed", "tensorwise", "mxfp8", "blockwise"),
                   default="delayed", help="TE FP8 scaling recipe")
    t.add_argument("--fp8-amax-history-len", type=int, default=1, help="delayed scaling: amax history length")
    t.add_argument("--fp8-amax-compute-algo", choices=("most_recent", "max"), default="most_recent",
                   help="delayed scaling: amax reduction over the history")
    t.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="activation recomputation")
    t.add_argument("--recompute-method", choices=("uniform", "block"), default=None, help="full recompute method")
    t.add_argument("--recompute-num-layers", type=int, default=None, help="layers per recompute unit")
    t.add_argument("--recompute-modules", nargs="+", default=None, help="selective recompute modules")
    t.add_argument("--exit-interval", type=int, default=None, help="stop after this iteration")
    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="+", default=None, help="indexed-dataset prefixes (optionally weighted)")
    d.add_argument("--split", default="969,30,1", help="train,valid,test split of --data-path")
    d.add_argument("--mock-data", action="store_true", help="Megatron's mock data (smoke runs)")
    d.add_argument("--eod-token-id", type=int, default=0, help="end-of-document id (mock data)")
    d.add_argument("--data-cache-path", default=None, help="where Megatron caches dataset indices")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--save", default=None, help="checkpoint directory")
    c.add_argument("--load", default=None, help="resume from this directory's latest checkpoint")
    c.add_argument("--save-interval", type=int, default=None, help="iterations between saves")
    c.add_argument("--finetune", action="store_true",
                   help="load only the weights from --load (fresh optimizer, schedule, iteration 0)")
    c.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model shape (and attention, RoPE base, norms) from --load's run args")
    lg = p.add_argument_group("logging")
    lg.add_argument("--log-interval", type=int, default=None, help="iterations between log lines")
    lg.add_argument("--wandb-project", default=None, help="W&B project (WANDB_MODE=offline works offline)")
    lg.add_argument("--wandb-exp-name", default=None, help="W&B run name")
    lg.add_argument("--wandb-save-dir", default=None, help="W&B directory")
    lg.add_argument("--tensorboard-dir", default=None, help="TensorBoard event directory")
    lg.add_argument("--peak-tflops", type=float, default=989.0,
                    help="per-GPU peak TFLOP/s for MFU (bf16 dense H100/H200 = 989)")
    lg.add_argument("--metrics-file", default=None, help="append per-iteration metrics as JSON lines")
    return p


CHECKPOINT_ARGS = MODEL_FLAGS + ("attention", "rotary_base", "qk_layernorm", "mtp_num_layers")


def _apply_checkpoint_args(args) -> None:
    """--use-checkpoint-args: model fields the user did not give come from the run args stored
    with --load's latest checkpoint (gqla-pretrain and gqla-convert write them)."""
    from gqla_megatron.training.checkpoint import STATE, iter_dir, read_latest

    if not args.load:
        raise ValueError("--use-checkpoint-args needs --load")
    if not os.path.isdir(args.load) or read_latest(args.load) is None:
        raise ValueError(f"--load {args.load}: not a checkpoint directory (no latest_checkpointed_iteration.txt)")
    with open(os.path.join(iter_dir(args.load, read_latest(args.load)), STATE)) as f:
        saved = json.load(f)["args"]
    for k in CHECKPOINT_ARGS:
        if k in saved and getattr(args, k, None) is None:
            setattr(args, k, saved[k])
    if args.norm_epsilon is None:  # gqla-pretrain records norm_epsilon, gqla-convert layernorm_epsilon
        args.norm_epsilon = saved.get("norm_epsilon", saved.get("layernorm_epsilon"))


def resolve_args(argv=None) -> argparse.Namespace:
    """Parse, fill recipe defaults, validate everything that can be checked before work."""
    args = build_parser().parse_args(argv)
    if args.use_checkpoint_args:
        _apply_checkpoint_args(args)
    recipe = get_recipe(args.recipe)
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    defaults = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False,
                    mtp_num_layers=None, transformer_impl="local", attention="gqla", rotary_base=10000.0,
                    norm_epsilon=1e-5)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.qk_layernorm is None:  # latent norms: GQLA / MLA only (the GQA baseline has none)
        args.qk_layernorm = args.attention != "gqa"
    validate(args)
    return args


def validate(args) -> None:
    from gqla_megatron.training.data import validate_data_path

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world % (tp * pp):
        raise ValueError(f"--tensor-model-parallel-size ({tp}) x --pipeline-model-parallel-size ({pp}) "
                         f"must divide the world size ({world})")
    dp = world // (tp * pp)
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size ({args.global_batch_size}) must be divisible by "
                         f"--micro-batch-size ({args.micro_batch_size}) x data-parallel size ({dp})")
    if args.attention != "mla" and args.num_query_groups % tp:
        raise ValueError(f"--tensor-model-parallel-size ({tp}) must divide --num-query-groups "
                         f"({args.num_query_groups})")
    if args.attention == "gqa" and args.qk_layernorm:
        raise ValueError("--qk-layernorm: the GQA baseline has no latents to normalise")
    if args.num_layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size ({pp}) must divide --num-layers ({args.num_layers})")
    if args.fp8_format:
        if args.transformer_impl != "transformer_engine":
            raise ValueError("--fp8-format needs --transformer-impl transformer_engine (FP8 runs in TE modules)")
        from gqla_megatron.megatron.spec import te_available

        if not te_available():
            raise ValueError("--fp8-format needs Transformer Engine, which is not importable here "
                             "(pip install 'gqla-megatron[te]' on a CUDA machine)")
    if args.transformer_impl == "transformer_engine":
        from gqla_megatron.megatron.spec import te_available

        if not te_available():
            raise ValueError("--transformer-impl transformer_engine needs Transformer Engine; "
                             "use --transformer-impl local on CPU")
    if args.mock_data == bool(args.data_path):
        raise ValueError("give exactly one of --data-path and --mock-data")
    if args.data_path:
        validate_data_path(args.data_path)
    if args.load and not os.path.isdir(args.load):
        raise ValueError(f"--load {args.load}: no such directory")
    if args.engine == "deepspeed" and (pp > 1 or args.sequence_parallel):
        raise ValueError("--engine deepspeed supports neither --pipeline-model-parallel-size > 1 "
                         "nor --sequence-parallel")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr ({args.min_lr}) must be <= --lr ({args.lr})")
    if args.train_iters <= 0:
        raise ValueError(f"--train-iters must be > 0, got {args.train_iters}")
    if not 0 <= args.lr_warmup_iters < args.train_iters:
        raise ValueError(f"--lr-warmup-iters ({args.lr_warmup_iters}) must be >= 0 and < --train-iters "
                         f"({args.train_iters})")


def main(argv=None) -> int:
    try:
        args = resolve_args(argv)
    except ValueError as e:
        print(f"gqla-pretrain: error: {e}", file=sys.stderr)
        return 2
    from gqla_megatron.training.loop import pretrain

    pretrain(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
