"""Gates (--fail-if, --max-accuracy-drop with --labels) and recipe files (--config)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from onnxslim_opt.errors import OptimizeError
from onnxslim_opt.gates import Gate, evaluate, metrics_of, parse_gate

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = MODELS / "digits_cnn.onnx"
CLI = [sys.executable, "-m", "onnxslim_opt.cli"]


def run_cli(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_parse_gate():
    assert parse_gate(" cosine < 0.999 ") == Gate("cosine < 0.999", "cosine", "<", 0.999)
    assert parse_gate("latency_ratio_cuda>=1.05").metric == "latency_ratio_cuda"
    for bad in ("cosine", "cosine<<1", "speed>1"):
        with pytest.raises(OptimizeError):
            parse_gate(bad)


def test_metrics_and_evaluation_from_a_report():
    report = {
        "validation": {"status": "passed", "outputs": [
            {"cosine": 0.9995, "max_abs_diff": 1e-3, "max_rel_diff": 1e-2, "top1_agreement": 0.98},
            {"cosine": 1.0, "max_abs_diff": 2e-3, "max_rel_diff": 0.0, "top1_agreement": None}]},
        "before": {"nodes": 10, "weight_bytes": 100, "file_bytes": 200},
        "after": {"nodes": 5, "weight_bytes": 50, "file_bytes": 150},
        "benchmark": {"errors": [{"provider": "cuda", "error": "x"}], "results": [
            {"provider": "cpu", "ratios": {"p50_ms": 0.9, "throughput_per_s": 1.1, "session_seconds": 0.5}},
            {"provider": "cpu", "ratios": {"p50_ms": 1.2, "throughput_per_s": 0.8, "session_seconds": 0.7}}]},
        "accuracy": {"original": 0.99, "optimized": 0.97},
    }
    m = metrics_of(report)
    assert m["cosine"] == 0.9995 and m["max_abs_diff"] == 2e-3 and m["top1_agreement"] == 0.98
    assert m["nodes_ratio"] == 0.5 and m["size_ratio"] == 0.75 and m["weights_ratio"] == 0.5
    assert m["latency_ratio"] == m["latency_ratio_cpu"] == 1.2 and m["throughput_ratio"] == 0.8
    assert m["benchmark_errors"] == 1 and m["accuracy_drop"] == pytest.approx(0.02)
    result = evaluate([parse_gate("cosine<0.999"), parse_gate("latency_ratio>1.1"), parse_gate("latency_ratio_cuda>1")], m)
    assert [c["passed"] for c in result["checks"]] == [True, False, False] and not result["passed"]
    assert result["checks"][1]["value"] == 1.2 and "not measured" in result["checks"][2]["message"]


def test_failing_gate_exits_1_nothing_written_and_lists_each_gate(tmp_path):
    out = tmp_path / "o.onnx"
    proc = run_cli(DIGITS, "-o", out, "--fail-if", "cosine<0.999", "--fail-if", "nodes_ratio>0.5",
                   "--report", tmp_path / "r.json")
    assert proc.returncode == 1 and not out.exists()
    assert "gate(s) failed" in proc.stderr and "nodes_ratio>0.5" in proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    checks = {c["gate"]: c for c in report["gates"]["checks"]}
    assert checks["cosine<0.999"]["passed"] and not checks["nodes_ratio>0.5"]["passed"]
    assert checks["nodes_ratio>0.5"]["value"] == report["metrics"]["nodes_ratio"] == pytest.approx(21 / 30)
    assert report["gates"]["passed"] is False


def test_force_writes_but_the_gate_still_fails(tmp_path):
    out = tmp_path / "o.onnx"
    proc = run_cli(DIGITS, "-o", out, "--fail-if", "nodes_ratio>0.5", "--force")
    assert proc.returncode == 1 and out.exists()


def test_gate_on_unmeasured_metric_fails(tmp_path):
    proc = run_cli(DIGITS, "-o", tmp_path / "o.onnx", "--fail-if", "latency_ratio>1.0")
    assert proc.returncode == 1 and "latency_ratio was not measured" in proc.stderr


def test_accuracy_gate_with_labels(tmp_path):
    proc = run_cli(DIGITS, "-o", tmp_path / "o.onnx", "--labels", MODELS / "digits_test.npz",
                   "--max-accuracy-drop", "0.001", "--report", "-")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    acc = report["accuracy"]
    assert acc["samples"] == 450 and acc["output"] == "logits"
    assert acc["original"] == pytest.approx(0.9911, abs=1e-4) and acc["optimized"] == acc["original"]
    assert report["metrics"]["accuracy_drop"] == 0.0 and report["gates"]["passed"]
    assert report["gates"]["checks"][0]["gate"] == "accuracy_drop>0.001"


def test_accuracy_drop_needs_labels(tmp_path):
    proc = run_cli(DIGITS, "-o", tmp_path / "o.onnx", "--max-accuracy-drop", "0.01")
    assert proc.returncode == 2 and "--labels" in proc.stderr


def test_config_file_options_and_overrides(tmp_path):
    out = tmp_path / "from_config.onnx"
    (tmp_path / "optimize.toml").write_text(f'''
model = "{DIGITS}"
output = "{out}"
skip = ["fuse_conv_bn"]
samples = 2
fail-if = ["cosine<0.999"]
fold_size_limit = "2MB"
[pass_options.fold_constants]
growth_limit = 4096
''')
    proc = run_cli("--config", tmp_path / "optimize.toml", "--samples", "1", "--fail-if", "nodes_ratio>1.0",
                   "--report", "-")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert out.exists() and report["output"] == str(out)
    assert report["validation"]["samples"] == 1  # the flag overrides the file
    assert "fuse_conv_bn" not in {p["name"] for p in report["passes"]}
    assert [c["gate"] for c in report["gates"]["checks"]] == ["cosine<0.999", "nodes_ratio>1.0"]


@pytest.mark.parametrize("content,message", [
    ("unknown_flag = 1", "unknown option 'unknown_flag'"),
    ("no-validate = 3", "is a switch"),
    ("samples = 'many'", "bad value"),
    ("samples = [", "not valid TOML"),
    ("[pass_options.fold_constants]\nno_such_option = 1", "has no option(s)"),
])
def test_bad_config_exit_2(tmp_path, content, message):
    (tmp_path / "c.toml").write_text(content + "\n")
    proc = run_cli(DIGITS, "-o", tmp_path / "o.onnx", "--config", tmp_path / "c.toml")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_config_file_missing(tmp_path):
    proc = run_cli(DIGITS, "--config", tmp_path / "nope.toml")
    assert proc.returncode == 2 and "--config file not found" in proc.stderr
