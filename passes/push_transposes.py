"""Push Transposes down through layout-agnostic ops until they meet their inverse.

Models converted from channels-last frameworks (tf2onnx, TFLite) wrap every layer in a
Transpose pair: NHWC -> Transpose -> Conv -> Transpose back -> Add(bias) -> Relu -> Transpose
-> Conv ... Element-wise ops commute with a Transpose when their constant operands are
permuted the same way, so the Transpose after one Conv can be carried down to the one before the
next and both disappear.

For one anchor Transpose (perm p) the pass grows a *region*: the ops downstream that commute
with p. Every region tensor v is rewritten as v' with v = transpose(v', p). Same-perm Transposes
feeding region ops join as extra seeds (residual branches). Where a region tensor leaves the
region it meets either a Transpose (composed with p; cancelled when the product is the
identity) or anything else (a Transpose p is re-materialised there). The whole plan is costed
before any edit and applied only when it strictly lowers the number of Transposes, so repeated
runs terminate and nothing merely moves around.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import (Edit, NewNode, Node, Tensor, constant_value, fresh_name, is_graph_output,
                                is_standard, make_constant, walk_graphs)
from onnxslim_opt.pass_api import PassContext, PassResult, RewritePass
from onnxslim_opt.shape_inference import ensure_shapes

#: element-wise ops whose input 0 carries the layout; any other inputs are scalars/params kept as-is
UNARY = frozenset("""Relu LeakyRelu Sigmoid Tanh Clip Elu Selu Celu HardSigmoid HardSwish Softplus Softsign
    Abs Neg Exp Log Sqrt Reciprocal Erf Gelu Cast CastLike Identity Floor Ceil Round Sign Not BitwiseNot
    Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh IsNaN IsInf Shrink ThresholdedRelu Mish""".split())
#: element-wise ops broadcasting all their inputs (numpy rules)
BROADCAST = frozenset("""Add Sub Mul Div Pow Max Min Sum Mean Mod Equal Less Greater LessOrEqual
    GreaterOrEqual And Or Xor BitwiseAnd BitwiseOr BitwiseXor Where PRelu""".split())
REDUCE = frozenset("""ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare""".split())
SOFTMAX = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
PUSHABLE = UNARY | BROADCAST | REDUCE | SOFTMAX | {"Concat", "Pad"}


@dataclass
class _In:
    """How one input of a region node is fed after the push."""

    kind: str  # "region" (use v'), "keep", "const" (new constant `value`), "insert" (inverse Transpose)
    tensor: Tensor
    value: Optional[np.ndarray] = None


@dataclass
class _NodePlan:
    node: Node
    inputs: list[_In]
    attrs: dict


@dataclass
class _Plan:
    perm: tuple[int, ...]
    seeds: list[Node]
    nodes: list[_NodePlan]
    region: dict[int, Tensor]  # id -> original tensor that becomes transpose(v', perm)
    materialize: set[int] = field(default_factory=set)  # region tensors some outsider reads as-is
    cancels: list[Node] = field(default_factory=list)
    composes: list[tuple[Node, tuple[int, ...]]] = field(default_factory=list)
    inserts: list[Tensor] = field(default_factory=list)

    @property
    def delta(self) -> int:
        """Change in the number of Transpose nodes if applied."""
        seed_outs = {id(s.outputs[0]) for s in self.seeds}
        added = len(self.inserts) + sum(1 for t in self.materialize if t not in seed_outs)
        removed = len(self.cancels) + sum(1 for s in self.seeds if id(s.outputs[0]) not in self.materialize)
        return added - removed


class PushTransposes(RewritePass):
    name = "push_transposes"
    description = "push Transposes down through element-wise ops until they cancel with their inverse"
    stage = "simplify"
    order = 400
    anchors = ("Transpose",)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not any(n.op == "Transpose" for g in walk_graphs(graph) for n in g.nodes):
            return PassResult()
        ensure_shapes(graph, ctx)  # ranks of non-constant operands
        return super().run(graph, ctx)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        perm = _perm(node)
        if perm is None or len(node.outputs) != 1:
            return None
        if perm == tuple(range(len(perm))):
            return None  # an identity Transpose is eliminate_noops' business
        in_graph = {id(n) for n in graph.nodes}
        best: Optional[_Plan] = None
        reasons: list[str] = []
        for allow_insert in (True, False):
            plan = _make_plan(node, graph, perm, in_graph, ctx.opset, allow_insert, reasons)
            if isinstance(plan, str):
                return plan
            if best is None or plan.delta <= best.delta:  # on a tie, insert nothing
                best = plan
        if not best.nodes and not best.cancels and not best.composes:
            return f"blocked: {reasons[0]}" if reasons else None  # None: nothing downstream commutes with it
        if best.delta >= 0:
            why = f"; blocked: {reasons[0]}" if reasons else ""
            return f"pushing would not reduce the Transpose count ({best.delta:+d}){why}"
        return _build_edit(best, graph)


# ----------------------------------------------------------------------------- planning
def _perm(node: Node) -> Optional[tuple[int, ...]]:
    if not is_standard(node) or node.op != "Transpose":
        return None
    perm = node.attrs.get("perm")
    if perm is None:
        shape = node.inputs[0].shape if node.inputs else None
        return tuple(reversed(range(len(shape)))) if shape is not None else None
    return tuple(int(i) for i in perm)


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def _layout_inputs(node: Node) -> range:
    """Indices of the inputs that carry the (transposed) layout."""
    return range(len(node.inputs)) if node.op in BROADCAST or node.op == "Concat" else range(1)


def _pushable(node: Node, tensor: Tensor, in_graph: set[int]) -> bool:
    if id(node) not in in_graph or not is_standard(node) or node.op not in PUSHABLE or len(node.outputs) != 1:
        return False
    layout = set(_layout_inputs(node))
    return all(i in layout for i, t in enumerate(node.inputs) if t is tensor)


def _same_perm_seed(tensor: Tensor, perm: tuple[int, ...], in_graph: set[int]) -> Optional[Node]:
    if len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    if id(producer) in in_graph and len(producer.outputs) == 1 and _perm(producer) == perm:
        return producer
    return None


def _grow(root: Node, perm: tuple[int, ...], in_graph: set[int]) -> tuple[list[Node], dict[int, Node], dict]:
    """Seeds, region nodes and region tensors reachable from `root` through pushable ops."""
    seeds, nodes, region = [root], {}, {id(root.outputs[0]): root.outputs[0]}
    work = [root.outputs[0]]
    while work:
        tensor = work.pop()
        for consumer in list(tensor.outputs):
            if id(consumer) in nodes or not _pushable(consumer, tensor, in_graph):
                continue
            nodes[id(consumer)] = consumer
            for i in _layout_inputs(consumer):
                seed = _same_perm_seed(consumer.inputs[i], perm, in_graph)
                if seed is not None and id(seed.outputs[0]) not in region:
                    seeds.append(seed)
                    region[id(seed.outputs[0])] = seed.outputs[0]
                    work.append(seed.outputs[0])
            out = consumer.outputs[0]
            region[id(out)] = out
            work.append(out)
    return seeds, nodes, region


def _make_plan(root: Node, graph: gs.Graph, perm: tuple[int, ...], in_graph: set[int], opset: int,
               allow_insert: bool, reasons: list[str]) -> _Plan | str:
    seeds, nodes, region = _grow(root, perm, in_graph)
    # drop region nodes whose other operands cannot follow the layout, until stable
    plans: dict[int, _NodePlan] = {}
    changed = True
    while changed:
        changed = False
        for key, node in list(nodes.items()):
            planned = _plan_node(node, region, perm, opset, allow_insert)
            if isinstance(planned, str):
                reasons.append(f"{node.op} {node.name}: {planned}")
                del nodes[key]
                region.pop(id(node.outputs[0]), None)
                plans.pop(key, None)
                changed = True
            else:
                plans[key] = planned
    for seed in seeds[1:]:
        if id(seed.inputs[0]) in region:
            return "a same-perm Transpose joining the push reads the pushed region itself"
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    plan = _Plan(perm, seeds, sorted(plans.values(), key=lambda p: order[id(p.node)]), region)
    _classify_exits(plan, graph, nodes, in_graph)
    inserted: dict[int, Tensor] = {}
    for np_ in plan.nodes:
        for inp in np_.inputs:
            if inp.kind == "insert":
                inserted.setdefault(id(inp.tensor), inp.tensor)
    plan.inserts = list(inserted.values())
    return plan


def _classify_exits(plan: _Plan, graph: gs.Graph, nodes: dict[int, Node], in_graph: set[int]) -> None:
    """Decide, for every reader outside the region, cancel / compose / re-materialise."""
    n = len(plan.perm)
    for key, tensor in plan.region.items():
        if is_graph_output(graph, tensor):
            plan.materialize.add(key)
        for consumer in tensor.outputs:
            if id(consumer) in nodes:
                continue
            q = _perm(consumer) if id(consumer) in in_graph else None
            if q is None or len(q) != n:
                plan.materialize.add(key)
                continue
            composed = tuple(plan.perm[i] for i in q)
            if composed == tuple(range(n)):
                plan.cancels.append(consumer)
            else:
                plan.composes.append((consumer, composed))


def _plan_node(node: Node, region: dict, perm: tuple[int, ...], opset: int,
               allow_insert: bool) -> _NodePlan | str:
    """How to feed `node` once its region inputs are v'; a reason string if it cannot be done."""
    n, inv = len(perm), _inverse(perm)
    layout = set(_layout_inputs(node))
    if not any(id(node.inputs[i]) in region for i in layout if i < len(node.inputs)):
        return "no operand comes from the pushed Transpose"
    attrs = dict(node.attrs)
    inputs: list[_In] = []
    for i, t in enumerate(node.inputs):
        if id(t) in region:
            if i not in layout:
                return f"input {i} is a parameter, not a layout operand"
            inputs.append(_In("region", t))
        elif i in layout:
            how = _layout_operand(t, n, inv, allow_insert, exact_rank=node.op == "Concat")
            if isinstance(how, str):
                return how
            inputs.append(how)
        else:
            inputs.append(_In("keep", t))
    fixed = _remap_attrs(node, attrs, inputs, perm, opset)
    return fixed if isinstance(fixed, str) else _NodePlan(node, inputs, attrs)


def _layout_operand(t: Tensor, n: int, inv: tuple[int, ...], allow_insert: bool, exact_rank: bool) -> _In | str:
    value = constant_value(t)
    if value is not None:
        if value.ndim > n or (exact_rank and value.ndim != n):
            return f"constant operand of rank {value.ndim} does not fit rank {n}"
        if value.size == 1 and not exact_rank:
            return _In("keep", t)
        aligned = value.reshape((1,) * (n - value.ndim) + value.shape)
        return _In("const", t, np.transpose(aligned, inv))
    shape = t.shape
    if shape is None:
        return "operand of unknown rank"
    if len(shape) <= n and not exact_rank and all(d == 1 for d in shape):
        return _In("keep", t)
    if len(shape) != n:
        return f"non-constant operand of rank {len(shape)} (needs rank {n})"
    if not allow_insert:
        return "non-constant operand would need an inverse Transpose"
    return _In("insert", t)


def _remap_attrs(node: Node, attrs: dict, inputs: list[_In], perm: tuple[int, ...], opset: int) -> Optional[str]:
    """Rewrite axis-bearing attributes/inputs of `node` for the untransposed layout (in `attrs`/`inputs`)."""
    n, op = len(perm), node.op
    if op == "Concat" or op in SOFTMAX:
        if op in SOFTMAX and opset < 13:
            return "Softmax before opset 13 flattens from its axis"
        attrs["axis"] = perm[int(attrs.get("axis", 1 if op == "Concat" else -1)) % n]
    elif op in REDUCE:
        if int(attrs.get("keepdims", 1)) == 0:
            return "keepdims=0 changes the rank"
        if "axes" in attrs:
            attrs["axes"] = [perm[int(a) % n] for a in attrs["axes"]]
        elif len(inputs) > 1 and inputs[1].tensor.name:
            axes = constant_value(inputs[1].tensor)
            if axes is None:
                return "reduction axes are not constant"
            inputs[1] = _In("const", inputs[1].tensor, np.array([perm[int(a) % n] for a in axes], dtype=np.int64))
    elif op == "Pad":
        if len(inputs) > 3 and inputs[3].tensor.name:
            return "Pad with an axes input"
        if "pads" in attrs:
            attrs["pads"] = [int(v) for v in _remap_pads(np.asarray(attrs["pads"]), perm)]
        else:
            pads = constant_value(inputs[1].tensor) if len(inputs) > 1 else None
            if pads is None or pads.size != 2 * n:
                return "pads are not a constant of length 2*rank"
            inputs[1] = _In("const", inputs[1].tensor, _remap_pads(pads, perm))
    return None


def _remap_pads(pads: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
    n = len(perm)
    begin, end = np.asarray(pads).reshape(2, n)
    out = np.zeros((2, n), dtype=np.asarray(pads).dtype)
    out[:, list(perm)] = np.stack([begin, end])
    return out.reshape(-1)


# ----------------------------------------------------------------------------- building the edit
def _build_edit(plan: _Plan, graph: gs.Graph) -> Edit:
    perm, inv = plan.perm, _inverse(plan.perm)
    edit = Edit()
    # untransposed source of every region tensor
    source: dict[int, Tensor] = {id(s.outputs[0]): s.inputs[0] for s in plan.seeds}
    for np_ in plan.nodes:
        out = np_.node.outputs[0]
        shape = [out.shape[i] for i in inv] if out.shape is not None else None
        source[id(out)] = gs.Variable(fresh_name(graph, out.name + "_untransposed"), out.dtype, shape)
    consts: dict[int, gs.Constant] = {}
    inserted: dict[int, Tensor] = {}
    for t in plan.inserts:
        shape = [t.shape[i] for i in perm] if t.shape is not None else None
        inserted[id(t)] = gs.Variable(fresh_name(graph, t.name + "_untransposed"), t.dtype, shape)
        edit.add.append(NewNode("Transpose", [t], [inserted[id(t)]], {"perm": list(inv)}))
    for np_ in plan.nodes:
        new_inputs = []
        for inp in np_.inputs:
            if inp.kind == "region":
                new_inputs.append(source[id(inp.tensor)])
            elif inp.kind == "insert":
                new_inputs.append(inserted[id(inp.tensor)])
            elif inp.kind == "const":
                new_inputs.append(_new_constant(graph, inp, consts, np_.node.op in REDUCE or np_.node.op == "Pad"))
            else:
                new_inputs.append(inp.tensor)
        out = np_.node.outputs[0]
        edit.add.append(NewNode(np_.node.op, new_inputs, [source[id(out)]], np_.attrs, name=np_.node.name))
        edit.remove.append(np_.node)
        if id(out) in plan.materialize:  # outsiders keep reading `out`, now produced by a Transpose
            edit.add.append(NewNode("Transpose", [source[id(out)]], [out], {"perm": list(perm)}))
    for seed in plan.seeds:
        if id(seed.outputs[0]) not in plan.materialize:
            edit.remove.append(seed)
    for consumer in plan.cancels:
        edit.remove.append(consumer)
        edit.replace.append((consumer.outputs[0], source[id(consumer.inputs[0])]))
    for consumer, composed in plan.composes:
        edit.remove.append(consumer)
        edit.add.append(NewNode("Transpose", [source[id(consumer.inputs[0])]], list(consumer.outputs),
                                {"perm": list(composed)}, name=consumer.name))
    return edit


def _new_constant(graph: gs.Graph, inp: _In, cache: dict[int, gs.Constant], unique: bool) -> gs.Constant:
    """A new constant for a permuted operand (the original may have other readers; never edited)."""
    if unique or id(inp.tensor) not in cache:
        const = make_constant(graph, (inp.tensor.name or "const") + "_transposed", inp.value)
        if unique:
            return const
        cache[id(inp.tensor)] = const
    return cache[id(inp.tensor)]
