"""The training loop: Megatron-Core DDP + optimizer + pipeline schedule, warmup+cosine LR,
gradient clipping, checkpoints with exact resume, W&B / TensorBoard / JSON-lines metrics."""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """NCCL with CUDA, gloo without; torchrun's env, or a 1-process group."""
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        store = dist.FileStore(tempfile.mktemp(prefix="gqla_pg_"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)


def _common_config(args, cuda: bool) -> dict:
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    cfg = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=bool(args.sequence_parallel), params_dtype=dtype, bf16=bool(args.bf16),
        pipeline_dtype=dtype if args.pipeline_model_parallel_size > 1 else None,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02, layernorm_epsilon=args.norm_epsilon,
        use_cpu_initialization=not cuda, gradient_accumulation_fusion=False,  # needs apex for the LM head
        bias_activation_fusion=cuda, bias_dropout_fusion=cuda, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, mtp_num_layers=args.mtp_num_layers,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
    )
    if args.recompute_modules:
        cfg["recompute_modules"] = args.recompute_modules
    if args.fp8_format:
        cfg.update(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe,
                   fp8_amax_history_len=args.fp8_amax_history_len,
                   fp8_amax_compute_algo=args.fp8_amax_compute_algo)
    return cfg


def _shape(args) -> dict:
    return dict(num_query_groups=args.num_query_groups, kv_lora_rank=args.kv_lora_rank,
                q_lora_rank=args.q_lora_rank, qk_head_dim=args.qk_head_dim,
                qk_pos_emb_head_dim=args.qk_pos_emb_head_dim, v_head_dim=args.v_head_dim)


def build_scheduler(optimizer, args):
    """Linear warmup over --lr-warmup-iters, cosine to --min-lr at --train-iters (Megatron's)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters, lr_decay_style="cosine", start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant")


def pretrain(args) -> list:
    """Train; returns the logged metrics of this rank (non-empty on the logging rank)."""
    import gqla_megatron.megatron  # noqa: F401  (CPU patches)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from gqla_megatron.megatron import cpu_compat
    from gqla_megatron.training import checkpoint as ckpt
    from gqla_megatron.training.data import TokenizerInfo, build_train_dataset, microbatches
    from gqla_megatron.training.models import build_model, flops_per_iteration, transformer_config
    from gqla_megatron.training.tracking import RunLogger

    init_distributed()
    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.enable_cuda_to_cpu_mode()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                 pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    log_rank = world - 1  # holds the loss under pipeline parallelism, as in Megatron-LM
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    dp_group = ps.get_data_parallel_group()

    config = transformer_config(args.attention, _common_config(args, cuda), _shape(args),
                                rotary_base=args.rotary_base, qk_layernorm=args.qk_layernorm)
    backend = "te" if args.transformer_impl == "transformer_engine" else "local"
    model = build_model(args.attention, config, vocab_size=args.vocab_size, seq_length=args.seq_length,
                        rotary_base=args.rotary_base,
                        backend=backend)
    if args.init_layout_invariant:
        from gqla_megatron.training.init import layout_invariant_init_

        layout_invariant_init_(model, config, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = TokenizerInfo(vocab_size=args.vocab_size, eod=args.eod_token_id)
    build = lambda: build_train_dataset(  # noqa: E731
        mock=args.mock_data, data_path=args.data_path or [], split=args.split, seq_length=args.seq_length,
        num_samples=args.train_iters * args.global_batch_size, tokenizer=tokenizer, seed=args.seed,
        cache_dir=args.data_cache_path)
    if rank == 0:  # rank 0 writes Megatron's index cache first; the others then read it
        dataset = build()
    dist.barrier()
    if rank != 0:
        dataset = build()
    device = torch.cuda.current_device() if cuda else "cpu"

    def make_data(start_iteration):
        return microbatches(dataset, start_iteration=start_iteration, global_batch_size=args.global_batch_size,
                            micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp)

    num_micro = args.global_batch_size // (args.micro_batch_size * dp)
    if cuda:
        model.cuda(torch.cuda.current_device())
    if args.engine == "deepspeed":
        from gqla_megatron.training.ds_engine import train_deepspeed

        return train_deepspeed(args, model, make_data, num_micro=num_micro, device=device,
                               n_params=n_params, log_rank=log_rank)
    if args.bf16:
        model = Float16Module(config, model)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                              use_distributed_optimizer=args.use_distributed_optimizer),
        module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=1e-8,
                        clip_grad=args.clip_grad, bf16=bool(args.bf16), params_dtype=config.params_dtype,
                        use_distributed_optimizer=args.use_distributed_optimizer), [model])
    scheduler = build_scheduler(optimizer, args)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    config.grad_scale_func = optimizer.scale_loss

    start = 0
    if args.load:
        start = ckpt.load_checkpoint(args.load, model, optimizer, scheduler, finetune=args.finetune)
    data = make_data(start)

    def forward_step(data_iterator, model):
        b = {k: v.to(device) for k, v in next(data_iterator).items()}
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
        mask = b["loss_mask"].float()

        def loss_func(output_tensor):
            loss = (output_tensor.float() * mask).sum() / mask.sum().clamp(min=1)
            reported = loss.detach().clone()
            dist.all_reduce(reported, group=dp_group)
            return loss, {"lm loss": reported / dp}

        return out, loss_func

    tokens_per_iter = args.global_batch_size * args.seq_length
    log = RunLogger(args, enabled=rank == log_rank, world=world, tokens_per_iter=tokens_per_iter,
                    flops_per_iter=flops_per_iteration(args.attention, args, tokens_per_iter))
    log.header(f"{args.attention} {args.recipe}, {n_params:,} params on this rank, world {world} = "
               f"TP {args.tensor_model_parallel_size} x PP {args.pipeline_model_parallel_size} x DP {dp}, "
               f"start iteration {start}")
    fb = get_forward_backward_func()
    it = start
    try:
        while it < args.train_iters:
            t0 = time.perf_counter()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            losses = fb(forward_step_func=forward_step, data_iterator=data, model=[model],
                        num_microbatches=num_micro, seq_length=args.seq_length,
                        micro_batch_size=args.micro_batch_size, forward_only=False)
            ok, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            mtp_losses = {}
            if config.mtp_num_layers:  # a no-op on ranks without MTP layers
                MTPLossLoggingHelper.track_mtp_metrics(loss_scale=1.0 / num_micro, iteration=it + 1,
                                                       writer=None, total_loss_dict=mtp_losses)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            it += 1
            if rank == log_rank:
                log.iteration(it, loss=torch.stack([l["lm loss"] for l in losses]).mean().item(),
                              lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm, step_s=dt,
                              **{"update ok": bool(ok)}, **{k: float(v) for k, v in mtp_losses.items()})
            if args.save and args.save_interval and (it % args.save_interval == 0 or it == args.train_iters):
                ckpt.save_checkpoint(args.save, it, model, optimizer, scheduler,
                                     extra={"args": {k: v for k, v in vars(args).items()}})
            if args.exit_interval and it >= args.exit_interval:
                break
    finally:
        log.close()
    return log.history
