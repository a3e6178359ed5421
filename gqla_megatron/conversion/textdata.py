"""Offline English text for calibration and perplexity: Debian's ``python3.11-doc`` sources.

The reST sources under ``/usr/share/doc/python3.11/html/_sources/`` are split by directory so
that calibration never sees evaluation text:

- ``heldout``: ``tutorial/`` (prose; used only for perplexity);
- ``calibration``: ``howto/`` and ``faq/`` (used only for conversion statistics).

Files are read in sorted path order, so every split is deterministic.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable, List, Optional

import torch
from torch import Tensor

__all__ = ["PYTHON_DOCS_DIR", "SPLITS", "python_docs_available", "python_docs_text",
           "token_windows", "perplexity"]

PYTHON_DOCS_DIR = "/usr/share/doc/python3.11/html/_sources"
SPLITS = {"heldout": ("tutorial",), "calibration": ("howto", "faq")}


def python_docs_available(root: str = PYTHON_DOCS_DIR) -> bool:
    """True when every split's directory exists under ``root``."""
    return all(os.path.isdir(os.path.join(root, d)) for ds in SPLITS.values() for d in ds)


def python_docs_text(split: str, root: str = PYTHON_DOCS_DIR, max_chars: Optional[int] = None) -> str:
    """Concatenated reST text of one split (documents separated by a blank line)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    paths: List[str] = []
    for d in SPLITS[split]:
        top = os.path.join(root, d)
        if not os.path.isdir(top):
            raise FileNotFoundError(f"{top} not found: install Debian's python3.11-doc")
        for dirpath, _dirs, files in os.walk(top):
            paths += [os.path.join(dirpath, f) for f in files if f.endswith(".txt")]
    parts, total = [], 0
    for p in sorted(paths):
        with open(p, encoding="utf-8") as fh:
            parts.append(fh.read().strip() + "\n\n")
        total += len(parts[-1])
        if max_chars is not None and total >= max_chars:
            break
    text = "".join(parts)
    return text if max_chars is None else text[:max_chars]


def token_windows(ids: Iterable[int], seq_len: int, n_windows: int) -> Tensor:
    """The first ``n_windows`` non-overlapping windows of ``seq_len`` tokens, (n_windows, seq_len).
    Raises ValueError when the text is too short."""
    ids = list(ids)
    need = seq_len * n_windows
    if len(ids) < need:
        raise ValueError(f"need {need} tokens ({n_windows} x {seq_len}), text has {len(ids)}")
    return torch.tensor(ids[:need], dtype=torch.long).view(n_windows, seq_len)


@torch.no_grad()
def perplexity(logits_fn: Callable[[Tensor], Tensor], windows: Tensor, batch: int = 4) -> float:
    """exp(mean next-token NLL) over every window (each window is its own sequence; its first
    token is context only). ``logits_fn(tokens_BS) -> (B, S, vocab)``."""
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        tok = windows[i:i + batch]
        logp = torch.log_softmax(logits_fn(tok)[:, :-1].to(torch.float64), -1)
        nll -= logp.gather(-1, tok[:, 1:, None]).sum().item()
        count += tok[:, 1:].numel()
    return math.exp(nll / count)
