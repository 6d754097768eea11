"""Channel dependency analysis for prune_channels: which conv output channels can be removed
together, and every weight, constant, attribute and shape that must change with them.

Every Conv output channel gets a global id; tensors carry the list of ids of their channel axis
(axis 1), or of channel blocks after a Flatten/Reshape. Ops that join two channel-carrying
tensors element-wise union the ids position by position (union-find), so a residual Add, an SE
Mul or a SiLU diamond ends up with one shared keep-set. Anything not covered by the rules below
*blocks* the ids it touches (with a reason): an unknown op is never treated as element-wise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import (attr, constant_value, is_graph_input, is_standard, optional_input, sole_producer,
                                walk_graphs)

TRANSPARENT = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Gelu", "Tanh", "Erf",
               "Identity", "Cast", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
               "Softplus", "Selu", "Neg", "Abs"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min"}
QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "ConvInteger", "MatMulInteger"}
CONTROL_FLOW = {"If", "Loop", "Scan"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare",
          "ReduceProd", "ReduceLogSum", "ReduceLogSumExp"}


@dataclass
class Track:
    """Channel ids of one tensor: `ids[i]` is the global id at position i of `axis`; after a
    flatten each id covers `block` consecutive features."""

    ids: list[int]
    axis: int = 1
    rank: int = 4
    block: int = 1
    flat: bool = False


@dataclass
class Producer:
    node: gs.Node
    ids: list[int]
    #: the weight (input 1) axis of the output channels
    axis: int = 0


@dataclass
class Role:
    """One planned change: slice input `index` of `node` along `axis` by the keep mask of `ids`
    (each id repeated `block` times), or rewrite a Reshape shape / a group attribute."""

    kind: str  # "slice", "reshape", "group", "split"
    node: gs.Node
    index: int  # input index; -1: the group attribute; -2: the split attribute
    axis: int
    ids: list[int]
    block: int = 1
    sizes: tuple = ()  # Split: the original output sizes


@dataclass
class Analysis:
    parent: list[int] = field(default_factory=list)
    producers: list[Producer] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # id -> index in producers
    roles: list[Role] = field(default_factory=list)
    #: terminal consumers (conv/gemm/matmul input side): the masked graph zeroes these slices
    consumers: list[Role] = field(default_factory=list)
    blocked: dict[int, str] = field(default_factory=dict)  # id -> reason
    refusals: list[tuple[gs.Node, str]] = field(default_factory=list)
    refused: Optional[str] = None
    #: id lists that must keep at least one channel besides the producers (Split outputs)
    min_keep: list[list[int]] = field(default_factory=list)
    opset: int = 0

    def new_ids(self, count: int, producer: Optional[int]) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        self.owner.extend([-1 if producer is None else producer] * count)
        return list(range(start, start + count))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: list[int], b: list[int]) -> None:
        for x, y in zip(a, b):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def block(self, ids: list[int], node: gs.Node, reason: str) -> None:
        self.refusals.append((node, reason))
        for i in ids:
            self.blocked.setdefault(i, f"{node.op} {node.name}: {reason}")

    def classes(self) -> dict[int, list[int]]:
        """Channel classes (root -> member ids) that may be removed: no member is blocked."""
        bad = {self.find(i) for i in self.blocked}
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            r = self.find(i)
            if r not in bad:
                out.setdefault(r, []).append(i)
        return out


def dims(tensor: gs.Tensor) -> Optional[list[int]]:
    """Static shape where only the batch dim (0) may be symbolic (then taken as 1)."""
    shape = tensor.shape
    if shape is None:
        return None
    out = []
    for i, d in enumerate(shape):
        if isinstance(d, (int, np.integer)) and d > 0:
            out.append(int(d))
        elif i == 0 and len(shape) > 1:
            out.append(1)
        else:
            return None
    return out


def conv_flops(node: gs.Node) -> float:
    """MACs of a Conv from static shapes (0 when unknown)."""
    w, y = dims(node.inputs[1]), dims(node.outputs[0])
    if w is None or y is None:
        return 0.0
    return float(np.prod(y) * np.prod(w[1:]))


def matmul_flops(node: gs.Node) -> float:
    a, y = dims(node.inputs[0]), dims(node.outputs[0])
    if a is None or y is None:
        return 0.0
    return float(np.prod(y) * a[-1] if not (node.op == "Gemm" and attr(node, "transA", 0)) else np.prod(y) * a[0])


def node_flops(node: gs.Node) -> float:
    if node.op == "Conv":
        return conv_flops(node)
    if node.op in ("Gemm", "MatMul"):
        return matmul_flops(node)
    return 0.0


def node_cost(node: gs.Node, metric: str = "flops") -> float:
    """MACs, or the weight's parameter count, of a Conv/Gemm/MatMul (0 for other ops)."""
    if metric == "flops" or node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return node_flops(node)
    w = node.inputs[1]
    shape = w.shape if isinstance(w, gs.Constant) else getattr(constant_value(w), "shape", None)
    return float(np.prod(shape)) if shape is not None else 0.0


def analyze(graph: gs.Graph, protected: set[int], opset: int = 0) -> Analysis:
    """Walk the main graph in topological order and build the channel groups and planned changes.
    `protected`: python id()s of Conv/Gemm/MatMul nodes whose output channels must stay."""
    a = Analysis(opset=opset)
    for g in walk_graphs(graph):
        for n in g.nodes:
            if n.op in QUANTIZED:
                a.refused = f"quantized graph ({n.op} {n.name}): pruning Q/DQ graphs is not supported"
                return a
    graph.toposort(recurse_subgraphs=False)
    inner = {t.name for g in list(walk_graphs(graph))[1:] for n in g.nodes for t in n.inputs}
    tracks: dict[str, Track] = {}
    for node in graph.nodes:
        ins = [(i, tracks[t.name]) for i, t in enumerate(node.inputs) if t.name in tracks]
        if not is_standard(node):
            outs, reason = None, f"custom-domain op {node.domain}::{node.op} is not understood"
        elif node.op in CONTROL_FLOW:
            outs, reason = None, "control flow: channels entering If/Loop/Scan are not followed"
        else:
            try:
                outs, reason = _visit(a, node, ins, id(node) in protected)
            except (ValueError, IndexError, TypeError) as exc:
                outs, reason = None, f"analysis failed: {type(exc).__name__}: {exc}"
        if reason is not None:
            for _, tr in ins:
                a.block(tr.ids, node, reason)
            continue
        for t, tr in zip(node.outputs, outs or []):
            if tr is not None:
                tracks[t.name] = tr
    for t in graph.outputs:
        if t.name in tracks:
            a.block(tracks[t.name].ids, t.inputs[0] if t.inputs else gs.Node("Output"), f"channels reach graph output {t.name}")
    for name in inner & set(tracks):
        a.block(tracks[name].ids, gs.Node("Subgraph", name=name), f"tensor {name} is read inside a subgraph")
    return a


def _visit(a: Analysis, node: gs.Node, ins: list[tuple[int, Track]], protected: bool):
    """(output tracks, None) or (None, reason to block every input id)."""
    op = node.op
    if op == "Conv":
        return _conv(a, node, ins, protected)
    if op in ("Gemm", "MatMul"):
        return _gemm(a, node, ins, protected)
    if not ins:
        return [], None
    if op == "Split":
        return _split(a, node, ins)
    if any(t.name for t in node.outputs[1:]):
        return None, f"{op} with a used second output (indices/mask depend on the channel count)"
    if op == "PRelu":
        if [i for i, _ in ins] != [0]:
            return None, "channels reach the PRelu slope"
        return _binary(a, node, ins)
    if op in REDUCE:
        return _reduce(node, ins)
    if op == "Shape" and not ins[0][1].flat and attr(node, "start", 0) == 0 \
            and 0 < int(attr(node, "end", 10 ** 9)) <= ins[0][1].axis:
        return [None], None  # reads only the dims before the channel axis
    if op in TRANSPARENT or op in ("BatchNormalization", "InstanceNormalization", "Pad"):
        (idx, tr), = ins if len(ins) == 1 else [(None, None)]
        if idx != 0:
            return None, f"channels enter {op} through input {idx}"
        if tr.flat and op not in TRANSPARENT - POOLS:
            return None, f"{op} on flattened channels"
        if tr.axis != 1 and (op in POOLS or op in ("BatchNormalization", "InstanceNormalization")):
            return None, f"{op} works on axis 1 but the channels are on axis {tr.axis}"
        if op == "Pad":
            reason = _pad_reason(node, tr)
            if reason:
                return None, reason
        if op in ("BatchNormalization", "InstanceNormalization"):
            params = range(1, 5 if op == "BatchNormalization" else 3)
            if any(constant_value(node.inputs[i]) is None for i in params):
                return None, f"{op} parameters are not constant"
            a.roles.extend(Role("slice", node, i, 0, tr.ids) for i in params)
        if op == "Clip" and any(constant_value(t) is not None and np.size(constant_value(t)) > 1 for t in node.inputs[1:] if t.name):
            return None, "Clip with non-scalar bounds"
        return [tr] + [None] * (len(node.outputs) - 1), None
    if op in BINARY:
        return _binary(a, node, ins)
    if op == "Concat":
        return _concat(a, node, ins)
    if op == "Transpose":
        (idx, tr), = ins
        perm = list(attr(node, "perm", list(range(tr.rank))[::-1]))
        if tr.flat or len(perm) != tr.rank:
            return None, "Transpose of flattened channels"
        return [Track(tr.ids, perm.index(tr.axis), tr.rank)], None
    if op in ("Flatten", "Reshape"):
        return _flatten(a, node, ins)
    return None, f"{op} is not channel-independent or not covered by the pruning rules"


def _conv(a: Analysis, node: gs.Node, ins, protected: bool):
    w = constant_value(node.inputs[1])
    if w is None:
        return None, "Conv weight is not constant"
    bias = optional_input(node, 2)
    if bias is not None and constant_value(bias) is None:
        return None, "Conv bias is not constant"
    group = int(attr(node, "group", 1))
    c_out, c_in_g = w.shape[0], w.shape[1]
    tin = dict(ins).get(0)
    if any(i != 0 for i, _ in ins):
        return None, "channels reach a Conv weight or bias"
    if tin is not None and (tin.flat or tin.axis != 1):
        return None, f"Conv reads channels on axis {tin.axis}, not 1"
    if group > 1 and tin is not None and c_in_g == 1 and group == c_out == len(tin.ids):
        # depthwise: input, output and group shrink together, the channels pass through
        a.roles.extend(_out_roles(node, tin.ids, bias))
        a.roles.append(Role("group", node, -1, 0, tin.ids))
        return [tin], None
    if tin is not None:
        if len(tin.ids) != c_in_g * group:
            return None, "Conv input channels do not match the tracked channels"
        for k in range(1, group):  # grouped: position i of every group shares one keep-set
            a.union(tin.ids[:c_in_g], tin.ids[k * c_in_g:(k + 1) * c_in_g])
        role = Role("slice", node, 1, 1, tin.ids[:c_in_g])
        a.roles.append(role)
        a.consumers.append(role)
    p = len(a.producers)
    ids = a.new_ids(c_out, p)
    a.producers.append(Producer(node, ids))
    c_out_g = c_out // group
    for k in range(1, group):  # equal kept counts per output group
        a.union(ids[:c_out_g], ids[k * c_out_g:(k + 1) * c_out_g])
    if protected:
        a.block(ids, node, "protected layer")
    a.roles.extend(_out_roles(node, ids, bias))
    return [Track(ids, 1, len(w.shape))], None


def _out_roles(node: gs.Node, ids: list[int], bias) -> list[Role]:
    roles = [Role("slice", node, 1, 0, ids)]
    if bias is not None:
        roles.append(Role("slice", node, 2, 0, ids))
    return roles


def _pad_reason(node: gs.Node, tr: Track) -> Optional[str]:
    pads = constant_value(optional_input(node, 1)) if len(node.inputs) > 1 else np.array(attr(node, "pads", []))
    if pads is None or optional_input(node, 3) is not None:
        return "Pad with non-constant pads or explicit axes"
    pads = np.asarray(pads).reshape(-1)
    if len(pads) != 2 * tr.rank or pads[tr.axis] != 0 or pads[tr.axis + tr.rank] != 0:
        return "Pad changes the channel axis"
    return None


def _binary(a: Analysis, node: gs.Node, ins):
    out_shape = dims(node.outputs[0])
    if len(ins) == 2:
        (_, t0), (_, t1) = ins
        s0, s1 = dims(node.inputs[0]), dims(node.inputs[1])
        if t0.flat or t1.flat or s0 is None or s1 is None or len(s0) != len(s1) or t0.axis != t1.axis \
                or len(t0.ids) != len(t1.ids):
            return None, f"{node.op} of two channel tensors with different layouts"
        a.union(t0.ids, t1.ids)
        return [t0], None
    (idx, tr), = ins
    if tr.flat:
        return None, f"{node.op} on flattened channels"
    other = node.inputs[1 - idx]
    shape = dims(other) if other.shape is not None else None
    value = constant_value(other)
    if value is not None:
        shape = list(value.shape)
    if shape is None or (out_shape is not None and len(shape) > len(out_shape)):
        return None, f"{node.op} operand of unknown or larger shape"
    pos = tr.axis - (tr.rank - len(shape))
    if value is None and len(shape) == 0:
        return [tr], None  # scalar activation operand
    if pos < 0 or shape[pos] == 1:
        if out_shape is not None and (len(out_shape) != tr.rank or out_shape[tr.axis] != len(tr.ids)):
            return None, f"{node.op} broadcasts the channel tensor"
        return [tr], None
    if shape[pos] != len(tr.ids):
        return None, f"{node.op} operand has {shape[pos]} channels, expected {len(tr.ids)}"
    if value is None:
        return None, f"{node.op} with an activation carrying unprunable channels"
    a.roles.append(Role("slice", node, 1 - idx, pos, tr.ids))
    return [tr], None


def _reduce(node: gs.Node, ins):
    """Reductions over spatial axes only keep channels (GlobalAveragePool written as ReduceMean)."""
    (idx, tr), = ins
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        axes = constant_value(node.inputs[1])
        if axes is None:
            return None, f"{node.op} with non-constant axes"
    if idx != 0 or tr.flat or axes is None or len(axes) == 0:
        return None, f"{node.op} over all axes (the channel axis included)"
    axes = sorted({int(x) + tr.rank if int(x) < 0 else int(x) for x in np.asarray(axes).reshape(-1)})
    if tr.axis in axes:
        return None, f"{node.op} over the channel axis"
    if node.attrs.get("keepdims", 1):
        return [tr], None
    return [Track(tr.ids, tr.axis - sum(x < tr.axis for x in axes), tr.rank - len(axes))], None


def _split(a: Analysis, node: gs.Node, ins):
    """Split on the channel axis: each output takes its segment of ids; the sizes are rewritten
    (as the `split` input from opset 13, the attribute before)."""
    (idx, tr), = ins
    axis = int(attr(node, "axis", 0))
    axis = axis + tr.rank if axis < 0 else axis
    if idx != 0 or tr.flat or axis != tr.axis:
        return None, "Split not on the channel axis"
    n, c = len(node.outputs), len(tr.ids)
    if optional_input(node, 1) is not None:
        sizes, index = constant_value(node.inputs[1]), 1
        if sizes is None:
            return None, "Split with non-constant sizes"
    elif "split" in node.attrs:
        sizes, index = node.attrs["split"], -2
    elif c % n == 0 and a.opset:
        sizes, index = [c // n] * n, (1 if a.opset >= 13 else -2)
    else:
        return None, "Split into unequal or unknown parts"
    sizes = tuple(int(v) for v in np.asarray(sizes).reshape(-1))
    if sum(sizes) != c or len(sizes) != n:
        return None, "Split sizes do not match the tracked channels"
    a.roles.append(Role("split", node, index, 0, tr.ids, sizes=sizes))
    outs, start = [], 0
    for size in sizes:
        a.min_keep.append(tr.ids[start:start + size])
        outs.append(Track(tr.ids[start:start + size], axis, tr.rank))
        start += size
    return outs, None


def _concat(a: Analysis, node: gs.Node, ins):
    tr0 = ins[0][1]
    axis = int(attr(node, "axis", 0))
    axis = axis + tr0.rank if axis < 0 else axis
    if any(tr.flat or tr.axis != axis or tr.rank != tr0.rank for _, tr in ins):
        return None, "Concat not on the channel axis"
    tracked = dict(ins)
    ids: list[int] = []
    for i, t in enumerate(node.inputs):
        if i in tracked:
            ids += tracked[i].ids
            continue
        s = dims(t) if constant_value(t) is None else list(constant_value(t).shape)
        if s is None:
            return None, "Concat input of unknown shape"
        fixed = a.new_ids(s[axis], None)
        a.block(fixed, node, f"Concat input {t.name} carries unprunable channels")
        ids += fixed
    return [Track(ids, axis, tr0.rank)], None


def _flatten(a: Analysis, node: gs.Node, ins):
    (idx, tr), = ins
    if idx != 0 or tr.flat or tr.axis != 1:
        return None, f"{node.op} of the channel axis that is not a (N,C,...)->(N,C*...) flatten"
    s = dims(node.inputs[0])
    if s is None:
        return None, f"{node.op} input of unknown shape"
    block = int(np.prod(s[2:]))
    if node.op == "Flatten":
        if int(attr(node, "axis", 1)) != 1:
            return None, "Flatten axis is not 1"
        return [Track(tr.ids, 1, 2, block, True)], None
    if len(node.inputs) > 1 and constant_value(node.inputs[1]) is None:
        return _computed_reshape(a, node, tr, block)
    shape = constant_value(node.inputs[1])
    if shape is None or shape.size != 2 or (attr(node, "allowzero", 0) and 0 in shape.tolist()):
        return None, "Reshape shape is not a constant (N, C*...) shape"
    shape = [int(v) for v in shape]
    if not (shape[1] == -1 or shape[1] == len(tr.ids) * block) or shape[0] not in (-1, 0, s[0]) or \
            (shape[0] == -1 and shape[1] == -1):
        return None, f"Reshape to {shape} does not keep channel blocks on axis 1"
    if shape[1] != -1:
        a.roles.append(Role("reshape", node, 1, 1, tr.ids, block))
    return [Track(tr.ids, 1, 2, block, True)], None


def _computed_reshape(a: Analysis, node: gs.Node, tr: Track, block: int):
    """Reshape to Concat(Shape(x)[0:1], [C*block or -1]), as the dynamo exporter writes a flatten:
    the constant feature count in the Concat is rewritten."""
    cat = sole_producer(node.inputs[1])
    why = "Reshape shape is computed by something other than Concat(Shape(x)[0:1], constant)"
    if cat is None or cat.op != "Concat" or len(cat.inputs) != 2 or len(node.inputs[1].outputs) != 1:
        return None, why
    head, tail = sole_producer(cat.inputs[0]), constant_value(cat.inputs[1])
    if head is None or head.op != "Shape" or attr(head, "start", 0) != 0 or attr(head, "end", None) != 1 \
            or tail is None or tail.size != 1:
        return None, why
    value = int(tail.reshape(-1)[0])
    if value == -1:
        return [Track(tr.ids, 1, 2, block, True)], None
    if value != len(tr.ids) * block or (attr(node, "allowzero", 0) and value == 0):
        return None, f"Reshape feature count {value} does not match the tracked channels"
    a.roles.append(Role("reshape", cat, 1, 0, tr.ids, block))
    return [Track(tr.ids, 1, 2, block, True)], None


def _gemm(a: Analysis, node: gs.Node, ins, protected: bool):
    """Gemm/MatMul with a constant 2D weight on a 2D input: consumer of the tracked input
    features (channel blocks after a flatten) and producer of its output features."""
    w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    trans_b = node.op == "Gemm" and bool(attr(node, "transB", 0))
    if any(i != 0 for i, _ in ins):
        return None, f"channels reach the weight or bias of {node.op}"
    if w is None or w.ndim != 2:
        return (None, f"{node.op} with a non-constant or non-2D weight") if ins else ([None], None)
    x = dims(node.inputs[0])
    if (x is not None and len(x) != 2) or (node.op == "Gemm" and attr(node, "transA", 0)):
        return (None, f"{node.op} does not contract the tracked channel axis") if ins else ([None], None)
    if ins:
        tr = ins[0][1]
        if not (tr.rank == 2 and tr.axis == 1) or len(tr.ids) * tr.block != w.shape[1 if trans_b else 0]:
            return None, f"{node.op} weight does not match the tracked features"
        role = Role("slice", node, 1, 1 if trans_b else 0, tr.ids, tr.block)
        a.roles.append(role)
        a.consumers.append(role)
    if x is None:
        return [None], None
    out_axis = 0 if trans_b else 1
    bias = optional_input(node, 2) if node.op == "Gemm" else None
    c = constant_value(bias) if bias is not None else None
    if bias is not None and c is None:
        return [None], None  # activation bias: outputs stay (inputs were handled above)
    p = len(a.producers)
    ids = a.new_ids(w.shape[out_axis], p)
    a.producers.append(Producer(node, ids, out_axis))
    a.roles.append(Role("slice", node, 1, out_axis, ids))
    if c is not None and c.ndim >= 1 and c.shape[-1] == len(ids) and c.size > 1:
        a.roles.append(Role("slice", node, 2, c.ndim - 1, ids))
    elif c is not None and c.size != 1 and not (c.ndim >= 1 and c.shape[-1] == 1):
        a.block(ids, node, "Gemm bias is not per output feature")
    if protected:
        a.block(ids, node, "protected layer")
    return [Track(ids, 1, 2)], None


def input_convs(graph: gs.Graph) -> set[int]:
    """Convs that read a graph input directly (the stem: protected by default)."""
    return {id(n) for n in graph.nodes if n.op == "Conv" and is_graph_input(graph, n.inputs[0])}


def keep_mask(a: Analysis, ids: list[int], removed: set[int], block: int = 1) -> np.ndarray:
    mask = np.array([a.find(i) not in removed for i in ids], dtype=bool)
    return np.repeat(mask, block)

