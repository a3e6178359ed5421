"""Metrics to the console, W&B (online or ``WANDB_MODE=offline``) and TensorBoard; rank-local:
only the logging rank (the last one, which holds the loss under PP) creates writers."""

from __future__ import annotations

import os
from typing import Optional


class Tracker:
    def __init__(self, *, enabled: bool, config: dict, wandb_project: Optional[str],
                 wandb_exp_name: Optional[str], wandb_save_dir: Optional[str],
                 tensorboard_dir: Optional[str]):
        self.enabled = enabled
        self.wandb = self.tb = None
        if not enabled:
            return
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("--wandb-project needs wandb (pip install 'gqla-megatron[wandb]')") from e
            save_dir = wandb_save_dir or os.path.join(os.getcwd(), "wandb")
            os.makedirs(save_dir, exist_ok=True)
            self.wandb = wandb.init(project=wandb_project, name=wandb_exp_name, dir=save_dir,
                                    config=config)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


class RunLogger:
    """Per-iteration metrics of a training run, on the logging rank only: the console line,
    W&B / TensorBoard (through ``Tracker``) and ``--metrics-file`` (JSON lines)."""

    def __init__(self, args, *, enabled: bool, flops_per_iter: float, tokens_per_iter: int, world: int):
        self.args, self.enabled = args, enabled
        self.flops, self.tokens, self.world = flops_per_iter, tokens_per_iter, world
        self.tracker = Tracker(enabled=enabled, config=vars(args), wandb_project=args.wandb_project,
                               wandb_exp_name=args.wandb_exp_name, wandb_save_dir=args.wandb_save_dir,
                               tensorboard_dir=args.tensorboard_dir)
        self.file = open(args.metrics_file, "a") if (enabled and args.metrics_file) else None
        self.history = []

    def header(self, text: str) -> None:
        if self.enabled:
            print(f"gqla-pretrain: {text}", flush=True)

    def iteration(self, it: int, *, loss: float, lr: float, grad_norm, step_s: float, **extra) -> None:
        if not self.enabled:
            return
        import json

        import torch

        tflops = self.flops / step_s / self.world / 1e12
        mem = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
               else __import__("psutil").Process().memory_info().rss / 2**30)
        m = {"iteration": it, "lm loss": loss, "lr": lr,
             "grad norm": float(grad_norm) if grad_norm is not None else float("nan"),
             "step time s": step_s, "tokens per s": self.tokens / step_s, "TFLOP/s per GPU": tflops,
             "MFU": tflops / self.args.peak_tflops, "memory GiB": mem, **extra}
        self.history.append(m)
        self.tracker.log(it, {k: v for k, v in m.items() if k != "iteration"})
        if self.file:
            self.file.write(json.dumps(m) + "\n")
            self.file.flush()
        if it % self.args.log_interval == 0 or it == self.args.train_iters:
            print(f"iter {it:6d}/{self.args.train_iters} | loss {loss:.6f} | lr {lr:.3e} | "
                  f"grad norm {m['grad norm']:.3f} | {m['tokens per s']:,.0f} tok/s | "
                  f"{tflops:.1f} TFLOP/s/GPU | MFU {100 * m['MFU']:.1f} % | {mem:.2f} GiB", flush=True)

    def close(self) -> None:
        self.tracker.close()
        if self.file:
            self.file.close()
