import numpy as np
import pytest
from onnx import TensorProto, helper

from util import assert_same_outputs, make_model, optimize_with, ops, pass_stats, tensor, vinfo

PASSES = ["fuse_pad", "eliminate_dead_code"]
RNG = np.random.default_rng(0)
X = [1, 2, 5, 6]


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def pad_node(pads, opset=17, value=None, mode="constant", axes=None, out="p"):
    """A Pad in the form of `opset`, plus the initializers it needs."""
    if opset < 11:
        attrs = {"pads": pads, "mode": mode}
        if value is not None:
            attrs["value"] = float(value)
        return helper.make_node("Pad", ["x"], [out], **attrs), []
    inits = [tensor(out + "_pads", np.array(pads, np.int64))]
    inputs = ["x", out + "_pads"]
    if value is not None or axes is not None:
        inputs.append(out + "_value" if value is not None else "")
        if value is not None:
            inits.append(tensor(out + "_value", np.array(value, np.float32)))
    if axes is not None:
        inputs.append(out + "_axes")
        inits.append(tensor(out + "_axes", np.array(axes, np.int64)))
    return helper.make_node("Pad", inputs, [out], mode=mode), inits


def model_with(consumer, pads, opset=17, x_shape=X, extra_outputs=(), **pad_kwargs):
    pad, inits = pad_node(pads, opset, **pad_kwargs)
    if consumer.op_type == "Conv":
        channels = x_shape[1] + (pads[1] + pads[len(pads) // 2 + 1] if "axes" not in pad_kwargs else 0)
        inits.append(tensor("w", rand(3, channels, *[3] * (len(x_shape) - 2))))
    outputs = [vinfo("y", ["d%d" % i for i in range(len(x_shape))])]
    outputs += [vinfo(name, ["e%d" % i for i in range(len(x_shape))]) for name in extra_outputs]
    return make_model([pad, consumer], [vinfo("x", x_shape)], outputs, inits, opset=opset)


def conv(**attrs):
    return helper.make_node("Conv", ["p", "w"], ["y"], **attrs)


def check(model, expect_ops):
    out, report = optimize_with(model, PASSES)
    assert report.validation["status"] == "passed"
    assert_same_outputs(model, out)
    assert ops(out) == expect_ops
    return out, report


def attrs_of(model, op):
    node = next(n for n in model.graph.node if n.op_type == op)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def reasons(report):
    return list(pass_stats(report, "fuse_pad")["rejections"])


@pytest.mark.parametrize("opset", [10, 13, 18])
def test_pad_into_conv(opset):
    model = model_with(conv(pads=[1, 0, 0, 1]), [0, 0, 1, 2, 0, 0, 2, 1], opset=opset)
    out, _ = check(model, ["Conv"])
    assert attrs_of(out, "Conv")["pads"] == [2, 2, 2, 2]


def test_explicit_zero_value_and_1d_conv():
    model = model_with(conv(), [0, 0, 2, 0, 0, 1], x_shape=[1, 2, 7], value=0.0)
    out, _ = check(model, ["Conv"])
    assert attrs_of(out, "Conv")["pads"] == [2, 1]


@pytest.mark.parametrize("axes", [[2, 3], [-2, -1], [3, 2]])
def test_opset18_axes(axes):
    model = model_with(conv(), [1, 2, 3, 0], opset=18, axes=axes)
    out, _ = check(model, ["Conv"])
    begin = dict(zip(axes, [1, 2]))
    end = dict(zip(axes, [3, 0]))
    norm = lambda d: {a % 4: v for a, v in d.items()}
    begin, end = norm(begin), norm(end)
    assert attrs_of(out, "Conv")["pads"] == [begin[2], begin[3], end[2], end[3]]


def test_conv_valid_auto_pad():
    check(model_with(conv(auto_pad="VALID"), [0, 0, 1, 1, 0, 0, 1, 1]), ["Conv"])


def test_average_pool_counting_pad():
    pool = helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 0, 0], count_include_pad=1)
    out, _ = check(model_with(pool, [0, 0, 1, 0, 0, 0, 0, 1]), ["AveragePool"])
    assert attrs_of(out, "AveragePool")["pads"] == [2, 1, 0, 1]


def test_average_pool_without_own_pads_starts_counting():
    pool = helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2])
    out, _ = check(model_with(pool, [0, 0, 1, 2, 0, 0, 2, 1]), ["AveragePool"])
    assert attrs_of(out, "AveragePool")["count_include_pad"] == 1


def test_declines_average_pool_excluding_own_pads():
    pool = helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    _, report = check(model_with(pool, [0, 0, 1, 1, 0, 0, 1, 1]), ["Pad", "AveragePool"])
    assert any("excludes its own padding" in r for r in reasons(report))


def test_max_pool_with_minus_inf_pad():
    pool = helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3])
    check(model_with(pool, [0, 0, 1, 1, 0, 0, 1, 1], value=-np.inf), ["MaxPool"])


def test_declines_max_pool_with_zero_pad():
    pool = helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3])
    _, report = check(model_with(pool, [0, 0, 1, 1, 0, 0, 1, 1]), ["Pad", "MaxPool"])
    assert any("-inf" in r for r in reasons(report))


def test_declines_pool_pad_not_smaller_than_kernel():
    pool = helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[2, 2], count_include_pad=1)
    _, report = check(model_with(pool, [0, 0, 2, 0, 0, 0, 0, 0]), ["Pad", "AveragePool"])
    assert "merged pads would not be smaller than the kernel" in reasons(report)


def test_declines_channel_axis():
    _, report = check(model_with(conv(), [0, 1, 1, 1, 0, 0, 1, 1]), ["Pad", "Conv"])
    assert "Pad touches the batch or channel axis" in reasons(report)


def test_declines_reflect():
    _, report = check(model_with(conv(), [0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"), ["Pad", "Conv"])
    assert any("reflect" in r for r in reasons(report))


@pytest.mark.parametrize("opset", [10, 17])
def test_declines_nonzero_value(opset):
    check(model_with(conv(), [0, 0, 1, 1, 0, 0, 1, 1], opset=opset, value=1.5), ["Pad", "Conv"])


def test_declines_negative_pads():
    check(model_with(conv(), [0, 0, -1, 1, 0, 0, 1, 1]), ["Pad", "Conv"])


def test_declines_same_auto_pad():
    check(model_with(conv(auto_pad="SAME_UPPER"), [0, 0, 1, 1, 0, 0, 1, 1]), ["Pad", "Conv"])


def test_declines_pad_with_second_consumer():
    pad, inits = pad_node([0, 0, 1, 1, 0, 0, 1, 1])
    nodes = [pad, conv(), helper.make_node("Relu", ["p"], ["r"])]
    inits.append(tensor("w", rand(3, 2, 3, 3)))
    model = make_model(nodes, [vinfo("x", X)], [vinfo("y", [1, 3, 5, 6]), vinfo("r", [1, 2, 7, 8])], inits)
    check(model, ["Pad", "Conv", "Relu"])


def test_inside_if_branch():
    pad, inits = pad_node([0, 0, 1, 1, 0, 0, 1, 1])

    def branch(tag):
        nodes = [helper.make_node("Pad", pad.input, [tag + "_p"]), helper.make_node("Conv", [tag + "_p", "w"], [tag + "_y"])]
        return helper.make_graph(nodes, tag, [], [vinfo(tag + "_y", [1, 3, 6, 7])])

    inits.append(tensor("w", rand(3, 2, 2, 2)))
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch("t"), else_branch=branch("e"))],
                       [vinfo("c", [], TensorProto.BOOL), vinfo("x", X)], [vinfo("y", [1, 3, 6, 7])], inits)
    out, _ = optimize_with(model, PASSES)
    for flag in (True, False):
        assert_same_outputs(model, out, feeds=[{"c": np.array(flag), "x": rand(*X)}])
    for attr in out.graph.node[0].attribute:
        assert [n.op_type for n in attr.g.node] == ["Conv"]
