"""compress_weights: int8 weight-only, k-means palettes, int4 block-wise (DQ opset 21 / MatMulNBits)."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_opt.cli import build_parser
from onnxslim_opt.errors import OptimizeError
from onnxslim_opt.pass_api import PassContext
from passes._compress_codecs import kmeans_1d, quantize_blocked
from passes.compress_weights import CompressWeights, Options
from util import MODELS, make_model, optimize_with, ops, random_feeds, session, tensor, vinfo

DIGITS = onnx.load(str(MODELS / "digits_cnn.onnx"))
DATA = np.load(MODELS / "digits_test.npz")
BASE_ACC = 0.9911


def compress(model, **options):
    """Run the pass through the real pipeline (ORT validation included); (model, pass stats, report)."""
    out, report = optimize_with(model, ["eliminate_dead_code"], extra_passes=[CompressWeights(Options(**options))])
    assert report.validation["status"] == "fidelity", report.validation
    return out, next(p for p in report.passes if p["name"] == "compress_weights"), report


def accuracy(model):
    logits = session(model).run(None, {"input": DATA["input"]})[0]
    return float((logits.argmax(1) == DATA["label"]).mean())


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def rel_output_error(a, b, feeds=None):
    feeds = feeds or random_feeds(a)
    sa, sb = session(a), session(b)
    errs = []
    for f in feeds:
        x, y = sa.run(None, f)[0], sb.run(None, f)[0]
        errs.append(np.linalg.norm(x - y) / np.linalg.norm(x))
    return max(errs)


def matmul_model(k=64, n=48, opset=17, shared=False, extra_reader=None, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    outputs = [vinfo("y", [4, n])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x2", "w"], ["y2"]))
        outputs.append(vinfo("y2", [4, n]))
    if extra_reader:
        nodes.append(helper.make_node(extra_reader, ["w"], ["s"]))
        shape, dtype = ([2], TensorProto.INT64) if extra_reader == "Shape" else ([k, n], TensorProto.FLOAT)
        outputs.append(vinfo("s", shape, dtype))
    inputs = [vinfo("x", [4, k])] + ([vinfo("x2", [4, k])] if shared else [])
    return make_model(nodes, inputs, outputs, [tensor("w", w)], opset=opset)


# ----------------------------------------------------------------------------- int8
def test_int8_digits_keeps_accuracy_and_shrinks_weights():
    out, stats, _ = compress(DIGITS, mode="int8")
    assert ops(out).count("DequantizeLinear") == 6 and stats["rewrites"] == 6
    assert abs(accuracy(out) - BASE_ACC) <= 0.005
    q = [a for a in inits(out).values() if a.dtype == np.int8]
    assert len(q) == 6 and sum(a.size for a in q) == 36864
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert all(helper.get_attribute_value(a) == 0 for n in dq for a in n.attribute if a.name == "axis")
    before, after = len(DIGITS.SerializeToString()), len(out.SerializeToString())
    assert before / after > 2.8  # BN parameters and small tensors stay float
    note = stats["notes"][0]
    assert "6 weights, 147456 -> " in note and "gzipped" in note and "per-channel axis 0" in note


def test_int8_is_deterministic():
    a, _, _ = compress(DIGITS, mode="int8")
    b, _, _ = compress(DIGITS, mode="int8")
    assert a.SerializeToString() == b.SerializeToString()


def test_int8_matmul_axis_and_details():
    model = matmul_model()
    out, _, _ = compress(model, mode="int8")
    assert ops(out) == ["DequantizeLinear", "MatMul"]
    dq = out.graph.node[0]
    assert helper.get_attribute_value(dq.attribute[0]) == 1  # per output column of B [K, N]
    assert inits(out)[dq.input[1]].shape == (48,)
    assert rel_output_error(model, out) < 0.01
    # per-layer details come back in PassResult.details
    graph = gs.import_onnx(model)
    result = CompressWeights(Options(mode="int8")).run(graph, PassContext(opset=17))
    layer = result.details["layers"]["w"]
    assert layer["bits"] == 8 and layer["bytes_before"] == 64 * 48 * 4 and layer["bytes_after"] == 64 * 48 + 48 * 4
    assert 0 < layer["rel_l2"] < 0.01


@pytest.mark.parametrize("trans_b,axis", [(0, 1), (1, 0)])
def test_int8_gemm_axis_follows_transB(trans_b, axis):
    w = np.random.default_rng(1).standard_normal((40, 32) if trans_b else (32, 40)).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b)], [vinfo("x", [2, 32])],
                       [vinfo("y", [2, 40])], [tensor("w", w), tensor("b", np.ones(40, np.float32))])
    out, _, _ = compress(model, mode="int8")
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    assert helper.get_attribute_value(dq.attribute[0]) == axis
    assert inits(out)["b"].dtype == np.float32  # the bias is never compressed
    assert rel_output_error(model, out) < 0.01


def test_int8_convtranspose_uses_axis_1():
    w = np.random.default_rng(2).standard_normal((16, 8, 3, 3)).astype(np.float32)
    model = make_model([helper.make_node("ConvTranspose", ["x", "w"], ["y"])], [vinfo("x", [1, 16, 5, 5])],
                       [vinfo("y", [1, 8, 7, 7])], [tensor("w", w)])
    out, _, _ = compress(model, mode="int8")
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    assert helper.get_attribute_value(dq.attribute[0]) == 1 and inits(out)[dq.input[1]].shape == (8,)
    assert rel_output_error(model, out) < 0.01


def test_int8_old_opsets_per_tensor_and_cast_mul():
    model12 = matmul_model(opset=12)
    out, stats, _ = compress(model12, mode="int8")
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    assert not dq.attribute and inits(out)[dq.input[1]].shape == ()
    assert "per-tensor" in stats["notes"][0]
    model9 = matmul_model(opset=9)
    out, stats, _ = compress(model9, mode="int8")
    assert ops(out) == ["Cast", "Mul", "MatMul"] and "Cast+Mul" in stats["notes"][0]
    assert rel_output_error(model9, out) < 0.01


def test_shared_weight_gets_one_dequantize():
    model = matmul_model(shared=True)
    out, stats, _ = compress(model, mode="int8")
    assert ops(out).count("DequantizeLinear") == 1 and ops(out).count("MatMul") == 2
    assert stats["rewrites"] == 1
    assert rel_output_error(model, out) < 0.01


@pytest.mark.parametrize("reader", ["Shape", "Relu"])
def test_weight_with_other_readers_stays_float(reader):
    model = matmul_model(extra_reader=reader)
    out, stats, _ = compress(model, mode="int8")
    assert "DequantizeLinear" not in ops(out)
    assert any("other than as its weight input" in r for r in stats["rejections"])


def test_small_and_non_float_weights_are_skipped():
    out, stats, _ = compress(matmul_model(k=8, n=8), mode="int8")
    assert "DequantizeLinear" not in ops(out) and any("compress-min-size" in r for r in stats["rejections"])
    out, _, _ = compress(matmul_model(k=8, n=8), mode="int8", min_size=0)
    assert "DequantizeLinear" in ops(out)


def test_constant_node_weights_and_if_subgraph():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    then_graph = helper.make_graph([helper.make_node("Constant", [], ["wc"], value=tensor("wc", w)),
                                    helper.make_node("MatMul", ["x", "wc"], ["t"])], "then", [], [vinfo("t", [2, 32])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vinfo("e", [2, 32])])
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)],
                       [vinfo("x", [2, 32]), vinfo("c", [], TensorProto.BOOL)], [vinfo("y", [2, 32])])
    out, stats, _ = compress(model, mode="int8", min_size=0)
    then = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    then_ops = [n.op_type for n in then.node]
    assert "DequantizeLinear" in then_ops and "Constant" not in then_ops and stats["rewrites"] == 1
    feeds = [{"x": rng.standard_normal((2, 32)).astype(np.float32), "c": np.array(True)}]
    assert rel_output_error(model, out, feeds) < 0.01


# ----------------------------------------------------------------------------- k-means
def test_kmeans16_digits_accuracy_and_layout():
    out, stats, _ = compress(DIGITS, mode="kmeans:16")
    assert ops(out).count("Gather") == 6 and ops(out).count("Cast") == 6
    assert abs(accuracy(out) - BASE_ACC) <= 0.02
    arrays = inits(out)
    assert sum(a.dtype == np.uint8 for a in arrays.values()) == 6
    books = [a for n, a in arrays.items() if n.endswith("_codebook")]
    assert len(books) == 6 and all(b.shape == (16,) and b.dtype == np.float32 for b in books)
    assert len(DIGITS.SerializeToString()) / len(out.SerializeToString()) > 2.8


def test_kmeans_is_deterministic_and_exact_on_few_values():
    a, _, _ = compress(DIGITS, mode="kmeans:16")
    b, _, _ = compress(DIGITS, mode="kmeans:16")
    assert a.SerializeToString() == b.SerializeToString()
    values = np.repeat(np.array([-1.5, 0.0, 0.25, 3.0], np.float32), 300).reshape(40, 30)
    book, idx = kmeans_1d(values, 8)
    np.testing.assert_array_equal(book[idx], values)
    big = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)  # subsampled fit
    book1, idx1 = kmeans_1d(big, 16, seed=5)
    book2, idx2 = kmeans_1d(big, 16, seed=5)
    assert np.array_equal(book1, book2) and np.array_equal(idx1, idx2) and idx1.max() == 15
    assert np.linalg.norm(book1[idx1] - big) / np.linalg.norm(big) < 0.15


def test_kmeans_matmul_round_trip():
    model = matmul_model()
    out, _, _ = compress(model, mode="kmeans:256")
    assert ops(out) == ["Cast", "Gather", "MatMul"]
    assert rel_output_error(model, out) < 0.02


@pytest.mark.parametrize("mode", ["kmeans:3", "kmeans:512", "kmeans:1", "kmeans:x", "int2"])
def test_bad_modes_are_clear_errors(mode):
    with pytest.raises(OptimizeError, match="--compress-weights"):
        CompressWeights(Options(mode=mode))


# ----------------------------------------------------------------------------- int4
def test_int4_dq_at_opset_21():
    model = matmul_model(k=80, n=48, opset=21)  # K not a multiple of the block: the last block is short
    out, stats, _ = compress(model, mode="int4", block_size=32)
    assert ops(out) == ["DequantizeLinear", "MatMul"]
    q = next(t for t in out.graph.initializer if t.data_type == TensorProto.INT4)
    assert len(q.raw_data) == 80 * 48 // 2 and inits(out)[out.graph.node[0].input[1]].shape == (3, 48)
    assert "int4 DequantizeLinear block_size 32" in stats["notes"][0]
    assert rel_output_error(model, out) < 0.15


def test_int4_matmulnbits_below_opset_21():
    model = matmul_model(k=64, n=48, opset=17)
    out, stats, _ = compress(model, mode="int4", int4_format="matmulnbits", block_size=32)
    assert ops(out) == ["MatMulNBits"] and "MatMulNBits" in stats["notes"][0]
    assert any(o.domain == "com.microsoft" for o in out.opset_import)
    # MatMulNBits computes exactly what the blocked quantizer reconstructs
    w = inits(model)["w"]
    q, scale = quantize_blocked(w, 0, 32)
    ref = (q.astype(np.float32) * np.repeat(scale, 32, axis=0))
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(session(out).run(None, {"x": x})[0], x @ ref, rtol=1e-4, atol=1e-4)


def test_int4_matmulnbits_on_digits_gemm():
    out, stats, _ = compress(DIGITS, mode="int4", int4_format="matmulnbits", block_size=16, min_size=0)
    assert "MatMulNBits" in ops(out) and "Gemm" not in ops(out) and stats["rewrites"] == 1
    assert any("MatMul/Gemm weights only" in r for r in stats["rejections"])  # convs stay float
    assert abs(accuracy(out) - BASE_ACC) <= 0.02


def test_int4_below_opset_21_without_matmulnbits_is_refused():
    with pytest.raises(OptimizeError, match="opset >= 21"):
        compress(matmul_model(opset=17), mode="int4")


def test_cli_flags_build_the_pass():
    parser = build_parser()
    args = parser.parse_args(["m.onnx", "--compress-weights", "int4", "--block-size", "64",
                              "--int4-format", "matmulnbits", "--compress-min-size", "0"])
    p = CompressWeights.from_arguments(args)
    assert p.options.mode == "int4" and p.options.block_size == 64 and p.options.int4_format == "matmulnbits"
    assert CompressWeights.from_arguments(parser.parse_args(["m.onnx"])) is None
    with pytest.raises(OptimizeError, match="power of two"):
        CompressWeights.from_arguments(parser.parse_args(["m.onnx", "--compress-weights", "kmeans:20"]))
    with pytest.raises(OptimizeError, match="block-size"):
        CompressWeights.from_arguments(parser.parse_args(["m.onnx", "--compress-weights", "int4",
                                                          "--int4-format", "matmulnbits", "--block-size", "24"]))
