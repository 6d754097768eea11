"""Q/DQ placement for ONNX Runtime's CPU execution provider (anchor-numbers.md, D.1).

Placement is planned first (which nodes are quantized, which tensors need ranges, which
Relu/Clip are absorbed), so calibration runs on the untouched graph; `apply` then edits.
Rules followed, so every DQ -> op -> Q becomes one integer kernel in ORT:
- uint8 asymmetric activations, int8 symmetric per-channel weights, int32 bias with scale =
  input scale x weight scale (Conv, Gemm);
- every consumer of a quantized tensor reads its own DQ (a node unit's DQ feeds only it);
- residual Add: both inputs and the output quantized (QLinearAdd);
- data-movement ops share their input's scale/zero point (ORT then drops the Q/DQ around them);
  Concat becomes QLinearConcat, which rescales each input (shared scales are a TensorRT need);
- a Relu/Clip right after a quantized op is removed when the output Q's range makes it redundant;
- a node producing a graph output keeps a float output (Gemm/MatMul may still take integer
  inputs: QGemm / MatMulIntegerToFloat have float outputs).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import constant_value, fresh_name, is_graph_output, is_standard, optional_input

#: ops that become integer kernels (their activations in and out are quantized)
COMPUTE = ("Conv", "Gemm", "MatMul", "Add", "GlobalAveragePool", "AveragePool", "Concat")
#: ops that only move data: their output shares the input's scale (ORT drops the Q/DQ pair)
MOVE = ("Reshape", "Transpose", "Flatten", "MaxPool", "Resize", "Slice", "Gather", "Squeeze", "Unsqueeze")
ACTIVATIONS = ("Relu", "Clip")
F32 = np.dtype(np.float32)


@dataclass
class Placement:
    """What to quantize. Tensors are keyed by name (ranges come back from calibration by name)."""

    nodes: list = field(default_factory=list)               # accepted compute nodes
    moves: list = field(default_factory=list)               # data-movement nodes run in int8
    quantized: dict = field(default_factory=dict)           # name -> tensor (canonical, gets a Q)
    absorbed: dict = field(default_factory=dict)            # activation node name -> (node, producer output)
    range_of: dict = field(default_factory=dict)            # quantized name -> name whose range to use
    groups: dict = field(default_factory=dict)              # quantized name -> group root name
    declined: list = field(default_factory=list)            # (node, reason)

    def calibrated_tensors(self) -> list[str]:
        return sorted(set(self.range_of.values()))


def parse_exclude(text: str) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def excluded(node: gs.Node, patterns: list[str]) -> bool:
    for p in patterns:
        if p == node.name or p == node.op:
            return True
        try:
            if re.fullmatch(p, node.name or ""):
                return True
        except re.error:
            continue
    return False


def _float_var(t: Optional[gs.Tensor]) -> bool:
    return (t is not None and isinstance(t, gs.Variable) and constant_value(t) is None
            and t.dtype is not None and np.dtype(t.dtype) == F32)


def _const_f32(t: Optional[gs.Tensor]) -> Optional[np.ndarray]:
    v = constant_value(t)
    return v if v is not None and v.dtype == F32 else None


def _check_compute(node: gs.Node, graph: gs.Graph) -> Optional[str]:
    """None if `node` can be quantized for ORT CPU, else why not."""
    out = node.outputs[0]
    float_out_ok = node.op in ("Gemm", "MatMul")
    if is_graph_output(graph, out) and not float_out_ok:
        return "produces a graph output (ORT fuses no integer kernel whose output is a graph output)"
    if node.op == "Conv":
        w = _const_f32(node.inputs[1])
        if not _float_var(node.inputs[0]) or w is None or w.ndim < 3:
            return "Conv input is not float32 or its weight is not a float32 constant"
        b = optional_input(node, 2)
        if b is not None and _const_f32(b) is None:
            return "Conv bias is not a float32 constant"
    elif node.op == "Gemm":
        w = _const_f32(node.inputs[1])
        if not _float_var(node.inputs[0]) or w is None or w.ndim != 2:
            return "Gemm input is not float32 or B is not a 2-D float32 constant"
        if node.attrs.get("transA", 0):
            return "Gemm with transA=1 is not quantized"
        c = optional_input(node, 2)
        if c is not None:
            cv = _const_f32(c)
            n = w.shape[0] if node.attrs.get("transB", 0) else w.shape[1]
            if cv is None or cv.size != n or cv.shape[-1] != n:
                return "Gemm bias C is not a float32 constant of N values (QGemm needs a per-column bias)"
            if float(node.attrs.get("beta", 1.0)) != 1.0:
                return "Gemm with beta != 1 (QGemm needs beta == 1)"
    elif node.op == "MatMul":
        w = _const_f32(node.inputs[1])
        if not _float_var(node.inputs[0]) or w is None or w.ndim != 2:
            return "MatMul without a 2-D float32 constant second input stays float"
    elif node.op in ("Add", "Concat"):
        if not all(_float_var(t) for t in node.inputs):
            return f"{node.op} with a constant or non-float32 operand stays float"
    elif node.op in ("GlobalAveragePool", "AveragePool"):
        if not _float_var(node.inputs[0]) or len(node.outputs) != 1:
            return "input is not float32"
    return None


def _move_ok(node: gs.Node, graph: gs.Graph) -> bool:
    if len(node.outputs) != 1 or is_graph_output(graph, node.outputs[0]):
        return False
    if node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", "linear"):
        return False
    return _float_var(node.inputs[0])


def _absorbable(act: gs.Node, graph: gs.Graph) -> bool:
    if act.op == "Relu":
        return not is_graph_output(graph, act.outputs[0])
    if act.op == "Clip" and not is_graph_output(graph, act.outputs[0]):
        lo, hi = clip_bounds(act)  # Relu6-like: a uint8 Q with zero point 0 clamps the same way
        return lo == 0.0 and hi is not None and hi > 0.0
    return False


def clip_bounds(act: gs.Node) -> tuple[Optional[float], Optional[float]]:
    if "min" in act.attrs or "max" in act.attrs:
        return float(act.attrs.get("min", -np.inf)), float(act.attrs.get("max", np.inf))
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        t = optional_input(act, i)
        v = None if t is None else constant_value(t)
        if t is not None and v is None:
            return None, None
        bounds.append(default if v is None else float(np.asarray(v).reshape(-1)[0]))
    return bounds[0], bounds[1]


def plan(graph: gs.Graph, exclude: list[str], opset: int) -> Placement:
    """Decide what to quantize in the main graph (subgraphs stay float)."""
    p = Placement()
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    def union(a: str, b: str) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[rb] = ra

    def mark(t: gs.Tensor, range_name: Optional[str] = None) -> None:
        p.quantized.setdefault(t.name, t)
        p.range_of.setdefault(t.name, range_name or t.name)
        parent.setdefault(t.name, t.name)

    for node in graph.nodes:
        if node.op not in COMPUTE or not is_standard(node):
            continue
        if not any(_float_var(t) for t in node.inputs[:1 if node.op not in ("Add", "Concat") else None]):
            continue  # integer or shape arithmetic: not a float candidate at all
        if excluded(node, exclude):
            p.declined.append((node, "excluded by --exclude"))
            continue
        reason = _check_compute(node, graph)
        if reason:
            p.declined.append((node, reason))
            continue
        p.nodes.append(node)
    accepted = {id(n) for n in p.nodes}
    for node in p.nodes:
        activations = node.inputs[:1] if node.op in ("Conv", "Gemm", "MatMul", "GlobalAveragePool", "AveragePool") \
            else node.inputs
        for t in activations:
            mark(t)
        out = node.outputs[0]
        if is_graph_output(graph, out):
            continue
        act = out.outputs[0] if len(out.outputs) == 1 else None
        if not (act is not None and act.op in ACTIVATIONS and is_standard(act) and not excluded(act, exclude)
                and _absorbable(act, graph)):
            act = None
        readers = list(out.outputs) + (list(act.outputs[0].outputs) if act is not None else [])
        if node.op in ("Gemm", "MatMul") and not any(id(c) in accepted for c in readers):
            continue  # float output: QGemm / MatMulIntegerToFloat
        if act is not None:
            p.absorbed[id(act)] = (act, out)
            mark(out, act.outputs[0].name)
        else:
            mark(out)
    # tensors an absorbed activation produced are read through the producer's quantized output
    alias = {act.outputs[0].name: out.name for act, out in p.absorbed.values()}
    for node in p.nodes:  # inputs that are absorbed activations' outputs: use the producer's tensor
        for t in node.inputs:
            if t.name in alias and t.name in p.quantized:
                del p.quantized[t.name]
                del p.range_of[t.name]
                union(alias[t.name], t.name)
    for node in graph.nodes:  # data movement: topological order, so chains propagate
        if node.op not in MOVE or not is_standard(node) or excluded(node, exclude):
            continue
        if node.op == "MaxPool" and (opset < 12 or len(node.outputs) != 1):
            continue
        src = alias.get(node.inputs[0].name, node.inputs[0].name) if node.inputs else None
        if src not in p.quantized or not _move_ok(node, graph):
            continue
        out = node.outputs[0]
        mark(out)
        union(src, out.name)
        p.moves.append(node)
    p.groups = {name: root(alias.get(name, name)) for name in p.quantized}
    return p


# ----------------------------------------------------------------------------- numbers
def activation_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """uint8 asymmetric scale/zero point whose range holds [lo, hi] and exactly 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("non-finite calibration range")
    if hi - lo <= 0:
        return np.float32(1.0), np.uint8(0)
    scale = np.float32((hi - lo) / 255.0)
    zp = int(np.clip(np.round(-lo / float(scale)), 0, 255))
    return scale, np.uint8(zp)


def weight_params(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric per-channel: (quantized weight, scales)."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    max_abs = np.abs(w).max(axis=reduce) if w.size else np.zeros(w.shape[axis], np.float32)
    scale = np.where(max_abs > 0, max_abs / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


# ----------------------------------------------------------------------------- editing
def apply(graph: gs.Graph, p: Placement, ranges: dict[str, tuple[float, float]]) -> dict:
    """Insert the Q/DQ nodes and quantized weights; returns counts for the report."""
    group_range: dict[str, tuple[float, float]] = {}
    for name in p.quantized:
        lo, hi = ranges[p.range_of[name]]
        g = p.groups[name]
        glo, ghi = group_range.get(g, (np.inf, -np.inf))
        group_range[g] = (min(glo, lo), max(ghi, hi))
    params: dict[str, tuple[gs.Constant, gs.Constant]] = {}
    for g, (lo, hi) in group_range.items():
        s, z = activation_params(lo, hi)
        params[g] = (gs.Constant(fresh_name(graph, f"{g}_scale"), np.array(s, np.float32)),
                     gs.Constant(fresh_name(graph, f"{g}_zero_point"), np.array(z, np.uint8)))
    scale_of = {name: params[p.groups[name]] for name in p.quantized}
    alias = {act.outputs[0].name: out.name for act, out in p.absorbed.values()}
    x_names = {id(n): alias.get(n.inputs[0].name, n.inputs[0].name) for n in p.nodes}
    for act, out in p.absorbed.values():
        for c in list(act.outputs[0].outputs):
            for i, t in enumerate(c.inputs):
                if t is act.outputs[0]:
                    c.inputs[i] = out
        act.inputs.clear()
        act.outputs.clear()
    absorbed = {id(act) for act, _ in p.absorbed.values()}
    graph.nodes = [n for n in graph.nodes if id(n) not in absorbed]
    new_nodes = []
    for name, tensor in p.quantized.items():
        scale, zp = scale_of[name]
        readers = list(tensor.outputs)
        if not readers:
            continue
        q_out = gs.Variable(fresh_name(graph, f"{name}_quantized"), np.uint8, tensor.shape)
        new_nodes.append(gs.Node("QuantizeLinear", fresh_name(graph, f"{name}_QuantizeLinear"),
                                 inputs=[tensor, scale, zp], outputs=[q_out]))
        for reader in readers:
            dq_out = gs.Variable(fresh_name(graph, f"{name}_dequantized"), np.float32, tensor.shape)
            new_nodes.append(gs.Node("DequantizeLinear", fresh_name(graph, f"{name}_DequantizeLinear"),
                                     inputs=[q_out, scale, zp], outputs=[dq_out]))
            for i, t in enumerate(reader.inputs):
                if t is tensor:
                    reader.inputs[i] = dq_out
    for node in p.nodes:
        if node.op in ("Conv", "Gemm", "MatMul"):
            new_nodes += _quantize_weights(graph, node, scale_of[x_names[id(node)]][0])
    graph.nodes.extend(new_nodes)
    graph.cleanup(remove_unused_graph_inputs=False, remove_unused_node_outputs=False)
    graph.toposort()
    return {"absorbed_activations": len(p.absorbed), "quantized_tensors": len(p.quantized)}


def _quantize_weights(graph: gs.Graph, node: gs.Node, x_scale: gs.Constant) -> list[gs.Node]:
    w = constant_value(node.inputs[1])
    if node.op == "Conv":
        axis = 0
    elif node.op == "Gemm":
        axis = 0 if node.attrs.get("transB", 0) else 1
    else:
        axis = 1
    q, scale = weight_params(w, axis)
    base = node.name or node.op
    nodes = []
    wq = gs.Constant(fresh_name(graph, f"{base}_weight_quantized"), q)
    ws = gs.Constant(fresh_name(graph, f"{base}_weight_scale"), scale)
    wz = gs.Constant(fresh_name(graph, f"{base}_weight_zero_point"), np.zeros(scale.shape, np.int8))
    w_out = gs.Variable(fresh_name(graph, f"{base}_weight_dequantized"), np.float32, list(w.shape))
    nodes.append(gs.Node("DequantizeLinear", fresh_name(graph, f"{base}_weight_DequantizeLinear"),
                         attrs={"axis": axis}, inputs=[wq, ws, wz], outputs=[w_out]))
    node.inputs[1] = w_out
    b = optional_input(node, 2)
    if b is not None and node.op in ("Conv", "Gemm"):
        bv = constant_value(b).reshape(-1)
        b_scale = (np.float32(x_scale.values) * scale).astype(np.float32)
        bq = np.clip(np.round(bv / b_scale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
        bq_c = gs.Constant(fresh_name(graph, f"{base}_bias_quantized"), bq)
        bs = gs.Constant(fresh_name(graph, f"{base}_bias_scale"), b_scale)
        bz = gs.Constant(fresh_name(graph, f"{base}_bias_zero_point"), np.zeros(bq.shape, np.int32))
        b_out = gs.Variable(fresh_name(graph, f"{base}_bias_dequantized"), np.float32, [bq.size])
        nodes.append(gs.Node("DequantizeLinear", fresh_name(graph, f"{base}_bias_DequantizeLinear"),
                             attrs={"axis": 0}, inputs=[bq_c, bs, bz], outputs=[b_out]))
        node.inputs[2] = b_out
    return nodes
