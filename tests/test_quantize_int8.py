"""INT8 QDQ quantization for ONNX Runtime CPU: accuracy, fusion in ORT's optimized graph, placement."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnxslim_opt.api import OptimizeOptions, run
from onnxslim_opt.errors import OptimizeError
from passes._qdq_check import ort_optimized_ops
from passes.quantize_int8 import QuantizeInt8, QuantizeOptions
from util import MODELS, REPO, make_model, tensor, vinfo


@pytest.fixture(scope="module")
def digits():
    d = np.load(MODELS / "digits_test.npz")
    return d["input"], d["label"]


@pytest.fixture(scope="module")
def calib(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("calib") / "calib64.npz"
    np.savez(path, input=digits[0][:64])
    return path


def quantize(model, tmp_path, calibration=None, random=0, **options):
    out = tmp_path / "q.onnx"
    opts = OptimizeOptions(extra_passes=[QuantizeInt8(QuantizeOptions(**options))],
                           calibration=str(calibration) if calibration else None, calibration_random=random)
    outcome = run(model, out, opts)
    stats = next(p for p in outcome.report.passes if p["name"] == "quantize_int8")
    return onnx.load(out), outcome.report, stats


def accuracy(model, x, y) -> float:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model), so,
                             providers=["CPUExecutionProvider"])
    return float((s.run(None, {"input": x})[0].argmax(1) == y).mean())


def test_digits_int8_keeps_accuracy_and_fuses_every_conv_add_gemm(tmp_path, digits, calib):
    x, y = digits
    q, report, stats = quantize(str(MODELS / "digits_cnn.onnx"), tmp_path, calib)
    base = accuracy(MODELS / "digits_cnn.onnx", x, y)
    assert accuracy(q, x, y) >= base - 0.01
    ops, _ = ort_optimized_ops(q)
    assert ops["Conv"] == ops["FusedConv"] == 0 and ops["QLinearConv"] == 8
    assert ops["Add"] == 0 and ops["QLinearAdd"] == 3
    assert ops["Gemm"] == 0 and ops["QGemm"] == 1
    assert ops["QLinearGlobalAveragePool"] == 1
    assert "Conv 8/8" in " ".join(stats["notes"]) and "Add 3/3" in " ".join(stats["notes"])
    assert report.validation["status"] == "fidelity"
    _assert_each_dq_feeds_one_node(q)
    assert Counter(n.op_type for n in q.graph.node)["Relu"] == 0  # absorbed into the Qs
    assert report.after.weight_bytes < report.before.weight_bytes / 3


def _assert_each_dq_feeds_one_node(model):
    readers = Counter(i for n in model.graph.node for i in n.input)
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            assert readers[n.output[0]] == 1, n.name


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_each_calibration_method(tmp_path, digits, calib, method):
    x, y = digits
    q, _, stats = quantize(str(MODELS / "digits_cnn.onnx"), tmp_path, calib, method=method, check_fusion=False)
    assert stats["rewrites"] == 13 and accuracy(q, x, y) >= 0.97


def test_cache_is_written_then_reused(tmp_path, calib):
    cache = tmp_path / "ranges.json"
    first, _, _ = quantize(str(MODELS / "digits_cnn.onnx"), tmp_path, calib, cache=str(cache), check_fusion=False)
    assert cache.exists()
    # reused without calibration data: same model
    second, _, _ = quantize(str(MODELS / "digits_cnn.onnx"), tmp_path, None, cache=str(cache), check_fusion=False)
    assert [t.raw_data for t in first.graph.initializer] == [t.raw_data for t in second.graph.initializer]


# ----------------------------------------------------------------------------- placement
def _mixed_model():
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p1", "w3", "b3"], ["c3"], name="dwconv", pads=[1, 1, 1, 1], group=4),
        helper.make_node("Clip", ["c3", "zero", "six"], ["r3"], name="relu6"),
        helper.make_node("Conv", ["p1", "w2", "b4"], ["c4"], name="conv_shared_w", pads=[1, 1, 1, 1]),  # shares w2
        helper.make_node("Clip", ["c4", "m1", "one"], ["r4"], name="clip_neg"),  # not redundant under a uint8 Q
        helper.make_node("Add", ["c2", "r4"], ["a"], name="add"),
        helper.make_node("Concat", ["a", "r3"], ["cat"], name="concat", axis=1),
        helper.make_node("Reshape", ["cat", "shp"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "wm"], ["mm"], name="matmul"),
        helper.make_node("Relu", ["mm"], ["mr"], name="relu2"),
        helper.make_node("Gemm", ["mr", "wg", "bg"], ["out"], name="gemm", transB=1),
        helper.make_node("Conv", ["p1", "w5"], ["side"], name="conv_to_output"),
    ]
    inits = [tensor("w1", w(4, 3, 3, 3)), tensor("b1", w(4)), tensor("w2", w(4, 4, 3, 3)), tensor("w3", w(4, 1, 3, 3)),
             tensor("b3", w(4)), tensor("b4", w(4)), tensor("zero", np.array(0, np.float32)), tensor("six", np.array(6, np.float32)),
             tensor("m1", np.array(-1, np.float32)), tensor("one", np.array(1, np.float32)),
             tensor("shp", np.array([0, -1], np.int64)), tensor("wm", w(128, 16)), tensor("wg", w(10, 16)),
             tensor("bg", w(10)), tensor("w5", w(2, 4, 1, 1))]
    return make_model(nodes, [vinfo("x", ["N", 3, 8, 8])], [vinfo("out", ["N", 10]), vinfo("side", ["N", 2, 4, 4]),
                                                            vinfo("r1", ["N", 4, 8, 8])], inits)


def test_placement_fuses_conv_depthwise_concat_matmul_gemm(tmp_path):
    model = _mixed_model()
    q, report, stats = quantize(model, tmp_path, random=32)
    ops, _ = ort_optimized_ops(q)
    assert ops["QLinearConv"] == 4 and ops["QLinearAdd"] == 1 and ops["QLinearConcat"] == 1
    assert ops["QLinearMatMul"] == 1 and ops["QGemm"] == 1
    assert ops["Gemm"] == ops["MatMul"] == ops["Add"] == 0
    assert ops["Conv"] + ops["FusedConv"] == 1  # conv_to_output
    reasons = {e["node"]: e["reason"] for e in stats["rejection_examples"]}
    assert "graph output" in reasons["conv_to_output"]
    got = Counter(n.op_type for n in q.graph.node)
    assert got["Clip"] == 1 and got["Relu"] == 1  # relu6 and relu2 absorbed; clip_neg and relu1 (graph output) kept
    assert [o.name for o in q.graph.output] == ["out", "side", "r1"]
    assert any("random data" in n for n in stats["notes"])
    _assert_each_dq_feeds_one_node(q)
    assert report.validation["outputs"][0]["cosine"] > 0.995
    assert min(o["cosine"] for o in report.validation["outputs"]) > 0.995
    # graph output r1 is the exact float Relu of conv1's (dequantized) output, not a re-quantized value
    assert next(n for n in q.graph.node if n.output[0] == "r1").op_type == "Relu"


def test_exclude_by_name_op_type_and_regex(tmp_path):
    q, _, stats = quantize(_mixed_model(), tmp_path, random=8, exclude="gemm,MatMul,conv[12]", check_fusion=False)
    reasons = Counter(e["node"] for e in stats["rejection_examples"] if "exclude" in e["reason"])
    assert set(reasons) == {"gemm", "matmul", "conv1", "conv2"}
    quantized_weights = {n.input[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    assert not any(name.startswith(("gemm", "matmul", "conv1_", "conv2_")) for name in quantized_weights)


def test_shared_weight_gets_one_int8_copy_per_conv_and_float_weights_go(tmp_path):
    q, _, _ = quantize(_mixed_model(), tmp_path, random=8, check_fusion=False)
    names = {t.name for t in q.graph.initializer}
    assert {"w1", "w2", "w3", "wm", "wg"}.isdisjoint(names)  # float weights replaced by int8 ones
    weights = {t.name for t in q.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_weight_quantized")}
    assert {"conv2_weight_quantized", "conv_shared_w_weight_quantized"} <= weights and len(weights) == 6
    bias = [t.name for t in q.graph.initializer
            if t.data_type == onnx.TensorProto.INT32 and t.name.endswith("_bias_quantized")]
    assert len(bias) == 4  # conv1, dwconv, conv_shared_w, gemm


def test_pass_errors_are_user_errors(tmp_path):
    with pytest.raises(OptimizeError, match="TensorRT"):
        quantize(_mixed_model(), tmp_path, random=4, target="tensorrt")
    with pytest.raises(OptimizeError, match="calibration"):
        quantize(_mixed_model(), tmp_path)
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, 9, 9), np.float32))
    with pytest.raises(OptimizeError, match=r"'x'.*\[1, 3, 8, 8\]"):
        quantize(_mixed_model(), tmp_path, tmp_path / "bad.npz")


# ----------------------------------------------------------------------------- CLI errors
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxslim_opt.cli", str(MODELS / "digits_cnn.onnx"), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("setup, flags, message", [
    (lambda d: np.savez(d / "bad.npz", input=np.zeros((4, 3, 32, 32), np.float32)),
     ["--calibration", "{d}/bad.npz"], "[1, 1, 32, 32]"),
    (lambda d: np.savez(d / "bad.npz", images=np.zeros((4, 1, 32, 32), np.float32)),
     ["--calibration", "{d}/bad.npz"], "no array for input 'input'"),
    (lambda d: None, ["--calibration", "{d}/missing.npz"], "does not exist"),
    (lambda d: None, [], "needs calibration data"),
    (lambda d: None, ["--calibration-random", "4", "--target", "tensorrt"], "not implemented"),
])
def test_cli_calibration_errors_are_one_line_exit_2(tmp_path, setup, flags, message):
    setup(tmp_path)
    r = _cli("--quantize", "int8", "-o", str(tmp_path / "o.onnx"), *[f.format(d=tmp_path) for f in flags])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("optimize: error:")
    assert not (tmp_path / "o.onnx").exists()
