"""The comparison rule behind validation: strict enough to catch a wrong channel, not so strict
that float reassociation in deep networks fails."""
import numpy as np

from onnxslim_opt.validate import compare_values


def test_rounding_noise_near_zero_in_a_large_output_passes():
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal(1000) * 300).astype(np.float32)
    ref[0] = 1e-3  # an element near zero
    got = ref.copy()
    got[0] += 5e-4  # what folding BN moves it by in a 50-layer net (ORT's own fusion does too)
    c = compare_values("y", ref, got, rtol=1e-4, atol=1e-5)
    assert c.matches and c.max_rel_diff > 0.1


def test_a_wrong_element_fails():
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal(1000) * 300).astype(np.float32)
    got = ref.copy()
    got[7] *= 1.01
    got[7] += 3  # a real bug: off by 1% plus a bias
    assert not compare_values("y", ref, got, rtol=1e-4, atol=1e-5).matches


def test_small_outputs_are_held_to_atol():
    ref = np.full(100, 1e-6, np.float32)
    got = ref + 2e-5
    assert not compare_values("y", ref, got, rtol=1e-4, atol=1e-5).matches


def test_nan_and_inf_must_match():
    ref = np.array([np.nan, np.inf, 1.0], np.float32)
    assert compare_values("y", ref, ref.copy(), 1e-4, 1e-5).matches
    assert not compare_values("y", ref, np.array([0.0, np.inf, 1.0], np.float32), 1e-4, 1e-5).matches


def test_integer_and_structured_outputs_compare_exactly():
    assert compare_values("i", np.array([1, 2]), np.array([1, 2]), 1e-4, 1e-5).matches
    assert not compare_values("i", np.array([1, 2]), np.array([1, 3]), 1e-4, 1e-5).matches
    zipmap = [{0: 0.25, 1: 0.75}]
    assert compare_values("z", zipmap, [{0: 0.25, 1: 0.75}], 1e-4, 1e-5).matches
    assert not compare_values("z", zipmap, [{0: 0.5, 1: 0.5}], 1e-4, 1e-5).matches


def _selector(tmp_path, name, bias, data, extra_out_scale=1.0):
    """s = x + bias -> TopK(k=1) -> Gather(data, index): a detector-like selection."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Add", ["x", "bias"], ["s"], name="add"),
             helper.make_node("TopK", ["s", "k"], ["vals", "idx"], axis=0, name="topk"),
             helper.make_node("Gather", ["data", "idx"], ["picked"], axis=0, name="gather"),
             helper.make_node("Mul", ["x", "scale"], ["plain"], name="mul")]
    inits = [numpy_helper.from_array(np.asarray(bias, np.float32), "bias"),
             numpy_helper.from_array(np.array([1], np.int64), "k"),
             numpy_helper.from_array(np.asarray(data, np.float32), "data"),
             numpy_helper.from_array(np.array(extra_out_scale, np.float32), "scale")]
    graph = helper.make_graph(nodes, "sel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("picked", TensorProto.FLOAT, [1]),
                               helper.make_tensor_value_info("plain", TensorProto.FLOAT, [4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_selection_flip_on_near_ties_is_explained_not_failed(tmp_path):
    from onnxslim_opt.validate import validate

    a = _selector(tmp_path, "a.onnx", [0, 1e-6, 0, 0], [10, 20, 30, 40])
    b = _selector(tmp_path, "b.onnx", [1e-6, 0, 0, 0], [10, 20, 30, 40])  # rounding-level change: flips TopK
    samples = [{"x": np.array([0.5, 0.5, 0.1, 0.2], np.float32)}]
    r = validate(a, b, samples)
    assert r.status == "passed" and "selection flipping" in r.message
    assert not next(o for o in r.outputs if o.name == "picked").matches


def test_a_real_error_behind_a_selection_still_fails(tmp_path):
    from onnxslim_opt.validate import validate

    a = _selector(tmp_path, "a.onnx", [0, 1e-6, 0, 0], [10, 20, 30, 40])
    b = _selector(tmp_path, "b.onnx", [1e-6, 0, 0, 0], [10, 21, 30, 40])  # the gathered data is wrong
    samples = [{"x": np.array([0.5, 0.5, 0.1, 0.2], np.float32)}]
    assert validate(a, b, samples).status == "failed"
    c = _selector(tmp_path, "c.onnx", [1e-6, 0, 0, 0], [10, 20, 30, 40], extra_out_scale=1.5)  # output outside
    assert validate(a, c, samples).status == "failed"
