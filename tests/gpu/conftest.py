"""GPU-only tests (`make test-gpu` on a machine with CUDA; `pytest tests/gpu` elsewhere skips each one and
says why). The helpers of the CPU suite are importable from here."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: test_learner's helpers


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    why = (f"no CUDA device (torch {torch.__version__}, cuda build: {torch.version.cuda or 'none'}): "
           "run `make test-gpu` on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=why))
