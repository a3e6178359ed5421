"""``--engine deepspeed``: DeepSpeed ZeRO (stage 1/2/3) over the data-parallel group, Megatron's
tensor parallelism kept (Megatron's parallel state is DeepSpeed's model-parallel unit).

Same model, data order, LR schedule (linear warmup + cosine, Megatron's scheduler) and
metrics as the Megatron engine; the optimizer is torch AdamW driven by DeepSpeed, gradient
clipping by DeepSpeed over the model-parallel group, checkpoints by DeepSpeed
(``engine.save_checkpoint``: SAVE/iter_XXXXXXX with DeepSpeed's own ``latest``).
Pipeline parallelism and sequence parallelism are not supported on this engine.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class MegatronMPU:
    """DeepSpeed's ``mpu`` protocol over Megatron's parallel state (model parallel = TP, PP=1)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()


def train_deepspeed(args, model, make_data, *, num_micro: int, device, n_params: int, log_rank: int) -> list:
    if args.pipeline_model_parallel_size > 1 or args.sequence_parallel:
        raise ValueError("--engine deepspeed supports neither pipeline nor sequence parallelism")
    try:
        import deepspeed
    except ImportError as e:
        raise ValueError("--engine deepspeed needs deepspeed (pip install 'gqla-megatron[deepspeed]')") from e
    from gqla_megatron.training.loop import build_scheduler
    from gqla_megatron.training.models import flops_per_iteration
    from gqla_megatron.training.tracking import RunLogger

    mpu = MegatronMPU()
    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": num_micro,
        "gradient_clipping": args.clip_grad,
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": bool(args.bf16)},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            eps=1e-8, weight_decay=args.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=mpu,
                                                   dist_init_required=False)
    scheduler = build_scheduler(optimizer, args)
    start = 0
    if args.load:
        path, client = engine.load_checkpoint(args.load)
        if path is None:
            raise ValueError(f"--load {args.load}: no DeepSpeed checkpoint found")
        start = client["iteration"]
        scheduler.load_state_dict(client["opt_param_scheduler"])
    data = make_data(start)
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_group, dp = mpu.get_data_parallel_group(), mpu.get_data_parallel_world_size()
    tokens_per_iter = args.global_batch_size * args.seq_length
    log = RunLogger(args, enabled=rank == log_rank, world=world, tokens_per_iter=tokens_per_iter,
                    flops_per_iter=flops_per_iteration(args.attention, args, tokens_per_iter))
    log.header(f"{args.attention} {args.recipe} on DeepSpeed ZeRO-{args.zero_stage}, {n_params:,} params on "
               f"this rank, world {world} = TP {args.tensor_model_parallel_size} x DP {dp}, start iteration {start}")
    it = start
    try:
        while it < args.train_iters:
            t0 = time.perf_counter()
            total = torch.zeros((), device=device)
            for _ in range(num_micro):
                b = {k: v.to(device) for k, v in next(data).items()}
                out = engine(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
                mask = b["loss_mask"].float()
                loss = (out.float() * mask).sum() / mask.sum().clamp(min=1)
                engine.backward(loss)
                engine.step()
                total += loss.detach()
            scheduler.step(increment=1)
            dist.all_reduce(total, group=dp_group)
            dt = time.perf_counter() - t0
            it += 1
            if rank == log_rank:
                log.iteration(it, loss=(total / (num_micro * dp)).item(), lr=optimizer.param_groups[0]["lr"],
                              grad_norm=engine.get_global_grad_norm(), step_s=dt)
            if args.save and args.save_interval and (it % args.save_interval == 0 or it == args.train_iters):
                engine.save_checkpoint(args.save, tag=f"iter_{it:07d}",
                                       client_state={"iteration": it, "opt_param_scheduler": scheduler.state_dict()})
            if args.exit_interval and it >= args.exit_interval:
                break
    finally:
        log.close()
    return log.history
