"""benchmarks/gpu_check.py end to end on two logical CPU devices: the figures it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_a_mirrored_mixed_precision_fit_on_two_logical_cpus(tmp_path):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   "CUDA_VISIBLE_DEVICES": ""}  # the CPU path even on a machine with a GPU
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--arch", "unet", "--encoder", "resnet18",
               "--decoder-filters", "16,8,8,8,8", "--tile-size", "32", "--batch-size", "1", "--steps", "2",
               "--warmup", "1", "--tiles", "8", "--logical-cpus", "2", "--records-cache", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    def figure(pattern: str) -> str:
        match = re.search(pattern, out, re.MULTILINE)
        assert match, f"{pattern!r} not in:\n{out}"
        return match.group(1)

    assert figure(r"^devices: (.+)$") == "2 logical CPU devices (no GPU visible)"
    assert int(figure(r"^replicas: (\d+)$")) == 2
    assert figure(r"^policy: (\S+)") == "mixed_float16"
    assert "model output float32, optimizer LossScaleOptimizerV3" in figure(r"^policy: .*\((.+)\)$")
    # XLA was asked for; TensorFlow cannot run it over logical CPU devices, and the script says so.
    assert figure(r"^xla: (.+)$").startswith("off (requested, but XLA cannot run a MirroredStrategy over logical")
    assert 0 < float(figure(r"^loss: ([\d.]+)$")) < 1
    step, cached = (float(value) for value in re.search(
        r"^step time: ([\d.]+) ms median with the input pipeline \(CPU [\d.]+ s per step\), ([\d.]+) ms on one "
        r"cached batch", out, re.MULTILINE).groups())
    assert step > 0 and cached > 0
    per_device, in_all = (float(v) for v in re.search(r"^images/s per device: ([\d.e+-]+) \(([\d.e+-]+) in all\)$",
                                                          out, re.MULTILINE).groups())
    # Global batch 2 (1 per replica): images/s in all is 2 / step time, per device half of it.
    assert per_device > 0 and in_all == pytest.approx(2 / (step / 1000), rel=6e-3)
    assert per_device == pytest.approx(in_all / 2, rel=6e-3)
    share = float(figure(r"^input pipeline share: ([\d.]+)% of the step"))
    assert 0 <= share < 100 and share == pytest.approx(max(0.0, 100 * (1 - cached / step)), abs=0.2)
    assert float(figure(r"the pipeline alone: ([\d.]+) tiles/s")) > 0
    assert float(figure(r"^peak memory: (\d+) MiB peak RSS of the process \(no GPU")) > 100
    # The synthetic records are rts-tf records: 8 tiles of 32 px in two regions.
    manifest = (tmp_path / "tiles8_32px" / "manifest.json").read_text()
    assert '"tile_size": 32' in manifest and sum(1 for _ in (tmp_path / "tiles8_32px").rglob("*.tfrecord")) == 4



@pytest.mark.slow
def test_gpu_check_compiles_the_mixed_precision_step_with_xla_on_one_device(tmp_path):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--arch", "unet", "--encoder", "resnet18",
               "--decoder-filters", "16,8,8,8,8", "--tile-size", "32", "--batch-size", "2", "--steps", "2",
               "--warmup", "1", "--tiles", "8", "--logical-cpus", "1", "--records-cache", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^replicas: 1$", result.stdout, re.MULTILINE)
    assert re.search(r"^policy: mixed_float16 \(model output float32", result.stdout, re.MULTILINE)
    assert re.search(r"^xla: on$", result.stdout, re.MULTILINE)
    assert 0 < float(re.search(r"^loss: ([\d.]+)$", result.stdout, re.MULTILINE).group(1)) < 1
