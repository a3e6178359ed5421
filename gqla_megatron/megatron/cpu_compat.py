"""Make Megatron-Core 0.16.1 run on a CUDA-less torch (CPU + gloo), for tests and the CPU demo.

Nothing here runs when CUDA is available, and no file under site-packages is edited: every fix
is a monkeypatch applied by ``apply()`` (idempotent). The facts behind each patch were checked
by hand on megatron-core 0.16.1 + torch 2.13.0+cpu; re-run the CPU suite on any upgrade.

``apply()`` (always needed without CUDA):
  * ``torch.cuda.current_device`` -> the CPU device: parallel linears, RoPE ``inv_freq``, the
    global memory buffer and the RNG helpers all call it (~40 sites on the forward path).
  * Megatron's CUDA RNG tracker (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker``)
    is routed to the CPU generator, so tracker forks really switch RNG streams.
  * ``torch.cuda.synchronize`` -> no-op (p2p communication, dist_checkpointing preload).
  * 0.16.1 sets ``multi_latent_attention.HAVE_TE = True`` whenever Megatron's TE extension module
    imports, which it does without TE; then ``isinstance(x, None)`` fails. Forced off when
    transformer_engine is not importable.

``enable_cuda_to_cpu_mode()`` (opt-in; pipeline schedules, mcore DDP, Megatron optimizers):
  a process-wide ``TorchFunctionMode`` that maps ``device="cuda"`` arguments (63 literal sites
  in 0.16.1), ``Tensor.cuda()`` and ``Tensor.to("cuda")`` to the CPU, reports CPU tensors'
  ``Tensor.type()`` under ``torch.cuda.*`` names (optimizer dtype checks), and stubs
  ``torch.cuda.current_stream/default_stream/stream``.

Sequence parallel with the local spec needs no patch: the GQLA local spec uses
``gqla_megatron.megatron.layer.SPTorchNorm`` instead of Megatron's ``WrappedTorchNorm``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_MODE = None


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def needed() -> bool:
    return not torch.cuda.is_available()


class _DropMessage(logging.Filter):
    def __init__(self, text):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


def apply() -> bool:
    """Apply the always-needed patches when CUDA is absent. Returns True if they are active."""
    global _APPLIED
    if _APPLIED or not needed():
        return _APPLIED
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *a, **k: None

    def get_rng_state(device=None):
        return torch.get_rng_state()

    torch.cuda.get_rng_state = get_rng_state
    torch.cuda.random.get_rng_state = get_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    # With the CUDA stream aliased to the CPU one, Megatron's "CPU RNG state changed within GPU
    # RNG context" warning fires on every dropout fork although behaviour is correct.
    logging.getLogger(mrandom.__name__).addFilter(_DropMessage("CPU RNG state changed"))

    if not have_transformer_engine():
        from megatron.core.transformer import multi_latent_attention

        multi_latent_attention.HAVE_TE = False
    _APPLIED = True
    return True


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class _FakeStream:
    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return None

    def wait_event(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def enable_cuda_to_cpu_mode() -> None:
    """Opt-in: map literal CUDA devices to the CPU process-wide (see module docstring)."""
    global _MODE
    if _MODE is not None or not needed():
        return
    apply()
    stream = _FakeStream()
    torch.cuda.current_stream = lambda *a, **k: stream
    torch.cuda.default_stream = lambda *a, **k: stream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.Stream = lambda *a, **k: _FakeStream()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
