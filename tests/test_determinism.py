"""Pipelines need reproducible output: same input and options give the same bytes, and the
streams stay clean (JSON alone on stdout with `--report -`, nothing on stderr with --quiet)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import onnxslim_opt

MODELS = Path(__file__).resolve().parent.parent / "models"
CLI = [sys.executable, "-m", "onnxslim_opt.cli"]


@pytest.mark.parametrize("name", sorted(p.name for p in MODELS.glob("*.onnx")))
def test_optimizing_twice_gives_identical_bytes(name, tmp_path):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnxslim_opt.run(MODELS / name, first, keep_model=False)
    onnxslim_opt.run(MODELS / name, second, keep_model=False)
    assert first.read_bytes() == second.read_bytes()


def test_streams_report_on_stdout_quiet_and_no_progress_off_a_terminal(tmp_path):
    model = MODELS / "digits_cnn.onnx"
    proc = subprocess.run(CLI + [str(model), "-o", str(tmp_path / "o.onnx"), "--report", "-"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["schema_version"] == "1.1"  # stdout holds the JSON and nothing else
    assert "validation: passed" in proc.stderr and "\r" not in proc.stderr  # no progress line when piped
    quiet = subprocess.run(CLI + [str(model), "-o", str(tmp_path / "q.onnx"), "--quiet", "--benchmark", "cpu",
                                  "--runs", "3", "--warmup", "1"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
