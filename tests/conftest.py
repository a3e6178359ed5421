"""Shared fixtures. Tiers (markers, see setup.cfg): unmarked = CPU unit; dist = CPU multi-rank
(gloo, run under torchrun); gpu / multigpu = CUDA (skip with a reason on CPU)."""

import importlib.util

import pytest
import torch

HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None
if HAVE_MEGATRON:
    import gqla_megatron.megatron  # noqa: F401  (applies the CPU patches before any megatron import)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the H200 device; see tests/gpu)")
    for item in items:
        if ("gpu" in item.keywords or "multigpu" in item.keywords) and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
