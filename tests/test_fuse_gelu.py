import math

import numpy as np
import pytest
from onnx import TensorProto, helper

from util import assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

PASSES = ["fuse_gelu", "eliminate_dead_code"]
SHAPE = [2, 3, 8]


def n(op, inputs, out):
    return helper.make_node(op, inputs, [out])


def consts(**values):
    return [tensor(k, np.array(v, np.float32)) for k, v in values.items()]


def erf_torch(sqrt2=1.4142135):
    """torch's opset<20 export: x * (1 + erf(x / sqrt2)) * 0.5"""
    return [n("Div", ["x", "c_sqrt2"], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "c_one"], "t"),
            n("Mul", ["x", "t"], "u"), n("Mul", ["u", "c_half"], "y")], consts(c_sqrt2=sqrt2, c_one=1.0, c_half=0.5)


def erf_mul_half_last_swapped():
    """erf(x * 0.70710677), constants on the left, (t * x) * 0.5"""
    return [n("Mul", ["c_inv", "x"], "d"), n("Erf", ["d"], "e"), n("Add", ["c_one", "e"], "t"),
            n("Mul", ["t", "x"], "u"), n("Mul", ["c_half", "u"], "y")], consts(c_inv=0.70710677, c_one=1.0, c_half=0.5)


def erf_half_x_first():
    """(x * 0.5) * (1 + erf(x / sqrt2)), constants of shape [1]"""
    return [n("Mul", ["x", "c_half"], "h"), n("Div", ["x", "c_sqrt2"], "d"), n("Erf", ["d"], "e"),
            n("Add", ["e", "c_one"], "t"), n("Mul", ["h", "t"], "y")], \
        consts(c_sqrt2=[1.4142135], c_one=[1.0], c_half=[0.5])


def erf_half_on_one_plus():
    """x * ((1 + erf(x / sqrt2)) * 0.5)"""
    return [n("Div", ["x", "c_sqrt2"], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "c_one"], "t"),
            n("Mul", ["t", "c_half"], "u"), n("Mul", ["x", "u"], "y")], consts(c_sqrt2=1.4142135, c_one=1.0, c_half=0.5)


def tanh_torch(kappa=0.044715):
    """torch's approximate='tanh' export: 0.5 * (x * (1 + tanh(beta * (x + kappa * (x * (x * x))))))"""
    return [n("Mul", ["x", "x"], "sq"), n("Mul", ["x", "sq"], "cube"), n("Mul", ["c_kappa", "cube"], "k"),
            n("Add", ["x", "k"], "s"), n("Mul", ["c_beta", "s"], "i"), n("Tanh", ["i"], "th"),
            n("Add", ["c_one", "th"], "t"), n("Mul", ["x", "t"], "u"), n("Mul", ["c_half", "u"], "y")], \
        consts(c_kappa=kappa, c_beta=math.sqrt(2 / math.pi), c_one=1.0, c_half=0.5)


def tanh_pow():
    """HF NewGELU: 0.5 * x * (1 + tanh(beta * (x + 0.044715 * pow(x, 3))))"""
    return [n("Pow", ["x", "c_three"], "cube"), n("Mul", ["cube", "c_kappa"], "k"), n("Add", ["k", "x"], "s"),
            n("Mul", ["s", "c_beta"], "i"), n("Tanh", ["i"], "th"), n("Add", ["th", "c_one"], "t"),
            n("Mul", ["c_half", "x"], "h"), n("Mul", ["h", "t"], "y")], \
        consts(c_three=3.0, c_kappa=0.044715, c_beta=0.7978845608, c_one=1.0, c_half=0.5)


def build(pattern, opset=20, extra_outputs=()):
    nodes, inits = pattern
    outputs = [vinfo("y", SHAPE)] + [vinfo(o, SHAPE) for o in extra_outputs]
    return make_model(nodes, [vinfo("x", SHAPE)], outputs, inits, opset=opset)


def run(model):
    out, report = optimize_with(model, PASSES)
    assert report.validation["status"] == "passed"
    assert_same_outputs(model, out)
    return out, report


@pytest.mark.parametrize("pattern", [erf_torch, erf_mul_half_last_swapped, erf_half_x_first, erf_half_on_one_plus])
def test_erf_gelu(pattern):
    out, _ = run(build(pattern()))
    assert ops(out) == ["Gelu"]
    assert not out.graph.node[0].attribute
    assert out.graph.output[0].name == "y"


@pytest.mark.parametrize("pattern", [tanh_torch, tanh_pow])
def test_tanh_gelu(pattern):
    out, _ = run(build(pattern()))
    assert ops(out) == ["Gelu"]
    assert helper.get_attribute_value(out.graph.node[0].attribute[0]) == b"tanh"


def test_declines_below_opset_20():
    model = build(erf_torch(), opset=17)
    out, report = run(model)
    assert ops(out) == ops(model)
    assert any("opset >= 20" in r for r in pass_stats(report, "fuse_gelu")["rejections"])
    assert out.opset_import[0].version == 17


@pytest.mark.parametrize("pattern", [lambda: erf_torch(sqrt2=1.5), lambda: tanh_torch(kappa=0.05)])
def test_declines_wrong_constant(pattern):
    model = build(pattern())
    out, _ = run(model)
    assert ops(out) == ops(model)


def test_declines_intermediate_with_other_consumer():
    model = build(erf_torch(), extra_outputs=["e"])
    out, _ = run(model)
    assert ops(out) == ops(model)


def test_two_gelus_sharing_constants():
    nodes, inits = erf_torch()
    second = [helper.make_node(nd.op_type, [i if i.startswith("c_") else i + "2" for i in nd.input],
                               [nd.output[0] + "2"]) for nd in nodes]
    second[0].input[0] = second[3].input[0] = "y"
    model = make_model(nodes + second, [vinfo("x", SHAPE)], [vinfo("y2", SHAPE)], inits, opset=20)
    out, _ = run(model)
    assert ops(out) == ["Gelu", "Gelu"]


def test_inside_if_branch():
    def branch(tag):
        nodes, _ = erf_torch()
        rename = lambda s: s if s in ("x",) or s.startswith("c_") else f"{tag}_{s}"
        body = [helper.make_node(nd.op_type, [rename(i) for i in nd.input], [rename(nd.output[0])]) for nd in nodes]
        return helper.make_graph(body, tag, [], [vinfo(f"{tag}_y", SHAPE)])

    _, inits = erf_torch()
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch("t"), else_branch=branch("e"))],
                       [vinfo("c", [], TensorProto.BOOL), vinfo("x", SHAPE)], [vinfo("y", SHAPE)], inits, opset=20)
    out, _ = optimize_with(model, PASSES)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    for flag in (True, False):
        assert_same_outputs(model, out, feeds=[{"c": np.array(flag), "x": x}])
    for attr in out.graph.node[0].attribute:
        assert [nd.op_type for nd in attr.g.node] == ["Gelu"]
