"""Time one layer against its factored replacement with ONNX Runtime (for passes/lowrank.py).

Each side is a stand-alone model fed with the layer's real input shape; sessions use one
intra-op thread, runs are interleaved (original, factored, original, ...) so drifts in clock
speed hit both alike, and the medians are compared.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ._lowrank_decomp import Step

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
             "dml": "DmlExecutionProvider", "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider"}


def provider_for(target: str) -> str:
    """ORT provider name of `--target-ep`; raises ValueError when it is not available here."""
    name = PROVIDERS.get(target.lower(), target)
    available = ort.get_available_providers()
    if name not in available:
        raise ValueError(f"--target-ep {target}: {name} is not available in this ONNX Runtime "
                         f"(available: {', '.join(available)})")
    return name


def steps_model(steps: Sequence[Step], in_shape: Sequence[int], opset: int, extra: Optional[list] = None) -> onnx.ModelProto:
    """A model running `steps` on one input of `in_shape` (float32)."""
    nodes, inits, prev = [], [], "x"
    for i, s in enumerate(steps):
        ins = [prev, f"w{i}"]
        inits.append(numpy_helper.from_array(np.ascontiguousarray(s.weight), f"w{i}"))
        if s.bias is not None:
            ins.append(f"b{i}")
            inits.append(numpy_helper.from_array(np.ascontiguousarray(s.bias), f"b{i}"))
        out = "y" if i == len(steps) - 1 else f"t{i}"
        nodes.append(helper.make_node(s.op, ins, [out], **s.attrs))
        prev = out
    dtype = helper.np_dtype_to_tensor_dtype(steps[0].weight.dtype)
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", dtype, list(in_shape))],
                              [helper.make_tensor_value_info("y", dtype, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 11))])
    model.ir_version = min(onnx.IR_VERSION, 8)
    return model


def _session(model: onnx.ModelProto, provider: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=[provider])


def compare(original: onnx.ModelProto, factored: onnx.ModelProto, in_shape: Sequence[int], runs: int,
            provider: str = "CPUExecutionProvider", seed: int = 0) -> tuple[float, float]:
    """Median seconds per call of (original, factored), interleaved; each sample repeats the call
    enough times to last about a millisecond so timer resolution does not decide."""
    x = np.random.default_rng(seed).standard_normal(list(in_shape)).astype(np.float32)
    sessions = [_session(original, provider), _session(factored, provider)]
    feeds = {"x": x}
    for s in sessions:
        for _ in range(2):
            s.run(None, feeds)
    t0 = time.perf_counter()
    sessions[0].run(None, feeds)
    single = max(time.perf_counter() - t0, 1e-7)
    reps = int(min(max(1, 1e-3 / single), 200))
    samples: list[list[float]] = [[], []]
    for _ in range(max(runs, 1)):
        for k, s in enumerate(sessions):
            t0 = time.perf_counter()
            for _ in range(reps):
                s.run(None, feeds)
            samples[k].append((time.perf_counter() - t0) / reps)
    return float(np.median(samples[0])), float(np.median(samples[1]))
