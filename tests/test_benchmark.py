"""--benchmark: CPU figures end to end, interleaving, batches, and providers that cannot run here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxslim_opt import benchmark as bm
from onnxslim_opt.specs import resolve_input_specs

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = MODELS / "digits_cnn.onnx"
CLI = [sys.executable, "-m", "onnxslim_opt.cli"]


def run_cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "digits.opt.onnx"
    proc = run_cli(DIGITS, "-o", out, "--benchmark", "cpu", "--batch", "1,4", "--runs", "30", "--warmup", "3",
                   "--threads", "1", "--report", "-")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_cpu_benchmark_figures_present_and_sane(cpu_report):
    report, stderr = cpu_report
    assert report["schema_version"] == "1.1"
    section = report["benchmark"]
    assert section["errors"] == [] and section["batches"] == [1, 4] and section["runs"] == 30
    assert [(r["provider"], r["batch"], r["threads"]) for r in section["results"]] == [("cpu", 1, 1), ("cpu", 4, 1)]
    for r in section["results"]:
        for label in ("original", "optimized"):
            f = r[label]
            assert f["runs"] == 30 and f["providers"] == ["CPUExecutionProvider"]
            assert set(f["node_placement"]) == {"CPUExecutionProvider"} and f["node_placement"]["CPUExecutionProvider"] > 0
            assert 0 < f["min_ms"] <= f["p50_ms"] <= f["p90_ms"] <= f["p99_ms"] < 1000
            assert f["session_seconds"] > 0 and f["first_run_seconds"] > 0 and f["io_binding"] is False
            assert f["throughput_per_s"] == pytest.approx(r["batch"] * 1000 / f["mean_ms"], rel=1e-6)
            assert f["peak_rss_delta_bytes"] is None or f["peak_rss_delta_bytes"] >= 0
        assert r["ratios"]["p50_ms"] == pytest.approx(r["optimized"]["p50_ms"] / r["original"]["p50_ms"])
        # interleaved: both models' timed runs span the same stretch of time
        (a0, a1), (b0, b1) = r["original"]["timed_window_s"], r["optimized"]["timed_window_s"]
        assert a0 < b1 and b0 < a1
        overlap = min(a1, b1) - max(a0, b0)
        assert overlap > 0.8 * max(a1 - a0, b1 - b0)
    assert report["metrics"]["latency_ratio"] == max(r["ratios"]["p50_ms"] for r in section["results"])
    assert "ratio optimized/original" in stderr and "p50 ms" in stderr


def test_interleaving_schedule_is_abba(monkeypatch, tmp_path):
    labels = []
    monkeypatch.setattr(bm, "_run_once", lambda m: labels.append(m.label) or 0.001)
    monkeypatch.setattr(bm, "_open", lambda m, *a: {"session_seconds": 0.01, "peak_rss_delta_bytes": None})
    entry = bm._measure("cpu", 0, 1, {}, DIGITS, DIGITS, bm.BenchmarkOptions(runs=4), str(tmp_path), 0.0)
    short = "".join("A" if x == "original" else "B" for x in labels)
    assert short == "ABBAABBA"
    assert entry["original"]["runs"] == entry["optimized"]["runs"] == 4


def test_fixed_batch_model_runs_only_its_own_batch(tmp_path):
    proc = run_cli(MODELS / "tf_style_nhwc.onnx", "-o", tmp_path / "o.onnx", "--benchmark", "cpu", "--batch", "1,8",
                   "--runs", "5", "--warmup", "1", "--report", "-")
    assert proc.returncode == 0, proc.stderr
    section = json.loads(proc.stdout)["benchmark"]
    assert [r["batch"] for r in section["results"]] == [1]
    assert any("fixed batch of 1" in n for n in section["notes"])


def test_missing_gpu_providers_are_errors_not_numbers(tmp_path):
    proc = run_cli(DIGITS, "-o", tmp_path / "o.onnx", "--benchmark", "cpu,cuda,tensorrt", "--runs", "5",
                   "--warmup", "1", "--trt-fp16", "--trt-cache", tmp_path / "cache", "--report", "-")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    section = report["benchmark"]
    assert {r["provider"] for r in section["results"]} == {"cpu"}
    errors = {e["provider"]: e["error"] for e in section["errors"]}
    assert "onnxruntime-gpu" in errors["cuda"]
    assert "onnxruntime-gpu" in errors["tensorrt"] and "TensorRT" in errors["tensorrt"] and "libnvinfer" in errors["tensorrt"]
    assert "latency_ratio_cuda" not in report["metrics"] and report["metrics"]["benchmark_errors"] == 2
    assert "benchmark error (cuda)" in proc.stderr
    # a gate on a provider that produced no figure fails the run
    gated = run_cli(DIGITS, "-o", tmp_path / "g.onnx", "--benchmark", "cuda", "--runs", "5", "--warmup", "1",
                    "--fail-if", "latency_ratio_cuda>1.0")
    assert gated.returncode == 1 and not (tmp_path / "g.onnx").exists()
    assert "not measured" in gated.stderr


def test_silent_cpu_fallback_is_detected(monkeypatch):
    """Pretend CUDA is available: ORT then falls back to the CPU, which must be reported as an error."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    model = onnx.load(DIGITS)
    specs, _ = resolve_input_specs(model, {})
    with pytest.warns(UserWarning):
        section = bm.benchmark(DIGITS, DIGITS, specs, bm.BenchmarkOptions(providers=["cuda"], runs=3, warmup=1))
    assert section["results"] == []
    assert "fell back" in section["errors"][0]["error"] and "No cuda figures" in section["errors"][0]["error"]


def test_placement_check():
    assert bm.check_placement("cpu", ["CPUExecutionProvider"], {"CPUExecutionProvider": 5}) is None
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert bm.check_placement("cuda", cuda, {"CUDAExecutionProvider": 4, "CPUExecutionProvider": 1}) is None
    assert "ran none" in bm.check_placement("cuda", cuda, {"CPUExecutionProvider": 5})
    assert "failed to load" in bm.check_placement("tensorrt", cuda, {"CUDAExecutionProvider": 5})


def test_tensorrt_options_passed_through(tmp_path):
    opts = bm.BenchmarkOptions(trt_fp16=True, trt_int8=True, trt_cache=str(tmp_path / "c"), trt_workspace=1 << 30)
    chain = bm.provider_chain("tensorrt", opts)
    name, trt = chain[0]
    assert name == "TensorrtExecutionProvider" and chain[1][0] == "CUDAExecutionProvider"
    assert trt["trt_fp16_enable"] and trt["trt_int8_enable"] and trt["trt_max_workspace_size"] == 1 << 30
    assert trt["trt_engine_cache_enable"] and trt["trt_timing_cache_enable"]
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == str((tmp_path / "c").resolve())
    assert (tmp_path / "c").is_dir()


def test_cuda_io_binding_keeps_copies_out(monkeypatch):
    """The IO-binding path cannot run without a GPU: check the calls it makes on a stand-in session."""
    import onnxruntime as ort

    calls = []

    class Binding:
        def bind_ortvalue_input(self, name, value):
            calls.append(("in", name, value))

        def bind_output(self, name, *device):
            calls.append(("out", name) + device)

    class Out:
        def __init__(self, name, type_):
            self.name, self.type = name, type_

    class Session:
        def io_binding(self):
            return Binding()

        def get_outputs(self):
            return [Out("logits", "tensor(float)"), Out("probs", "seq(map(int64,tensor(float)))")]

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(lambda arr, dev, i: ("ortvalue", dev, i)))
    bm._bind(Session(), {"x": np.zeros(3, np.float32)})
    assert calls == [("in", "x", ("ortvalue", "cuda", 0)), ("out", "logits", "cuda", 0), ("out", "probs")]


@pytest.mark.parametrize("text,error", [("cpu,npu", "unknown --benchmark provider"), ("", None)])
def test_parse_providers(text, error):
    if error:
        with pytest.raises(Exception, match=error):
            bm.parse_providers(text)
    else:
        assert bm.parse_providers("CPU, trt,gpu,cpu") == ["cpu", "tensorrt", "cuda"]
