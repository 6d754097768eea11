"""--fp16 (passes/convert_fp16.py): float16 conversion checked with ONNX Runtime CPU against float32."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim_opt.api import OptimizeOptions, run
from onnxslim_opt.errors import OptimizeError
from passes.convert_fp16 import DEFAULT_BLOCK, ConvertFloat16, Fp16Options
from util import MODELS, assert_same_outputs, make_model, ops, pass_stats, random_feeds, session, tensor, vinfo

FLOAT_MODELS = ["digits_cnn", "digits_cnn_dynamo", "paddle_style_mlp", "tf_style_nhwc", "old_ir_initializers_as_inputs"]
H = TensorProto.FLOAT16


def convert(model, lossless: bool = False, validate: bool = True, **options):
    """Run --fp16 through the real pipeline (alone, or after the default lossless passes)."""
    fp16 = ConvertFloat16(Fp16Options(**options))
    outcome = run(model, None, OptimizeOptions(passes=None if lossless else ["convert_fp16"],
                                               extra_passes=[fp16], validate=validate))
    onnx.checker.check_model(outcome.model, full_check=True)
    return outcome.model, outcome.report


def elem_types(values) -> list[int]:
    return [v.type.tensor_type.elem_type for v in values]


def float_weights(model) -> dict[int, int]:
    """Bytes of float initializers and Constant-node values by element type."""
    sizes: dict[int, int] = {}
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    for t in tensors:
        if t.data_type in (TensorProto.FLOAT, H):
            sizes[t.data_type] = sizes.get(t.data_type, 0) + len(t.raw_data or b"") + 4 * len(t.float_data)
    return sizes


def compare(original, converted, feeds, cast_inputs=None):
    a, b = session(original), session(converted)
    for feed in feeds:
        fb = {k: v.astype(cast_inputs) for k, v in feed.items()} if cast_inputs else feed
        for x, y in zip(a.run(None, feed), b.run(None, fb)):
            x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
            assert np.all(np.isfinite(y))
            cosine = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
            assert cosine > 0.999
            assert np.max(np.abs(x - y)) <= 1e-2 * np.max(np.abs(x)) + 1e-3


@pytest.mark.parametrize("lossless", [False, True], ids=["alone", "after_lossless"])
@pytest.mark.parametrize("name", FLOAT_MODELS)
def test_shipped_models_convert_and_stay_close(name, lossless):
    original = onnx.load(MODELS / f"{name}.onnx")
    model, report = convert(original, lossless=lossless)
    assert report.validation["status"] == "fidelity"
    assert all(o["cosine"] > 0.999 for o in report.validation["outputs"])
    assert all(o["top1_agreement"] in (None, 1.0) for o in report.validation["outputs"])
    assert pass_stats(report, "convert_fp16")["rewrites"] > 0
    # IO stays float32, with one Cast per input/output
    inits = {t.name for t in original.graph.initializer}
    assert elem_types(model.graph.input) == elem_types(i for i in original.graph.input if i.name not in inits)
    assert elem_types(model.graph.output) == elem_types(original.graph.output)
    assert ops(model).count("Cast") == len(model.graph.input) + len(model.graph.output)
    # every float weight is float16: half the bytes
    reference = original if not lossless else run(original, None, OptimizeOptions(validate=False)).model
    weights = float_weights(model)
    assert TensorProto.FLOAT not in weights and weights[H] == float_weights(reference)[TensorProto.FLOAT] // 2
    if name.startswith("digits"):  # big enough for weights to dominate the file
        assert len(model.SerializeToString()) < 0.55 * len(reference.SerializeToString())
    compare(original, model, random_feeds(original, count=2, shapes={"input": [4, 1, 32, 32]}))


@pytest.mark.parametrize("name", ["digits_cnn", "digits_cnn_dynamo"])
def test_digits_accuracy_unchanged(name):
    data = np.load(MODELS / "digits_test.npz")
    original = onnx.load(MODELS / f"{name}.onnx")
    model, _ = convert(original, lossless=True)
    ref = session(original).run(None, {"input": data["input"]})[0]
    got = session(model).run(None, {"input": data["input"]})[0]
    acc = float(np.mean(got.argmax(1) == data["label"]))
    assert abs(acc - float(np.mean(ref.argmax(1) == data["label"]))) <= 0.005 and acc >= 0.986
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.995


def test_fp16_io_converts_inputs_and_outputs():
    original = onnx.load(MODELS / "digits_cnn.onnx")
    # the core validation feeds float32 samples, which a float16-input model rejects: compare here
    model, report = convert(original, lossless=True, validate=False, keep_io=False)
    assert elem_types(model.graph.input) == [H] and elem_types(model.graph.output) == [H]
    assert "Cast" not in ops(model)
    compare(original, model, random_feeds(original, count=2), cast_inputs=np.float16)


@pytest.mark.parametrize("name", ["sklearn_logreg_zipmap", "sklearn_tree"])
def test_ai_onnx_ml_models_are_left_in_float32(name):
    original = onnx.load(MODELS / f"{name}.onnx")
    model, report = convert(original)
    assert ops(model) == ops(original)
    assert [o.type for o in model.graph.output] == [o.type for o in original.graph.output]  # ZipMap's seq(map)
    assert pass_stats(report, "convert_fp16")["rewrites"] == 0
    feeds = [{"input": np.random.default_rng(0).uniform(0, 16, (5, 64)).astype(np.float32)}]
    a, b = session(original).run(None, feeds[0]), session(model).run(None, feeds[0])
    assert str(a) == str(b)


def test_block_list_keeps_op_and_its_weights_in_float32():
    original = onnx.load(MODELS / "digits_cnn.onnx")
    model, report = convert(original, lossless=True, block="Gemm")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    producer = next(n for n in model.graph.node if gemm.input[0] in n.output)
    assert producer.op_type == "Cast" and producer.attribute[0].i == TensorProto.FLOAT
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert inits[gemm.input[1]] == TensorProto.FLOAT and inits[gemm.input[2]] == TensorProto.FLOAT
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert inits[conv.input[1]] == H
    assert "block-listed: --fp16-block" in pass_stats(report, "convert_fp16")["rejections"]


def _topk_model():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("TopK", ["r", "k"], ["v", "i"])]
    return make_model(nodes, [vinfo("x", [2, 50])], [vinfo("v", [2, 5]), vinfo("i", [2, 5], TensorProto.INT64)],
                      [tensor("k", np.array([5], np.int64))])


def test_default_block_list_and_allow():
    original = _topk_model()
    model, _ = convert(original)
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    assert types[topk.output[0]] == TensorProto.FLOAT and types[topk.output[1]] == TensorProto.INT64
    assert ops(model).count("Cast") == 2  # x -> fp16 for Relu, Relu -> fp32 for TopK
    allowed, _ = convert(original, allow="TopK")
    assert ops(allowed).count("Cast") == 2  # x -> fp16, TopK values -> fp32 output
    with pytest.raises(OptimizeError, match="not in the default block list"):
        ConvertFloat16(Fp16Options(allow="Conv"))
    assert {"TopK", "NonMaxSuppression", "RoiAlign", "Range", "ReduceSum"} <= set(DEFAULT_BLOCK)


def test_reducesum_is_blocked_because_float16_overflows():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("ReduceSum", ["r", "axes"], ["y"])]
    original = make_model(nodes, [vinfo("x", [1, 4096])], [vinfo("y", [1, 1])], [tensor("axes", np.array([1]))])
    feed = {"x": np.full((1, 4096), 30.0, np.float32)}  # sum 122880: not a float16 number (max 65504)
    model, _ = convert(original)
    assert input_type(model, "ReduceSum") == TensorProto.FLOAT
    assert session(model).run(None, feed)[0][0, 0] == pytest.approx(122880, rel=1e-3)
    # allowed, it reads and writes float16 (ORT CPU computes it in float32 and elides the round trip,
    # so only a GPU shows the inf; the structure is what is checked here)
    allowed, _ = convert(original, allow="ReduceSum")
    assert input_type(allowed, "ReduceSum") == H


def input_type(model, op: str) -> int:
    node = next(n for n in model.graph.node if n.op_type == op)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    return types[node.input[0]]


def test_shared_weight_gets_a_float16_copy_and_out_of_range_values_are_clamped():
    w = np.array([[1.0, 1e6, -np.inf, 1e-9]], np.float32)
    nodes = [helper.make_node("Mul", ["x", "w"], ["a"]),  # converted: reads the float16 copy
             helper.make_node("Relu", ["a"], ["y"]),
             helper.make_node("TopK", ["w", "k"], ["v", "i"], axis=1)]  # blocked: reads float32 w
    original = make_model(nodes, [vinfo("x", [2, 4])], [vinfo("y", [2, 4]), vinfo("v", [1, 2])],
                          [tensor("w", w), tensor("k", np.array([2], np.int64))])
    model, report = convert(original)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits["w"].dtype == np.float32 and inits["w"][0, 1] == 1e6
    w16 = next(v for k, v in inits.items() if v.dtype == np.float16)
    assert w16[0, 1] == 65504 and np.isneginf(w16[0, 2]) and w16[0, 3] == 0
    stats = pass_stats(report, "convert_fp16")
    assert any("1 weight values beyond the float16 range" in n for n in stats["notes"])
    assert any("1 non-zero weight values below" in n for n in stats["notes"])
    feed = {"x": np.ones((2, 4), np.float32) * 0.5}
    v = session(model).run(None, feed)[1]
    np.testing.assert_array_equal(v, session(original).run(None, feed)[1])


def test_cast_to_float_is_retargeted_when_all_readers_are_float16():
    nodes = [helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "nf"], ["y"]),
             helper.make_node("Cast", ["n"], ["nf2"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["nf2"], ["ni"], to=TensorProto.INT64),  # must see exact float32
             helper.make_node("Add", ["nf2", "x"], ["z"])]
    original = make_model(nodes, [vinfo("x", [2, 3]), vinfo("n", [2, 3], TensorProto.INT64)],
                          [vinfo("y", [2, 3]), vinfo("ni", [2, 3], TensorProto.INT64), vinfo("z", [2, 3])])
    model, _ = convert(original)
    casts = {n.output[0]: n.attribute[0].i for n in model.graph.node if n.op_type == "Cast"}
    assert casts["nf"] == H and casts["nf2"] == TensorProto.FLOAT
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32),
            "n": np.array([[1, 2, 3], [70000, 5, 2049]], np.int64)}
    a, b = session(original).run(None, feed), session(model).run(None, feed)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(b[0], a[0], rtol=2e-3)


def test_shape_computations_and_integer_tensors_stay():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["sf", "half"], ["sh"]),
             helper.make_node("Cast", ["sh"], ["si"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["x", "si"], ["r"]),
             helper.make_node("Gather", ["r", "idx"], ["g"]),
             helper.make_node("Greater", ["g", "zero"], ["c"]),
             helper.make_node("Where", ["c", "g", "zero"], ["y"])]
    original = make_model(nodes, [vinfo("x", [4, 6])], [vinfo("y", [2, 12]), vinfo("c", [2, 12], TensorProto.BOOL)],
                          [tensor("half", np.array([0.5, 2.0], np.float32)), tensor("idx", np.array([0, 1])),
                           tensor("zero", np.array(0.0, np.float32))])
    model, _ = convert(original)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert inits["half"] == TensorProto.FLOAT and inits["idx"] == TensorProto.INT64
    mul = next(n for n in model.graph.node if n.op_type == "Mul")
    assert mul.input == ["sf", "half"]
    where = next(n for n in model.graph.node if n.op_type == "Where")
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    assert types[where.input[0]] == TensorProto.BOOL and types[where.input[1]] == H
    assert elem_types(model.graph.output) == [TensorProto.FLOAT, TensorProto.BOOL]
    assert_same_outputs(original, model, rtol=1e-3, atol=1e-3)


def test_constant_of_shape_and_constant_node_values_are_converted():
    value = onnx.numpy_helper.from_array(np.array([2.5], np.float32), "v")
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["f"], value=value),
             helper.make_node("Constant", [], ["c"], value=tensor("cv", np.array([1.5], np.float32))),
             helper.make_node("Add", ["x", "f"], ["a"]),
             helper.make_node("Mul", ["a", "c"], ["y"])]
    original = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 3])])
    model, _ = convert(original)
    cos = next(n for n in model.graph.node if n.op_type == "ConstantOfShape")
    assert cos.attribute[0].t.data_type == H
    assert all(t.data_type == H for t in model.graph.initializer)
    assert "Constant" not in ops(model)
    assert_same_outputs(original, model, rtol=1e-3, atol=1e-3)


def test_cast_pairs_are_cancelled():
    nodes = [helper.make_node("Cast", ["h"], ["c"], to=TensorProto.FLOAT),  # read by fp32 output and Relu
             helper.make_node("Relu", ["c"], ["y"]),
             helper.make_node("Cast", ["y"], ["y16"], to=TensorProto.FLOAT16),  # becomes a no-op
             helper.make_node("Cast", ["y16"], ["z"], to=TensorProto.FLOAT)]
    original = make_model(nodes, [vinfo("h", [2, 3], H)], [vinfo("c", [2, 3]), vinfo("z", [2, 3])])
    model, report = convert(original)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    assert relu.input == ["h"]  # Cast(fp16->fp32) -> Cast(fp32->fp16) cancelled
    assert ops(model).count("Cast") == 2  # h -> c (output) and Relu -> z (output)
    assert pass_stats(report, "convert_fp16")["rejections"] == {}
    assert_same_outputs(original, model, rtol=0, atol=0)


@pytest.mark.parametrize("block", [None, "Add"])
def test_if_bodies_are_converted_and_the_if_stays(block):
    def branch(op, w):
        return helper.make_graph([helper.make_node(op, ["r", w], ["o"])], f"{op}_body", [], [vinfo("o", [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch("Mul", "wt"), else_branch=branch("Add", "we"))]
    original = make_model(nodes, [vinfo("x", [2, 3]), vinfo("cond", [], TensorProto.BOOL)], [vinfo("y", [2, 3])],
                          [tensor("wt", np.full((2, 3), 3.0, np.float32)), tensor("we", np.full((2, 3), 2.0, np.float32))])
    model, report = convert(original, block=block)
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    bodies = {a.name: a.g for a in if_node.attribute}
    then, other = bodies["then_branch"], bodies["else_branch"]
    # the body's Cast(r -> fp32) and Cast(-> fp16) cancel: Mul reads the outer float16 r directly
    assert [n.op_type for n in then.node] == ["Mul", "Cast"] and then.node[0].input[0] == "r"
    assert then.initializer[0].data_type == H and then.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    if block:  # the blocked Add reads a float32 copy of r made before the If
        assert [n.op_type for n in other.node] == ["Add"] and other.initializer[0].data_type == TensorProto.FLOAT
        assert ops(model) == ["Cast", "Relu", "Cast", "If"]
    else:
        assert ops(model) == ["Cast", "Relu", "If"]
    assert "If holds subgraphs" in " ".join(pass_stats(report, "convert_fp16")["rejections"])
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(session(model).run(None, feed)[0], session(original).run(None, feed)[0], rtol=1e-3)


def test_flags_build_the_pass():
    parser = argparse.ArgumentParser()
    ConvertFloat16.add_arguments(parser.add_argument_group("fp16"))
    assert ConvertFloat16.from_arguments(parser.parse_args([])) is None
    p = ConvertFloat16.from_arguments(parser.parse_args(["--fp16"]))
    assert p.options.keep_io and "TopK" in p.blocked()
    p = ConvertFloat16.from_arguments(parser.parse_args(["--fp16", "--fp16-io", "--fp16-block", "Pow, Exp",
                                                         "--fp16-allow", "TopK"]))
    assert not p.options.keep_io and {"Pow", "Exp"} <= p.blocked() and "TopK" not in p.blocked()


def test_cli_fp16(tmp_path):
    out = tmp_path / "d16.onnx"
    r = subprocess.run([sys.executable, "-m", "onnxslim_opt.cli", MODELS / "digits_cnn.onnx", "-o", out, "--fp16",
                        "--report", "-", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["validation"]["status"] == "fidelity" and data["validation"]["outputs"][0]["cosine"] > 0.999
    assert out.stat().st_size < 0.55 * (MODELS / "digits_cnn.onnx").stat().st_size


def test_loop_body_is_converted_with_float32_carried_values():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Mul", ["s_in", "w"], ["m"]), helper.make_node("Relu", ["m"], ["s_out"])],
        "body", [vinfo("i", [], TensorProto.INT64), vinfo("cond_in", [], TensorProto.BOOL), vinfo("s_in", [2, 3])],
        [vinfo("cond_out", [], TensorProto.BOOL), vinfo("s_out", [2, 3])], [tensor("w", np.full((2, 3), 1.5, np.float32))])
    nodes = [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)]
    original = make_model(nodes, [vinfo("x", [2, 3]), vinfo("n", [], TensorProto.INT64)], [vinfo("y", [2, 3])])
    model, _ = convert(original)
    inner = model.graph.node[0].attribute[0].g
    assert [n.op_type for n in inner.node].count("Cast") == 2 and inner.initializer[0].data_type == H
    assert elem_types(inner.input)[2] == TensorProto.FLOAT and elem_types(inner.output)[1] == TensorProto.FLOAT
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32), "n": np.array(3)}
    np.testing.assert_allclose(session(model).run(None, feed)[0], session(original).run(None, feed)[0], rtol=2e-3)


def test_resize_keeps_its_float32_scales():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Resize", ["r", "", "scales"], ["y"], mode="linear")]
    original = make_model(nodes, [vinfo("x", [1, 2, 4, 4])], [vinfo("y", [1, 2, 8, 8])],
                          [tensor("scales", np.array([1, 1, 2, 2], np.float32))])
    model, _ = convert(original)
    assert {t.name: t.data_type for t in model.graph.initializer} == {"scales": TensorProto.FLOAT}
    assert input_type(model, "Resize") == H
    assert_same_outputs(original, model, rtol=1e-2, atol=1e-2)
