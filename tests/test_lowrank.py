"""lowrank: exact decompositions at full rank, rank rules, refusals, the measured rule on digits."""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper

from onnxslim_opt.errors import OptimizeError
from onnxslim_opt.pass_api import PassContext
from passes import _lowrank_decomp as D
from passes.lowrank import (LowRankFactorize, LowRankOptions, _concrete_shapes, analyze, build_edit, decompose,
                            energy_for_ratio, parse_spec)
from tests.util import MODELS, assert_same_outputs, make_model, ops, optimize_with, pass_stats, tensor, vinfo

RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def conv_model(w_shape, in_shape, bias=True, **attrs):
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [tensor("w", _w(*w_shape))] + ([tensor("b", _w(w_shape[0]))] if bias else [])
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    return make_model([node], [vinfo("x", in_shape)], [vinfo("y", ["d%d" % i for i in range(len(in_shape))])], inits)


def factor_full(model, method):
    """Factorize the model's first layer at full rank through analyze/decompose/build_edit."""
    graph = gs.import_onnx(model)
    shapes = _concrete_shapes(graph, PassContext(opset=17))
    layer = analyze(graph.nodes[0], shapes, method if method != "matrix" else "auto")
    assert not isinstance(layer, str), layer
    build_edit(graph, layer, decompose(layer, method, D.full_ranks(method, layer.weight.shape))).apply(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    onnx.checker.check_model(out)
    return out


CONV_CASES = [
    ((8, 6, 3, 3), [1, 6, 9, 9], dict(pads=[1, 1, 1, 1])),
    ((8, 6, 3, 3), [2, 6, 10, 11], dict(strides=[2, 2], pads=[0, 1, 1, 2])),
    ((8, 6, 3, 3), [1, 6, 12, 12], dict(dilations=[2, 2], pads=[2, 2, 2, 2])),
    ((8, 6, 3, 5), [1, 6, 11, 13], dict(strides=[2, 1], dilations=[1, 2], pads=[1, 2, 0, 1])),
    ((8, 6, 3, 3), [1, 6, 11, 10], dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    ((8, 6, 4, 4), [1, 6, 11, 10], dict(auto_pad="SAME_LOWER", strides=[3, 2])),
    ((8, 6, 3, 3), [1, 6, 9, 9], dict(auto_pad="VALID", strides=[2, 2])),
]


@pytest.mark.parametrize("method", ["tucker2", "svd", "spatial"])
@pytest.mark.parametrize("w_shape,in_shape,attrs", CONV_CASES)
def test_conv_full_rank_is_exact(method, w_shape, in_shape, attrs):
    model = conv_model(w_shape, in_shape, **attrs)
    out = factor_full(model, method)
    assert ops(out).count("Conv") == (3 if method == "tucker2" else 2)
    assert_same_outputs(model, out, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["tucker2", "svd"])
def test_conv1d_and_no_bias_full_rank(method):
    model = conv_model((8, 4, 3), [2, 4, 20], bias=False, strides=[2], pads=[1, 0], dilations=[2])
    assert_same_outputs(model, factor_full(model, method), rtol=1e-3, atol=1e-4)


def test_conv_1x1_strided_full_rank():
    model = conv_model((16, 8, 1, 1), [1, 8, 9, 9], strides=[2, 2], pads=[1, 1, 0, 0])
    layer = analyze(gs.import_onnx(model).nodes[0], {"x": [1, 8, 9, 9]}, "auto")
    assert layer.methods == ("svd",)
    out = factor_full(model, "svd")
    assert ops(out) == ["Conv", "Conv"]
    assert_same_outputs(model, out, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,c_shape", [
    (0, 0, 1.0, 1.0, [12]), (0, 1, 0.5, 2.0, [1, 12]), (1, 1, 1.5, 0.25, [12]), (1, 0, 1.0, 1.0, None)])
def test_gemm_full_rank_is_exact(trans_a, trans_b, alpha, beta, c_shape):
    x_shape = [10, 5] if trans_a else [5, 10]
    b = _w(12, 10) if trans_b else _w(10, 12)
    inits = [tensor("B", b)] + ([tensor("C", _w(*c_shape))] if c_shape else [])
    node = helper.make_node("Gemm", ["x", "B"] + (["C"] if c_shape else []), ["y"], alpha=alpha, beta=beta,
                            transA=trans_a, transB=trans_b)
    model = make_model([node], [vinfo("x", x_shape)], [vinfo("y", ["a", "b"])], inits)
    out = factor_full(model, "matrix")
    assert ops(out) == ["Gemm", "Gemm"]
    assert_same_outputs(model, out, rtol=1e-3, atol=1e-4)


def test_matmul_nd_input_full_rank_is_exact():
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vinfo("x", [2, 3, 16])], [vinfo("y", [2, 3, 24])],
                       [tensor("W", _w(16, 24))])
    out = factor_full(model, "matrix")
    assert ops(out) == ["MatMul", "MatMul"]
    assert_same_outputs(model, out, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- rank rules
def test_energy_and_rounding_rules():
    s = np.sqrt(np.array([50, 30, 10, 5, 3, 2], float))  # energies 0.5, 0.8, 0.9, 0.95, 0.98, 1
    assert [D.energy_rank(s, e) for e in (0.5, 0.81, 0.95, 0.96, 1.0)] == [1, 3, 4, 5, 6]
    assert D.round_rank(3, 64) == 8 and D.round_rank(9, 64) == 16 and D.round_rank(60, 61) == 61
    assert D.round_rank(3, 64, multiple=1) == 3


def _mlp(n=64, rows=4):
    w = _w(n, 8) @ _w(8, n) + 0.01 * _w(n, n)  # nearly rank 8
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"]),
             helper.make_node("Mul", ["W", "two"], ["w2"])]  # the weight has a second reader
    return make_model(nodes, [vinfo("x", [rows, n])], [vinfo("y", [rows, n]), vinfo("w2", [n, n])],
                      [tensor("W", w), tensor("two", np.array(2, np.float32))])


def _run(model, run_options=None, **options):
    out, report = optimize_with(model, ["eliminate_dead_code"], **(run_options or {}),
                                extra_passes=[LowRankFactorize(LowRankOptions(measure=False, **options))])
    return out, pass_stats(report, "lowrank"), report


def test_low_rank_matmul_through_pipeline_keeps_shared_weight():
    model = _mlp()
    out, stats, report = _run(model, energy=0.99)
    assert ops(out).count("MatMul") == 2
    (layer,) = stats["details"]["layers"]
    assert layer["kept"] and layer["ranks"] == [8] and layer["macs_ratio"] == 0.25
    assert report.validation["status"] == "fidelity"
    assert_same_outputs(model, out, rtol=0.05, atol=0.5)
    feed = {"x": _w(4, 64)}
    w2 = [ort.InferenceSession(m.SerializeToString()).run(["w2"], feed)[0] for m in (model, out)]
    np.testing.assert_array_equal(w2[0], w2[1])  # the other reader of W is untouched


def test_chained_layers_stay_topologically_sorted():
    w1, w2 = _w(64, 8) @ _w(8, 64), _w(64, 8) @ _w(8, 64)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])]
    model = make_model(nodes, [vinfo("x", [4, 64])], [vinfo("y", [4, 64])], [tensor("W1", w1), tensor("W2", w2)])
    out, stats, _ = _run(model, energy=0.999)
    assert ops(out) == ["MatMul"] * 4 and stats["rewrites"] == 2
    assert_same_outputs(model, out, rtol=1e-2, atol=1e-2)


def test_break_even_guard_leaves_layer_alone():
    model = conv_model((8, 8, 3, 3), [1, 8, 8, 8], pads=[1, 1, 1, 1])  # rank 8 = full: no saving
    out, stats, _ = _run(model, energy=0.9, method="svd")
    assert ops(out) == ["Conv"]
    (layer,) = stats["details"]["layers"]
    assert not layer["kept"] and "break-even" in layer["reason"]


def test_error_budget_bounds_the_weight_error():
    u, v = np.linalg.qr(_w(32, 32))[0], np.linalg.qr(_w(32, 32))[0]
    w = (u * 0.8 ** np.arange(32)) @ v.T  # decaying spectrum
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vinfo("x", [4, 32])], [vinfo("y", [4, 32])],
                       [tensor("W", w.astype(np.float32))])
    out, stats, _ = _run(model, error=0.3, rank_multiple=1)
    (layer,) = stats["details"]["layers"]
    assert layer["kept"] and layer["ranks"][0] < 32
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    a, b = (weights[n.input[1]] for n in out.graph.node)
    assert np.linalg.norm(a @ b - w) / np.linalg.norm(w) <= 0.3


def test_ratio_targets_macs_of_eligible_layers():
    model = conv_model((64, 64, 3, 3), [1, 64, 8, 8], pads=[1, 1, 1, 1])
    layer = analyze(gs.import_onnx(model).nodes[0], {"x": [1, 64, 8, 8]}, "svd")
    e = energy_for_ratio([layer], 0.5, 8)
    assert 0 < e < 1
    out, stats, _ = _run(model, ratio=0.5, energy=None, method="svd")
    assert stats["details"]["macs_ratio"] <= 0.5 and ops(out) == ["Conv", "Conv"]


@pytest.mark.parametrize("node,inits,reason", [
    (helper.make_node("Conv", ["x", "w"], ["y"], group=2), [tensor("w", _w(16, 8, 3, 3))], "grouped conv"),
    (helper.make_node("ConvTranspose", ["x", "w"], ["y"]), [tensor("w", _w(16, 16, 3, 3))], "ConvTranspose"),
    (helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER"), [], "weight is not a constant"),
])
def test_refusals_carry_reasons(node, inits, reason):
    inputs = [vinfo("x", [1, 16, 8, 8])] + ([] if inits else [vinfo("w", [16, 16, 3, 3])])
    model = make_model([node], inputs, [vinfo("y", ["a", "b", "c", "d"])], inits)
    out, stats, _ = _run(model, energy=0.5)
    assert ops(out) == [node.op_type]
    assert reason in stats["details"]["layers"][0]["reason"]


def test_flags_and_errors():
    parser = argparse.ArgumentParser()
    LowRankFactorize.add_arguments(parser.add_argument_group("lowrank"))
    assert LowRankFactorize.from_arguments(parser.parse_args([])) is None
    p = LowRankFactorize.from_arguments(parser.parse_args(["--lowrank", "ratio=0.5", "--lowrank-method", "svd",
                                                           "--lowrank-runs", "3"]))
    assert (p.options.ratio, p.options.energy, p.options.method, p.options.runs) == (0.5, None, "svd", 3)
    assert parse_spec("energy=0.9,margin=0.1").margin == 0.1
    assert (parse_spec("error=0.2").error, parse_spec("error=0.2").energy) == (0.2, None)
    with pytest.raises(OptimizeError, match="energy=F, ratio=F or error=F"):
        parse_spec("rank=3")
    with pytest.raises(OptimizeError, match="not available"):
        LowRankFactorize.from_arguments(parser.parse_args(["--lowrank", "energy=0.9", "--target-ep", "nope"]))


# ----------------------------------------------------------------------------- digits CNN, measured
def _latency(model, x, runs=150):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        s.run(None, {"input": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, {"input": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _accuracy(model, x, y):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((s.run(None, {"input": x})[0].argmax(1) == y).mean())


@pytest.fixture(scope="module")
def digits():
    data = np.load(MODELS / "digits_test.npz")
    return onnx.load(MODELS / "digits_cnn.onnx"), data["input"], data["label"]


def test_digits_measured_rule(digits, tmp_path):
    model, x, y = digits
    baseline, _ = optimize_with(model)
    out, report = optimize_with(model, extra_passes=[LowRankFactorize(LowRankOptions(energy=0.95, runs=7))])
    onnx.checker.check_model(out)
    stats = pass_stats(report, "lowrank")
    layers = stats["details"]["layers"]
    assert len(layers) == 9  # 8 convs and the head Gemm, each with a verdict
    assert all("reason" in layer for layer in layers)
    assert all(layer["time_ratio"] <= 0.95 for layer in layers if layer["kept"])
    assert _accuracy(out, x, y) >= _accuracy(model, x, y) - 0.02
    # the measured rule: whole-model latency is not worse (noise allowance)
    assert min(_latency(out, x[:1]) / _latency(baseline, x[:1]) for _ in range(2)) < 1.1


def test_digits_data_driven_beats_weight_only_at_half_macs(digits, tmp_path):
    model, x, y = digits
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=x[:200])
    held_x, held_y = x[200:], y[200:]
    accs = {}
    for name, path in (("weights", None), ("data", str(calib))):
        out, report = optimize_with(model, calibration=path, extra_passes=[
            LowRankFactorize(LowRankOptions(ratio=0.5, energy=None, method="svd", measure=False))])
        assert pass_stats(report, "lowrank")["details"]["macs_ratio"] <= 0.5
        accs[name] = _accuracy(out, held_x, held_y)
    assert accs["data"] > accs["weights"] + 0.1


def _low_rank_conv_weight(c, k=3, rank=16):
    return (np.einsum("or,rihw->oihw", _w(c, rank), _w(rank, c, k, k)) / np.sqrt(rank * c * k * k)).astype(np.float32)


def test_measured_rule_keeps_a_real_win():
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], [vinfo("x", [1, 128, 16, 16])],
                       [vinfo("y", [1, 128, 16, 16])], [tensor("w", _low_rank_conv_weight(128)), tensor("b", _w(128))])
    out, report = optimize_with(model, ["eliminate_dead_code"],
                                extra_passes=[LowRankFactorize(LowRankOptions(energy=0.99, runs=5))])
    (layer,) = pass_stats(report, "lowrank")["details"]["layers"]
    assert layer["kept"], layer
    assert layer["time_ratio"] <= 0.95 and layer["macs_ratio"] < 0.5
    assert len(ops(out)) >= 2
    assert_same_outputs(model, out, rtol=1e-2, atol=1e-3)


def test_layers_inside_subgraphs_are_left_alone():
    w = tensor("W", _w(32, 4) @ _w(4, 32))
    body = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["z"])], "then", [], [vinfo("z", [4, 32])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z2"])], "else", [], [vinfo("z2", [4, 32])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other)
    model = make_model([node], [vinfo("c", [], onnx.TensorProto.BOOL), vinfo("x", [4, 32])], [vinfo("y", [4, 32])], [w])
    out, stats, _ = _run(model, energy=0.9)
    assert ops(out) == ["If"] and stats["rewrites"] == 0
    assert any("subgraphs" in n for n in stats["notes"])


def test_data_driven_gemm_is_exact_on_a_rank8_weight():
    w = _w(64, 8) @ _w(8, 64)
    node = helper.make_node("Gemm", ["x", "B", "C"], ["y"], alpha=0.5, beta=2.0, transB=1)
    model = make_model([node], [vinfo("x", ["n", 64])], [vinfo("y", ["n", 64])], [tensor("B", w), tensor("C", _w(64))])
    out, stats, _ = _run(model, {"calibration_random": 32}, energy=0.9999)
    assert any("calibration" in n for n in stats["notes"])
    (layer,) = stats["details"]["layers"]
    assert layer["kept"] and layer["ranks"] == [8] and ops(out) == ["Gemm", "Gemm"]
    assert_same_outputs(model, out, rtol=1e-3, atol=1e-3, shapes={"x": [5, 64]})
