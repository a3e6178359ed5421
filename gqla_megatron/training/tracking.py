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
