"""Check that a Q/DQ placement fuses: what ONNX Runtime's CPU optimizer actually runs.

ORT rewrites DQ -> op -> Q node units into integer kernels while it loads a model; the graph it
ends up running is written with `SessionOptions.optimized_model_filepath`. Counting integer vs
float kernels there is the only reliable test of a placement (selectors have many conditions).
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from typing import Any

import onnx

#: float op -> the integer kernels ORT may turn it into
FUSED_FORMS = {
    "Conv": ("QLinearConv",),
    "Add": ("QLinearAdd",),
    "Gemm": ("QGemm",),
    "MatMul": ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger"),
    "GlobalAveragePool": ("QLinearGlobalAveragePool",),
    "AveragePool": ("QLinearAveragePool",),
    "Concat": ("QLinearConcat",),
}
#: float forms ORT's own fusions give the same ops (Conv+Relu -> FusedConv...)
FLOAT_FORMS = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul", "NhwcFusedConv": "Conv"}


def ort_optimized_ops(model: onnx.ModelProto, level: str = "extended") -> tuple[Counter, list[tuple[str, str]]]:
    """(op histogram, [(node name, op)]) of the graph ORT CPU runs for `model`, 1 thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="onnxslim-qdq-") as scratch:
        so.optimized_model_filepath = os.path.join(scratch, "optimized.onnx")
        data = model.SerializeToString()
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath)
    nodes = [(n.name, n.op_type) for n in optimized.graph.node]
    return Counter(op for _, op in nodes), nodes


def fusion_summary(model: onnx.ModelProto, quantized_nodes: list[tuple[str, str]],
                   float_candidates: list[str] = (), level: str = "extended") -> dict[str, Any]:
    """Per op type: how many became integer kernels in ORT, how many float candidates (nodes we
    quantized or declined; not shape arithmetic) stayed float, and which quantized ones did."""
    ops, nodes = ort_optimized_ops(model, level)
    candidates = {n for n, _ in quantized_nodes} | set(float_candidates)
    candidates.discard("")
    left = Counter(FLOAT_FORMS.get(op, op) for name, op in nodes
                   if (op in FUSED_FORMS or op in FLOAT_FORMS) and _named(name, candidates))
    per_op: dict[str, dict[str, int]] = {}
    for op, fused_forms in FUSED_FORMS.items():
        fused = sum(ops[f] for f in fused_forms)
        unfused = left[op]
        if fused or unfused:
            per_op[op] = {"fused": fused, "float": unfused}
    float_names = [name for name, op in nodes if op in FUSED_FORMS or op in FLOAT_FORMS]
    not_fused = [{"node": name, "op": op, "reason": "Q/DQ placed but ONNX Runtime left it float"}
                 for name, op in quantized_nodes if name and any(_named(f, {name}) for f in float_names)]
    return {"ort_level": level, "ops": per_op, "not_fused": not_fused,
            "qdq_left": {"QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"]}}


def _named(name: str, candidates: set) -> bool:
    """ORT keeps a node's name, or extends it when it fuses an activation into it (FusedConv)."""
    return name in candidates or any(name.startswith(c + "_") for c in candidates)
