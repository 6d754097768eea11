"""prune_channels: propagation rules, refusals, the masked-graph cross-check, the digits CNN."""
from __future__ import annotations

import argparse

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim_opt.api import OptimizeOptions, run
from onnxslim_opt.errors import OptimizeError
from onnxslim_opt.graph import import_graph
from onnxslim_opt.shape_inference import infer_shapes
from passes._prune_graph import analyze
from passes.prune_channels import PruneChannels, PruneOptions
from tests.util import MODELS, assert_same_outputs, make_model, ops, pass_stats, session, tensor, vinfo

RNG = np.random.default_rng(0)
NONE = "__protect_nothing__"


def w(*shape, scale=0.5, rng=None):
    return ((rng or RNG).standard_normal(shape) * scale).astype(np.float32)


def conv(x, y, weight, bias=None, **attrs):
    inputs = [x, weight] + ([bias] if bias else [])
    return helper.make_node("Conv", inputs, [y], name=f"conv_{y}", pads=attrs.pop("pads", [1, 1, 1, 1]), **attrs)


def prune(model, **options):
    """Run the pass through the real pipeline; check the pruned graph against the masked graph."""
    options.setdefault("protect", NONE)
    options.setdefault("verify", True)
    p = PruneChannels(PruneOptions(**options))
    out = run(model, None, OptimizeOptions(passes=["eliminate_dead_code"], extra_passes=[p]))
    stats = pass_stats(out.report, "prune_channels")
    if stats["rewrites"]:
        assert_same_outputs(p.masked_model, out.model, rtol=1e-4, atol=1e-4)
    return out.model, stats


def init_shape(model, name_part):
    return [list(t.dims) for t in model.graph.initializer if name_part in t.name]


def weight_of(model, node_name, index=1):
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(t for t in model.graph.initializer if t.name == node.input[index])


def test_conv_bn_relu_conv():
    nodes = [conv("x", "c1", "w1", "b1"),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"]), conv("r", "y", "w2")]
    inits = [tensor("w1", w(8, 3, 3, 3)), tensor("b1", w(8)), tensor("g", w(8) + 1), tensor("be", w(8)),
             tensor("m", w(8)), tensor("v", np.abs(w(8)) + 0.5), tensor("w2", w(4, 8, 3, 3))]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y", [1, 4, 6, 6])], inits)
    pruned, stats = prune(model, fraction=0.3)
    kept = weight_of(pruned, "conv_c1").dims[0]
    assert 2 <= kept < 8 and weight_of(pruned, "conv_y").dims[1] == kept
    assert all(weight_of(pruned, "bn", i).dims == [kept] for i in range(1, 5))
    assert ops(pruned) == ops(model)
    layers = {l["node"]: l for l in stats["details"]["layers"]}
    assert layers["conv_y"]["after"] == 4 and "graph output" in layers["conv_y"]["refused"]
    pruned, stats = prune(model, fraction=0.3, criterion="bn")  # BN kept here (no fuse_conv_bn)
    assert weight_of(pruned, "conv_c1").dims[0] < 8 and stats["details"]["without_bn"] == 1  # conv_y has none


def test_default_protects_stem_conv():
    nodes = [conv("x", "c1", "w1"), helper.make_node("Relu", ["c1"], ["r"]), conv("r", "y", "w2")]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y", [1, 4, 6, 6])],
                       [tensor("w1", w(8, 3, 3, 3)), tensor("w2", w(4, 8, 3, 3))])
    pruned, stats = prune(model, fraction=0.3, protect="")
    assert stats["rewrites"] == 0 and any("protected" in r["reason"] for r in stats["rejection_examples"])


def residual_model(seed: int = 0):
    """x -> conv a -> relu -> conv -> relu -> conv c; Add(c, a) -> relu -> conv y (own seeded weights)."""
    rng = np.random.default_rng(seed)
    nodes = [conv("x", "a0", "w1"), helper.make_node("Relu", ["a0"], ["a"]), conv("a", "b0", "w2"),
             helper.make_node("Relu", ["b0"], ["b"]), conv("b", "c", "w3", "b3"),
             helper.make_node("Add", ["c", "a"], ["s"]), helper.make_node("Relu", ["s"], ["t"]),
             conv("t", "y", "w4")]
    inits = [tensor("w1", w(8, 3, 3, 3, rng=rng)), tensor("w2", w(8, 8, 3, 3, rng=rng)),
             tensor("w3", w(8, 8, 3, 3, rng=rng)), tensor("b3", w(8, rng=rng)), tensor("w4", w(4, 8, 3, 3, rng=rng))]
    return make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y", [1, 4, 6, 6])], inits)


def test_residual_add_couples_producers():
    pruned, stats = prune(residual_model(), fraction=0.4)
    k1, k3 = weight_of(pruned, "conv_a0").dims[0], weight_of(pruned, "conv_c").dims[0]
    assert k1 == k3 < 8 and weight_of(pruned, "conv_y").dims[1] == k1
    assert weight_of(pruned, "conv_c", 2).dims == [k3]


def test_params_metric():
    pruned, stats = prune(residual_model(), fraction=0.3, metric="params")
    details = stats["details"]
    assert 0.5 < details["params_ratio"] < 0.8 and "flops_ratio" not in details


def test_round_to_and_layer_cap():
    pruned, _ = prune(residual_model(), fraction=0.6, round_to=4)
    assert all(weight_of(pruned, n).dims[0] in (4, 8) for n in ("conv_a0", "conv_b0", "conv_c"))
    pruned, _ = prune(residual_model(), fraction=0.9, max_layer_ratio=0.5)
    assert all(weight_of(pruned, n).dims[0] >= 4 for n in ("conv_a0", "conv_b0", "conv_c"))


def test_concat_offsets():
    nodes = [conv("x", "p", "w1"), conv("x", "q", "w2"), helper.make_node("Concat", ["p", "q"], ["c"], axis=1),
             helper.make_node("Relu", ["c"], ["r"]), conv("r", "y", "w3")]
    inits = [tensor("w1", w(6, 3, 3, 3)), tensor("w2", w(4, 3, 3, 3)), tensor("w3", w(4, 10, 3, 3))]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y", [1, 4, 6, 6])], inits)
    pruned, stats = prune(model, fraction=0.3)
    k1, k2 = weight_of(pruned, "conv_p").dims[0], weight_of(pruned, "conv_q").dims[0]
    assert k1 + k2 < 10 and weight_of(pruned, "conv_y").dims[1] == k1 + k2


def test_depthwise_shrinks_in_out_and_group():
    nodes = [conv("x", "a", "w1"), helper.make_node("Relu", ["a"], ["r"]), conv("r", "d", "wd", "bd", group=8),
             helper.make_node("Clip", ["d", "lo", "hi"], ["e"]), conv("e", "y", "w3")]
    inits = [tensor("w1", w(8, 3, 3, 3)), tensor("wd", w(8, 1, 3, 3)), tensor("bd", w(8)),
             tensor("lo", np.array(0, np.float32)), tensor("hi", np.array(6, np.float32)), tensor("w3", w(4, 8, 3, 3))]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y", [1, 4, 6, 6])], inits)
    pruned, _ = prune(model, fraction=0.3)
    k = weight_of(pruned, "conv_a").dims[0]
    dw = next(n for n in pruned.graph.node if n.name == "conv_d")
    assert k < 8 and weight_of(pruned, "conv_d").dims == [k, 1, 3, 3]
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == k


def test_grouped_conv_keeps_equal_counts_per_group():
    nodes = [conv("x", "a", "w1"), helper.make_node("Relu", ["a"], ["r"]), conv("r", "g", "wg", "bg", group=2),
             helper.make_node("Relu", ["g"], ["gr"]), conv("gr", "y", "w3")]
    inits = [tensor("w1", w(8, 3, 3, 3)), tensor("wg", w(12, 4, 3, 3)), tensor("bg", w(12)),
             tensor("w3", w(4, 12, 3, 3))]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y", [1, 4, 6, 6])], inits)
    pruned, _ = prune(model, fraction=0.4)
    k1, (k2, per_group) = weight_of(pruned, "conv_a").dims[0], weight_of(pruned, "conv_g").dims[:2]
    assert (k1 < 8 or k2 < 12) and k1 % 2 == 0 and k2 % 2 == 0 and per_group == k1 // 2
    assert weight_of(pruned, "conv_y").dims[1] == k2


@pytest.mark.parametrize("flatten", ["reshape", "gap_flatten", "computed"])
def test_flatten_into_gemm(flatten):
    if flatten == "reshape":
        tail = [helper.make_node("Reshape", ["r", "shape"], ["f"], name="reshape")]
        extra, feats = [tensor("shape", np.array([1, 128], np.int64))], 128
    elif flatten == "computed":  # the dynamo exporter's flatten: Reshape(x, Concat(Shape(x)[0:1], [C*H*W]))
        tail = [helper.make_node("Shape", ["r"], ["sh"], start=0, end=1),
                helper.make_node("Concat", ["sh", "feat"], ["shape"], axis=0, name="cat"),
                helper.make_node("Reshape", ["r", "shape"], ["f"], name="reshape")]
        extra, feats = [tensor("feat", np.array([128], np.int64))], 128
    else:
        tail = [helper.make_node("GlobalAveragePool", ["r"], ["gp"]), helper.make_node("Flatten", ["gp"], ["f"])]
        extra, feats = [], 8
    nodes = [conv("x", "a", "w1"), helper.make_node("Relu", ["a"], ["r"]), *tail,
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="gemm", transB=1)]
    inits = [tensor("w1", w(8, 3, 3, 3)), tensor("wg", w(5, feats)), tensor("bg", w(5))] + extra
    model = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], [vinfo("y", [1, 5])], inits)
    pruned, _ = prune(model, fraction=0.2)
    k = weight_of(pruned, "conv_a").dims[0]
    assert k < 8 and weight_of(pruned, "gemm").dims == [5, k * feats // 8]
    if flatten == "reshape":
        shape = onnx.numpy_helper.to_array(weight_of(pruned, "reshape"))
        assert shape.tolist() == [1, k * 16]
    if flatten == "computed":
        assert onnx.numpy_helper.to_array(weight_of(pruned, "cat")).tolist() == [k * 16]


def test_spatial_reduce_mean_into_gemm():
    nodes = [conv("x", "a", "w1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["p"], axes=[-2, -1], keepdims=0),
             helper.make_node("Gemm", ["p", "wg"], ["y"], name="gemm", transB=1)]
    model = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], [vinfo("y", [1, 5])],
                       [tensor("w1", w(8, 3, 3, 3)), tensor("wg", w(5, 8))])
    pruned, _ = prune(model, fraction=0.2)
    assert weight_of(pruned, "gemm").dims[1] == weight_of(pruned, "conv_a").dims[0] < 8


def test_transpose_nhwc_chain():
    """tf2onnx layout: Conv -> Transpose to NHWC -> bias Add [C] -> Relu -> back to NCHW -> Conv, and a
    second branch NHWC -> ReduceMean(1, 2) -> MatMul."""
    nodes = [conv("x", "a", "w1"), helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Add", ["t", "bias"], ["tb"]), helper.make_node("Relu", ["tb"], ["tr"]),
             helper.make_node("Transpose", ["tr"], ["n"], perm=[0, 3, 1, 2]), conv("n", "y", "w2"),
             helper.make_node("ReduceMean", ["tr"], ["m"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["m", "wm"], ["z"], name="mm")]
    inits = [tensor("w1", w(8, 3, 3, 3)), tensor("bias", w(8)), tensor("w2", w(4, 8, 3, 3)), tensor("wm", w(8, 5))]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y", [1, 4, 6, 6]), vinfo("z", [1, 5])], inits)
    pruned, _ = prune(model, fraction=0.2)
    k = weight_of(pruned, "conv_a").dims[0]
    assert k < 8 and weight_of(pruned, "conv_y").dims[1] == k and weight_of(pruned, "mm").dims == [k, 5]
    add = next(n for n in pruned.graph.node if n.op_type == "Add")
    assert [list(t.dims) for t in pruned.graph.initializer if t.name == add.input[1]] == [[k]]


@pytest.mark.parametrize("form", ["input", "attribute", "equal_old", "equal_13", "num_outputs"])
def test_split_on_channel_axis(form):
    opset, inits, split_in = 17, [], ["r"]
    attrs = {"axis": 1}
    if form == "input":
        split_in, inits = ["r", "sizes"], [tensor("sizes", np.array([2, 6], np.int64))]
    elif form == "attribute":
        opset, attrs["split"] = 11, [2, 6]
    elif form == "equal_old":
        opset = 11
    elif form == "num_outputs":
        opset, attrs["num_outputs"] = 18, 2
    sizes = [2, 6] if form in ("input", "attribute") else [4, 4]
    nodes = [conv("x", "a", "w1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Split", split_in, ["s0", "s1"], name="split", **attrs),
             conv("s0", "y1", "wp"), conv("s1", "y2", "wq")]
    inits += [tensor("w1", w(8, 3, 3, 3)), tensor("wp", w(4, sizes[0], 3, 3)), tensor("wq", w(4, sizes[1], 3, 3))]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y1", [1, 4, 6, 6]), vinfo("y2", [1, 4, 6, 6])],
                       inits, opset=opset)
    pruned, stats = prune(model, fraction=0.3, max_layer_ratio=0.9)
    k0, k1 = weight_of(pruned, "conv_y1").dims[1], weight_of(pruned, "conv_y2").dims[1]
    assert k0 >= 1 and k1 >= 1 and k0 + k1 == weight_of(pruned, "conv_a").dims[0] < 8
    split = next(n for n in pruned.graph.node if n.op_type == "Split")
    got = ([helper.get_attribute_value(x) for x in split.attribute if x.name == "split"] or
           [onnx.numpy_helper.to_array(weight_of(pruned, "split")).tolist()])[0]
    assert list(got) == [k0, k1] and not any(x.name == "num_outputs" for x in split.attribute)


def test_matmul_after_flatten():
    nodes = [conv("x", "a", "w1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("GlobalMaxPool", ["r"], ["gp"]), helper.make_node("Flatten", ["gp"], ["f"]),
             helper.make_node("MatMul", ["f", "wm"], ["y"], name="mm")]
    model = make_model(nodes, [vinfo("x", [1, 3, 4, 4])], [vinfo("y", [1, 5])],
                       [tensor("w1", w(8, 3, 3, 3)), tensor("wm", w(8, 5))])
    pruned, _ = prune(model, fraction=0.2)
    assert weight_of(pruned, "mm").dims[0] == weight_of(pruned, "conv_a").dims[0] < 8


def test_squeeze_excitation_silu_and_channel_constants():
    nodes = [conv("x", "a0", "w1"), helper.make_node("Sigmoid", ["a0"], ["sg"]),
             helper.make_node("Mul", ["a0", "sg"], ["a"]),  # SiLU diamond
             helper.make_node("GlobalAveragePool", ["a"], ["p"]), conv("p", "s0", "ws1", "bs1", pads=[0, 0, 0, 0]),
             helper.make_node("Relu", ["s0"], ["s1"]), conv("s1", "s2", "ws2", "bs2", pads=[0, 0, 0, 0]),
             helper.make_node("HardSigmoid", ["s2"], ["s"]), helper.make_node("Mul", ["a", "s"], ["e"]),  # SE
             helper.make_node("Mul", ["e", "scale"], ["e2"]), helper.make_node("Add", ["e2", "shift"], ["e3"]),
             helper.make_node("Add", ["e3", "one"], ["e4"]), conv("e4", "y", "w3")]
    inits = [tensor("w1", w(8, 3, 3, 3)), tensor("ws1", w(4, 8, 1, 1)), tensor("bs1", w(4)),
             tensor("ws2", w(8, 4, 1, 1)), tensor("bs2", w(8)), tensor("scale", w(1, 8, 1, 1)),
             tensor("shift", w(8, 1, 1)), tensor("one", np.ones((1,), np.float32)), tensor("w3", w(4, 8, 3, 3))]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y", [1, 4, 6, 6])], inits)
    pruned, _ = prune(model, fraction=0.3)
    k = weight_of(pruned, "conv_a0").dims[0]
    assert k < 8 and weight_of(pruned, "conv_s2").dims[0] == k and weight_of(pruned, "conv_s0").dims[1] == k
    muls = [n for n in pruned.graph.node if n.op_type in ("Mul", "Add")]
    dims = {n.output[0]: [list(t.dims) for t in pruned.graph.initializer if t.name in n.input] for n in muls}
    assert dims["e2"] == [[1, k, 1, 1]] and dims["e3"] == [[k, 1, 1]] and dims["e4"] == [[1]]


def test_decomposed_hardswish_diamond():
    """x * Clip(x + 3, 0, 6) / 6 as exporters write HardSwish: scalar constants stay, x is coupled."""
    nodes = [conv("x", "a", "w1"), helper.make_node("Add", ["a", "three"], ["p"]),
             helper.make_node("Clip", ["p", "zero", "six"], ["c"]), helper.make_node("Div", ["c", "six"], ["d"]),
             helper.make_node("Mul", ["a", "d"], ["h"]), conv("h", "y", "w2")]
    inits = [tensor("w1", w(8, 3, 3, 3)), tensor("three", np.array(3, np.float32)),
             tensor("zero", np.array(0, np.float32)), tensor("six", np.array(6, np.float32)), tensor("w2", w(4, 8, 3, 3))]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y", [1, 4, 6, 6])], inits)
    pruned, _ = prune(model, fraction=0.3)
    assert weight_of(pruned, "conv_y").dims[1] == weight_of(pruned, "conv_a").dims[0] < 8


def test_shared_weight_is_not_corrupted():
    nodes = [conv("x", "a", "w"), helper.make_node("Relu", ["a"], ["r"]), conv("r", "y", "w2"),
             conv("x", "z", "w")]
    inits = [tensor("w", w(8, 3, 3, 3)), tensor("w2", w(4, 8, 3, 3))]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y", [1, 4, 6, 6]), vinfo("z", [1, 8, 6, 6])], inits)
    pruned, _ = prune(model, fraction=0.2)
    assert weight_of(pruned, "conv_a").dims[0] < 8 and weight_of(pruned, "conv_z").dims == [8, 3, 3, 3]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_mlp_gemm_and_matmul_producers(trans_b):
    w1 = w(16, 6) if trans_b else w(6, 16)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h0"], name="fc1", transB=trans_b),
             helper.make_node("Relu", ["h0"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["m0"], name="fc2"),
             helper.make_node("Add", ["m0", "b2"], ["m1"]), helper.make_node("Tanh", ["m1"], ["m"]),
             helper.make_node("Gemm", ["m", "w3"], ["y"], name="head", transB=1)]
    inits = [tensor("w1", w1), tensor("b1", w(16)), tensor("w2", w(16, 12)), tensor("b2", w(12)),
             tensor("w3", w(5, 12))]
    model = make_model(nodes, [vinfo("x", [2, 6])], [vinfo("y", [2, 5])], inits)
    pruned, _ = prune(model, fraction=0.3)
    k1 = weight_of(pruned, "fc1").dims[0 if trans_b else 1]
    k2 = weight_of(pruned, "fc2").dims[1]
    assert k1 < 16 or k2 < 12
    assert weight_of(pruned, "fc1", 2).dims == [k1] and weight_of(pruned, "fc2").dims[0] == k1
    assert weight_of(pruned, "head").dims == [5, k2]
    _, stats = prune(model, fraction=0.3, protect="")  # default: the last Gemm/MatMul is protected
    assert any("protected" in r["reason"] and r["node"] == "head" for r in stats["rejection_examples"])


def test_prelu_and_instance_norm():
    nodes = [conv("x", "a", "w1"), helper.make_node("InstanceNormalization", ["a", "s", "b"], ["n"], name="inorm"),
             helper.make_node("PRelu", ["n", "slope"], ["r"], name="prelu"), conv("r", "y", "w2")]
    inits = [tensor("w1", w(8, 3, 3, 3)), tensor("s", w(8) + 1), tensor("b", w(8)), tensor("slope", w(8, 1, 1)),
             tensor("w2", w(4, 8, 3, 3))]
    model = make_model(nodes, [vinfo("x", [1, 3, 6, 6])], [vinfo("y", [1, 4, 6, 6])], inits)
    pruned, _ = prune(model, fraction=0.3)
    k = weight_of(pruned, "conv_a").dims[0]
    assert k < 8 and weight_of(pruned, "prelu").dims == [k, 1, 1] and weight_of(pruned, "inorm", 2).dims == [k]


def test_masked_check_catches_a_wrong_plan(monkeypatch):
    """A plan that keeps the wrong channels in one consumer must fail the cross-check (rolled back)."""
    import passes.prune_channels as pc
    real = pc.plan_updates

    def wrong(graph, a, removed):
        updates = real(graph, a, removed)
        key = next(k for k, (node, v) in updates.items() if node.name == "conv_y")
        node, v = updates[key]
        updates[key] = (node, v[:, ::-1].copy())  # consumer reads its input channels reversed
        return updates

    monkeypatch.setattr(pc, "plan_updates", wrong)
    model = residual_model()
    p = PruneChannels(PruneOptions(fraction=0.3, protect=NONE, verify=True))
    out = run(model, None, OptimizeOptions(passes=["eliminate_dead_code"], extra_passes=[p]))
    stats = pass_stats(out.report, "prune_channels")
    assert stats["errors"] and "masked graph" in str(stats["errors"])
    assert ops(out.model) == ops(model) and weight_of(out.model, "conv_a0").dims[0] == 8


def test_refit_on_random_calibration_reduces_error():
    model = residual_model()
    feeds = [{"x": np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    errors = {}
    for rec in ("none", "refit"):
        p = PruneChannels(PruneOptions(fraction=0.4, protect=NONE, reconstruct=rec))
        out = run(model, None, OptimizeOptions(passes=["eliminate_dead_code"], extra_passes=[p],
                                               calibration_random=64))
        details = pass_stats(out.report, "prune_channels")["details"]
        ref, got = session(model), session(out.model)
        errors[rec] = np.mean([np.linalg.norm(ref.run(None, f)[0] - got.run(None, f)[0]) for f in feeds])
    assert details["reconstruction"] == "least-squares refit" and details["refit"]["errors"]
    assert errors["refit"] < 0.9 * errors["none"]  # random weights: little redundancy to recover


# ----------------------------------------------------------------------------- refusals
def refusal_model(middle, extra_inits=(), outputs=None, inputs=None, opsets=()):
    nodes = [conv("x", "a", "w1"), *middle, conv("m", "y", "w2")]
    inits = [tensor("w1", w(8, 3, 3, 3)), tensor("w2", w(4, 8, 3, 3)), *extra_inits]
    return make_model(nodes, inputs or [vinfo("x", [1, 3, 6, 6])], outputs or [vinfo("y", [1, 4, 6, 6])], inits,
                      extra_opsets=opsets)


@pytest.mark.parametrize("case,reason", [
    ("softmax", "not channel-independent"), ("reduce", "over the channel axis"),
    ("graph_output", "graph output"), ("graph_input", "unprunable channels"),
    ("input_scale", "unprunable channels"), ("nhwc_pool", "channels are on axis 3"), ("maxpool_indices", "second output"), ("broadcast", ""),
])
def test_refusals(case, reason):
    outputs = inputs = None
    extra = []
    if case == "softmax":
        middle = [helper.make_node("Softmax", ["a"], ["m"], axis=1)]
    elif case == "reduce":
        middle = [helper.make_node("ReduceMean", ["a"], ["rm"], axes=[1], keepdims=1),
                  helper.make_node("Sub", ["a", "rm"], ["m"])]
    elif case == "graph_output":
        middle = [helper.make_node("Relu", ["a"], ["m"])]
        outputs = [vinfo("y", [1, 4, 6, 6]), vinfo("a", [1, 8, 6, 6])]
    elif case == "graph_input":
        middle = [helper.make_node("Add", ["a", "x2"], ["m"])]
        inputs = [vinfo("x", [1, 3, 6, 6]), vinfo("x2", [1, 8, 6, 6])]
    elif case == "nhwc_pool":  # MaxPool pools axes 2, 3: in NHWC that would mix the channel axis
        middle = [helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]),
                  helper.make_node("MaxPool", ["t"], ["p"], kernel_shape=[1, 1]),
                  helper.make_node("Transpose", ["p"], ["m"], perm=[0, 3, 1, 2])]
    elif case == "maxpool_indices":
        middle = [helper.make_node("MaxPool", ["a"], ["m", "idx"], kernel_shape=[1, 1])]
        outputs = [vinfo("y", [1, 4, 6, 6]), vinfo("idx", [1, 8, 6, 6], TensorProto.INT64)]
    elif case == "input_scale":  # an activation operand carrying 8 channels from a graph input
        middle = [helper.make_node("Mul", ["a", "x2"], ["m"])]
        inputs = [vinfo("x", [1, 3, 6, 6]), vinfo("x2", [1, 8, 1, 1])]
    else:  # an activation operand broadcast over the channels: allowed
        middle = [helper.make_node("Mul", ["a", "x2"], ["m"])]
        inputs = [vinfo("x", [1, 3, 6, 6]), vinfo("x2", [1, 1, 6, 6])]
    model = refusal_model(middle, extra, outputs, inputs)
    if case == "broadcast":
        pruned, stats = prune(model, fraction=0.2)
        assert stats["rewrites"] > 0
        return
    pruned, stats = prune(model, fraction=0.3)
    assert stats["rewrites"] == 0 and ops(pruned) == ops(model)
    assert any(reason in r["reason"] for r in stats["rejection_examples"]), stats["rejection_examples"]


def analyzed(model):
    graph = import_graph(model)
    infer_shapes(graph)
    return analyze(graph, set())


def test_refuses_custom_ops_control_flow_and_quantized():
    custom = refusal_model([helper.make_node("Foo", ["a"], ["m"], domain="custom")],
                           opsets=[helper.make_opsetid("custom", 1)])
    a = analyzed(custom)
    assert not a.classes()
    assert any("custom-domain" in r for _, r in a.refusals)

    then = helper.make_graph([helper.make_node("Identity", ["a"], ["o"])], "then", [], [vinfo("o", [1, 8, 6, 6])])
    cond = refusal_model([helper.make_node("If", ["c"], ["m"], then_branch=then, else_branch=then)],
                         inputs=[vinfo("x", [1, 3, 6, 6]), vinfo("c", [], TensorProto.BOOL)])
    a = analyzed(cond)
    assert any("control flow" in r or "subgraph" in r for _, r in a.refusals)
    assert all(a.find(i) in {a.find(j) for j in a.blocked} for i in range(8))

    q = refusal_model([helper.make_node("QuantizeLinear", ["a", "s"], ["q"]),
                       helper.make_node("DequantizeLinear", ["q", "s"], ["m"])],
                      [tensor("s", np.array(0.1, np.float32))])
    assert "quantized" in analyzed(q).refused


def test_flags_and_bad_options():
    parser = argparse.ArgumentParser()
    PruneChannels.add_arguments(parser)
    assert PruneChannels.from_arguments(parser.parse_args([])) is None
    p = PruneChannels.from_arguments(parser.parse_args(["--prune", "0.5", "--round-to", "8", "--protect", "head*",
                                                        "--max-layer-ratio", "0.6", "--prune-criterion", "l2",
                                                        "--prune-reconstruct", "bias"]))
    assert (p.options.fraction, p.options.round_to, p.options.protect, p.options.max_layer_ratio,
            p.options.criterion, p.options.reconstruct, p.options.metric) == (0.5, 8, "head*", 0.6, "l2", "bias", "flops")
    with pytest.raises(OptimizeError, match="calibration"):
        PruneChannels.from_arguments(parser.parse_args(["--prune", "0.3", "--prune-criterion", "activation"]))
    with pytest.raises(OptimizeError):
        PruneChannels.from_arguments(parser.parse_args(["--prune", "1.5"]))


# ----------------------------------------------------------------------------- the digits CNN
def digits_accuracy(model, inputs, labels):
    logits = session(model).run(None, {"input": inputs})[0]
    return float((logits.argmax(1) == labels).mean())


def test_digits_cnn_30_percent(tmp_path, capsys):
    """Calibrate on the first 64 test images, measure accuracy on the other 386."""
    model = onnx.load(MODELS / "digits_cnn.onnx")
    data = np.load(MODELS / "digits_test.npz")
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=data["input"][:64])
    inputs, labels = data["input"][64:], data["label"][64:]
    baseline = digits_accuracy(model, inputs, labels)
    results = {}
    for reconstruct, criterion in (("none", "l1"), ("bias", "l1"), ("refit", "l1"), ("refit", "activation")):
        p = PruneChannels(PruneOptions(fraction=0.3, verify=True, reconstruct=reconstruct, criterion=criterion))
        out = run(model, None, OptimizeOptions(extra_passes=[p], calibration=str(calib)))
        stats = pass_stats(out.report, "prune_channels")
        details = stats["details"]
        assert stats["rewrites"] > 0 and not stats["errors"] and details["flops_ratio"] < 0.75
        assert details["masked_check_max_rel_diff"] < 1e-5
        assert details["layers"][0]["after"] == details["layers"][0]["before"]  # the stem is protected
        onnx.checker.check_model(out.model)
        results[f"{criterion}+{reconstruct}"] = (digits_accuracy(out.model, inputs, labels), details["flops_ratio"])
    assert results["l1+refit"][0] >= baseline - 0.02 and results["activation+refit"][0] >= baseline - 0.02
    assert results["l1+refit"][0] > results["l1+none"][0]
    with capsys.disabled():
        print(f"\ndigits_cnn prune 0.3 (held-out 386): accuracy {baseline:.4f} -> "
              + ", ".join(f"{k} {a:.4f} (MACs x{r:.3f})" for k, (a, r) in results.items()))


def test_digits_dynamo_export_prunes_validly():
    """The raw dynamo export (ReduceMean, Reshape, Constant nodes) after the lossless pipeline."""
    model = onnx.load(MODELS / "digits_cnn_dynamo.onnx")
    p = PruneChannels(PruneOptions(fraction=0.3, verify=True))
    out = run(model, None, OptimizeOptions(extra_passes=[p]))
    stats = pass_stats(out.report, "prune_channels")
    assert stats["rewrites"] > 0 and not stats["errors"]
    assert not any(r["op"] in ("Reshape", "ReduceMean") for r in stats["rejection_examples"])
    onnx.checker.check_model(out.model)


@pytest.mark.parametrize("name", ["paddle_style_mlp.onnx", "old_ir_initializers_as_inputs.onnx",
                                  "tf_style_nhwc.onnx", "sklearn_tree.onnx"])
def test_shipped_models_prune_or_refuse_cleanly(name):
    """Every shipped model: a valid pruned graph that passes the masked check, or named refusals."""
    model = onnx.load(MODELS / name)
    p = PruneChannels(PruneOptions(fraction=0.3, verify=True, protect=NONE))
    out = run(model, None, OptimizeOptions(extra_passes=[p]))
    stats = pass_stats(out.report, "prune_channels")
    assert not stats["errors"]
    assert stats["rewrites"] > 0 or stats["rejection_examples"] or stats["notes"]
    onnx.checker.check_model(out.model)


def test_cli_prune_with_debug_check_and_calibration(tmp_path):
    import json

    from onnxslim_opt.cli import main
    data = np.load(MODELS / "digits_test.npz")
    np.savez(tmp_path / "calib.npz", input=data["input"][:32])
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    code = main([str(MODELS / "digits_cnn.onnx"), "-o", str(out), "--prune", "0.3", "--round-to", "8", "--debug",
                 "--calibration", str(tmp_path / "calib.npz"), "--report", str(report), "-q"])
    assert code == 0
    rep = json.loads(report.read_text())
    stats = next(p for p in rep["passes"] if p["name"] == "prune_channels")
    assert stats["details"]["masked_check_max_rel_diff"] < 1e-5 and stats["details"]["reconstruction"]
    assert all(l["after"] % 8 == 0 for l in stats["details"]["layers"] if "refused" not in l)
    assert rep["validation"]["status"] == "fidelity"
    onnx.checker.check_model(onnx.load(out))
