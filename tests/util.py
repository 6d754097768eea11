"""Test helpers: build small models with onnx.helper and check passes with ONNX Runtime."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxslim_opt.api import OptimizeOptions, run

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
MODELS = REPO / "models"


def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def vinfo(name: str, shape: Optional[Sequence], dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, ir_version: Optional[int] = None,
               extra_opsets: Iterable = ()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset)] + list(extra_opsets)
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tests")
    model.ir_version = ir_version or min(onnx.IR_VERSION, 8 if opset <= 17 else 10)
    onnx.checker.check_model(model)
    return model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def random_feeds(model: onnx.ModelProto, count: int = 3, seed: int = 0, shapes: Optional[dict] = None):
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = []
    for _ in range(count):
        feed = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = (shapes or {}).get(vi.name) or [d.dim_value if d.dim_value > 0 else 1 for d in tt.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if np.issubdtype(dtype, np.floating):
                feed[vi.name] = rng.standard_normal(shape).astype(dtype)
            else:
                feed[vi.name] = rng.integers(0, 2, shape).astype(dtype)
        feeds.append(feed)
    return feeds


def assert_same_outputs(original: onnx.ModelProto, optimized: onnx.ModelProto, rtol=1e-4, atol=1e-5,
                        feeds=None, shapes=None) -> None:
    """Both models give the same outputs on the same seeded inputs (ORT, optimizations off)."""
    feeds = feeds or random_feeds(original, shapes=shapes)
    a, b = session(original), session(optimized)
    assert [o.name for o in a.get_outputs()] == [o.name for o in b.get_outputs()]
    for feed in feeds:
        for x, y, out in zip(a.run(None, feed), b.run(None, feed), a.get_outputs()):
            np.testing.assert_allclose(y, x, rtol=rtol, atol=atol, err_msg=f"output {out.name}")


def optimize_with(model: onnx.ModelProto, passes: Optional[Sequence[str]] = None, **options):
    """Run the real pipeline (with its own ORT validation) on an in-memory model; return (model, report)."""
    outcome = run(model, None, OptimizeOptions(passes=passes, **options))
    return outcome.model, outcome.report


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def pass_stats(report, name: str) -> dict:
    return next(p for p in report.passes if p["name"] == name)


def check_rewrite(model: onnx.ModelProto, passes: Sequence[str], expect: list[str], focus: str,
                  concrete: Optional[Sequence[int]] = None, input_name: str = "x"):
    """Run `passes` through the real pipeline (with its ORT validation), require the op list
    `expect` (the `focus` pass's rejections explain a mismatch) and equal outputs under ORT.
    `concrete` fixes the dynamic dims of input `input_name`. Returns (model, report)."""
    shapes = {input_name: tuple(concrete)} if concrete else None
    out, report = optimize_with(model, passes, input_shapes=shapes)
    assert report.validation["status"] == "passed", report.validation
    assert ops(out) == expect, pass_stats(report, focus)["rejections"]
    assert_same_outputs(model, out, shapes=shapes)
    return out, report
