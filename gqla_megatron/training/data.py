"""Training data: Megatron indexed datasets (.bin/.idx) through megatron.core.datasets
(GPTDataset, blends, splits), or Megatron's mock data; a deterministic global-batch order so
that a resumed run reads exactly the samples an uninterrupted run would."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch


@dataclass
class TokenizerInfo:
    """What Megatron's GPT datasets need to know of the tokenizer."""

    vocab_size: int
    """Size of the vocabulary (embedding rows)."""
    eod: int
    """End-of-document token id, appended to every document by the preprocessing tool."""

    @property
    def unique_identifiers(self) -> dict:
        """Megatron hashes this into its dataset-cache keys."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


def parse_blend(data_path: List[str]) -> tuple[list, Optional[list]]:
    """Megatron-LM's --data-path: either 'PREFIX ...' or 'W1 PREFIX1 W2 PREFIX2 ...'."""
    try:
        float(data_path[0])
        weighted = True
    except ValueError:
        weighted = False
    if not weighted:
        return list(data_path), None
    if len(data_path) % 2:
        raise ValueError(f"--data-path with weights needs 'W PREFIX' pairs, got {data_path}")
    return list(data_path[1::2]), [float(w) for w in data_path[0::2]]


def validate_data_path(data_path: List[str]) -> None:
    """Raise ValueError before any work if a prefix lacks its .bin/.idx or they are empty."""
    if not data_path:
        raise ValueError("--data-path is empty: give indexed-dataset prefixes or use --mock-data")
    prefixes, _ = parse_blend(data_path)
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            path = prefix + ext
            if not os.path.isfile(path):
                raise ValueError(f"--data-path {prefix}: {path} does not exist "
                                 f"(make it with gqla-preprocess)")
            if os.path.getsize(path) == 0:
                raise ValueError(f"--data-path {prefix}: {path} is empty")


def build_train_dataset(*, mock: bool, data_path: List[str], split: str, seq_length: int,
                        num_samples: int, tokenizer: TokenizerInfo, seed: int, cache_dir: Optional[str]):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    kw = dict(random_seed=seed, sequence_length=seq_length, tokenizer=tokenizer,
              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
              create_attention_mask=False, path_to_cache=cache_dir, mid_level_dataset_surplus=0.005)
    if mock:
        cfg = GPTDatasetConfig(**kw, split="1,0,0")
        cls = MockGPTDataset
    else:
        prefixes, weights = parse_blend(data_path)
        cfg = GPTDatasetConfig(**kw, blend=(prefixes, weights), split=split)
        cls = GPTDataset
    train, _, _ = BlendedMegatronDatasetBuilder(cls, [num_samples, None, None], lambda: True, cfg).build()
    return train


def microbatches(dataset, *, start_iteration: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> Iterator[dict]:
    """Yield this DP rank's micro-batches in a fixed order: in iteration ``it``, micro-batch ``m``
    of rank ``r`` holds global samples it*GBS + m*(MBS*DP) + r*MBS + [0, MBS). Resuming at
    iteration k therefore continues exactly where an uninterrupted run would be."""
    num_micro = global_batch_size // (micro_batch_size * dp_size)
    it = start_iteration
    while True:
        for m in range(num_micro):
            base = it * global_batch_size + m * micro_batch_size * dp_size + dp_rank * micro_batch_size
            samples = [dataset[(base + i) % len(dataset)] for i in range(micro_batch_size)]
            yield {k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                   for k in ("tokens", "labels", "loss_mask", "position_ids")}
        it += 1
