"""Float16 conversion for CUDA/TensorRT (`--fp16`), lossy.

Each node decides on its own whether it computes in float16: standard-domain ops whose ONNX
schema accepts tensor(float16) for their float32 inputs/outputs, that read graph data (pure
shape/constant computations stay float32) and are not block-listed. Every float32 tensor then
takes the type of its producer, weights are converted for the float16 readers, and a Cast is
inserted wherever a reader wants the other type (block-listed ops, ai.onnx.ml ops, graph IO,
If/Loop/Scan nodes). Cast(fp16->fp32)->Cast(fp32->fp16) pairs and no-op Casts are then removed.

If/Loop/Scan nodes themselves stay float32 (their inputs, outputs and the outer values their
bodies read are given in float32); each body is then converted on its own with its inputs/outputs
kept float32, and a body reading a float16 outer value through Cast pairs ends up reading it as is.

Weight values beyond the float16 range are clamped to +-65504 (infinities kept) and counted in the
report: masks written as -1e9 or float32's lowest keep their meaning, and a consumer kept in
float32 for one big value would cost a Cast on its activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxslim_opt.errors import OptimizeError
from onnxslim_opt.graph import (bypass, constant_node_value, fresh_name, is_constant, is_graph_output, is_standard,
                                onnx_dtype, sole_producer, topological_sort, walk_graphs)
from onnxslim_opt.pass_api import Node, Pass, PassContext, PassResult
from onnxslim_opt.shape_inference import ensure_shapes

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
FP16_MAX = float(np.finfo(np.float16).max)  # 65504

#: ops kept in float32 unless --fp16-allow names them (README lists the reasons)
DEFAULT_BLOCK: dict[str, str] = {
    "TopK": "float16 rounding creates ties, so the returned indices change",
    "NonMaxSuppression": "box coordinates and IoU thresholds need float32 (the schema also forbids float16)",
    "RoiAlign": "roi coordinates in pixels lose precision above 2048 in float16",
    "Range": "the element count ceil((limit-start)/delta) changes with rounding (schema forbids float16)",
    "CumSum": "running sums grow with the axis length and overflow float16 (max 65504)",
    "ReduceSum": "the sum grows with the axis length and overflows float16 (max 65504)",
    "ReduceSumSquare": "sums of squares overflow float16 (max 65504)",
    "ReduceL1": "the sum grows with the axis length and overflows float16 (max 65504)",
    "ReduceL2": "the sum of squares overflows float16 before the square root",
    "ReduceLogSum": "the sum overflows float16 before the log",
    "ReduceLogSumExp": "exp overflows float16 for inputs above 11",
    "ReduceProd": "products overflow or underflow float16",
    "QuantizeLinear": "quantization scales must stay float32 (TensorRT/ORT Q/DQ fusion, exact grid)",
    "DequantizeLinear": "quantization scales must stay float32 (TensorRT/ORT Q/DQ fusion, exact grid)",
    "DynamicQuantizeLinear": "quantization must see float32 ranges",
    "AffineGrid": "ONNX Runtime 1.31 CPU fails to run it in float16 (its function body breaks), so no validation",
}

#: readers that accept any input type: they never need a Cast in front of them
_ANY_INPUT = {"Shape", "Size", "Cast"}
#: ops whose output type comes from an attribute this pass does not rewrite
_TYPE_FROM_ATTR = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike",
                   "Bernoulli", "Multinomial"}
#: ops retargeted to float16 when every reader wants float16 (Cast to=FLOAT, ConstantOfShape value)
_SOURCES = {"Cast", "ConstantOfShape"}


def _split_ops(text: Any) -> tuple[str, ...]:
    if not text:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(s.strip() for s in items if s and s.strip())


@dataclass
class Fp16Options:
    #: graph inputs/outputs stay float32 (a Cast at the boundary); False converts them too
    keep_io: bool = True
    #: op types kept in float32, added to DEFAULT_BLOCK (list or comma-separated string)
    block: Any = ()
    #: op types of DEFAULT_BLOCK to convert anyway
    allow: Any = ()


def _is_f32(t: gs.Tensor) -> bool:
    return onnx_dtype(t.dtype) == TensorProto.FLOAT


def _known(t: gs.Tensor) -> bool:
    return t.dtype is not None


class _Names:
    """Names unique across the graph and all its subgraphs, also registered with the core's
    fresh_name of the graph they go in, so later passes never hand them out again."""

    def __init__(self, graph: gs.Graph):
        self.used = set()
        for g in walk_graphs(graph):
            self.used |= set(g.tensors().keys()) | {n.name for n in g.nodes}

    def __call__(self, g: gs.Graph, base: str) -> str:
        name = fresh_name(g, base)
        while name in self.used:
            name = fresh_name(g, base)
        self.used.add(name)
        return name


def _formal_types(node: Node, opset: int) -> Optional[tuple[list, list]]:
    """Per input/output index, the allowed type strings of its formal parameter (None: no schema)."""
    try:
        schema = onnx.defs.get_schema(node.op, opset, "")
    except onnx.defs.SchemaError:
        return None
    constraints = {c.type_param_str: list(c.allowed_type_strs) for c in schema.type_constraints}

    def per_index(formals, count):
        variadic = bool(formals) and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
        out = []
        for i in range(count):
            f = formals[i] if i < len(formals) else (formals[-1] if variadic else None)
            out.append([] if f is None else constraints.get(f.type_str, [f.type_str]))
        return out

    return per_index(schema.inputs, len(node.inputs)), per_index(schema.outputs, len(node.outputs))


def _has_subgraph(node: Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, (list, tuple)) and any(isinstance(x, gs.Graph) for x in v))
               for v in node.attrs.values())


@dataclass
class _Plan:
    """What one node wants: per input the dtype it must read (None: any), per output float16 or not."""

    wants: list
    out16: list
    converted: bool = False


class ConvertFloat16(Pass):
    name = "convert_fp16"
    description = "convert float32 weights and computation to float16 for CUDA/TensorRT (lossy)"
    lossless = False
    stage = "transform"
    order = 900
    default = False
    Options = Fp16Options

    def __init__(self, options: Optional[Fp16Options] = None):
        super().__init__(options)
        unknown = set(_split_ops(self.options.allow)) - set(DEFAULT_BLOCK)
        if unknown:
            raise OptimizeError(f"--fp16-allow {sorted(unknown)}: not in the default block list {sorted(DEFAULT_BLOCK)}")

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--fp16", action="store_true",
                           help="convert weights and computation to float16 (for CUDA/TensorRT)")
        group.add_argument("--fp16-keep-io", dest="fp16_keep_io", action="store_true", default=True,
                           help="keep graph inputs/outputs float32, with a Cast at the boundary (default)")
        group.add_argument("--fp16-io", dest="fp16_keep_io", action="store_false",
                           help="make graph inputs/outputs float16 too")
        group.add_argument("--fp16-block", metavar="OPS", default=None,
                           help="comma-separated op types kept in float32, added to the default block list ("
                                + ",".join(DEFAULT_BLOCK) + ")")
        group.add_argument("--fp16-allow", metavar="OPS", default=None,
                           help="comma-separated op types of the default block list to convert anyway")

    @classmethod
    def from_arguments(cls, args: Any) -> Optional["ConvertFloat16"]:
        if not getattr(args, "fp16", False):
            return None
        return cls(Fp16Options(keep_io=getattr(args, "fp16_keep_io", True),
                               block=_split_ops(getattr(args, "fp16_block", None)),
                               allow=_split_ops(getattr(args, "fp16_allow", None))))

    def blocked(self) -> set[str]:
        return (set(DEFAULT_BLOCK) | set(_split_ops(self.options.block))) - set(_split_ops(self.options.allow))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ensure_shapes(graph, ctx)
        topological_sort(graph)
        result = PassResult()
        conv = _Converter(ctx.opset, self.blocked(), _Names(graph), result, _non_tensor_names(ctx.original))
        conv.graph_outputs = {id(t) for g in walk_graphs(graph) for t in g.outputs}
        for g in list(walk_graphs(graph)):  # outer graphs first: bodies then see float32 outer values
            conv.convert(g, io16=(g is graph and not self.options.keep_io))
        conv.cancel_casts(graph)
        topological_sort(graph)
        result.rewrites = conv.converted
        result.changed = conv.converted > 0 or conv.io_changed
        result.details = {"converted_nodes": conv.converted, "declined_nodes": conv.declined,
                          "casts_inserted": conv.casts, "casts_removed": conv.casts_removed,
                          "weights_converted": conv.weights, "weights_clamped_values": conv.clamped,
                          "weights_underflowed_values": conv.underflowed}
        if conv.clamped:
            result.notes.append(f"{conv.clamped} weight values beyond the float16 range (|x| > 65504) were "
                                f"clamped to +-65504")
        if conv.underflowed:
            result.notes.append(f"{conv.underflowed} non-zero weight values below the float16 range became 0")
        return result


def _non_tensor_names(model: Optional[onnx.ModelProto]) -> set[str]:
    """Names of sequence/map/optional values (gs shows them as tensors; they must not be touched)."""
    if model is None:
        return set()
    names = set()
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.type.WhichOneof("value") not in (None, "tensor_type"):
            names.add(vi.name)
    return names


class _Converter:
    def __init__(self, opset: int, blocked: set[str], names: _Names, result: PassResult, non_tensor: set[str]):
        self.opset, self.blocked, self.names, self.result, self.non_tensor = opset, blocked, names, result, non_tensor
        self.converted = self.declined = self.casts = self.casts_removed = 0
        self.weights = self.clamped = self.underflowed = 0
        self.io_changed = False
        self.graph_outputs: set[int] = set()  # of every graph: a weight that is one keeps its float32 name
        #: Casts inserted or retargeted by this pass, or reading a tensor it made float16
        self.touched: set[int] = set()

    # ------------------------------------------------------------------ planning (no graph edits)
    def _float(self, t: gs.Tensor) -> bool:
        return t.name != "" and t.name not in self.non_tensor and _is_f32(t)

    def plan_node(self, node: Node) -> tuple[_Plan, Optional[str]]:
        """The node's float16 plan, or its float32 plan and why ('' when not worth a report line)."""
        keep = _Plan([F32 if self._float(t) else None for t in node.inputs], [False] * len(node.outputs))
        if node.op in _ANY_INPUT and is_standard(node):
            keep.wants = [None] * len(node.inputs)
        if node.op in _SOURCES and is_standard(node) and node.outputs and self._float(node.outputs[0]):
            return _Plan(keep.wants, [True], True), None  # float16 only if its readers all are (see convert)
        has_float = any(w is not None for w in keep.wants) or any(self._float(t) for t in node.outputs)
        if not has_float or node.op in _ANY_INPUT or node.op == "Constant":
            return keep, ""
        reason = self._decline_reason(node)
        if reason is not None:
            return keep, reason
        formal = _formal_types(node, self.opset)
        if formal is None:
            return keep, f"no ONNX schema for {node.op} at opset {self.opset}: kept float32"
        ins, outs = formal
        if any(types and not any(s.startswith("tensor(") for s in types) for types in ins + outs):
            return keep, "sequence/map/optional op: kept float32"
        if any(not _known(t) for t in [t for t in node.inputs if t.name] + [t for t in node.outputs if t.outputs]):
            return keep, "a tensor's dtype is unknown: kept float32"
        ok = "tensor(float16)"
        wants = [(F16 if ok in ins[i] else F32) if self._float(t) else None for i, t in enumerate(node.inputs)]
        out16 = [self._float(t) and ok in outs[i] for i, t in enumerate(node.outputs)]
        if F16 not in wants and not any(out16):
            return keep, f"the {node.op} schema allows no float16 here: kept float32"
        return _Plan(wants, out16, True), None

    def _decline_reason(self, node: Node) -> Optional[str]:
        if not is_standard(node):
            return f"domain {node.domain}: kept float32"
        if _has_subgraph(node):
            return f"{node.op} holds subgraphs: the node stays float32, its bodies are converted on their own"
        if node.op in self.blocked:
            return f"block-listed: {DEFAULT_BLOCK.get(node.op, '--fp16-block')}"
        if node.op in _TYPE_FROM_ATTR:
            return f"{node.op} takes its output type from an attribute: kept float32"
        return None

    # ------------------------------------------------------------------ one graph
    def convert(self, g: gs.Graph, io16: bool) -> None:
        own = {id(n) for n in g.nodes}
        data = _data_dependent(g)
        pinned = F16 if io16 else F32
        outputs = {id(t) for t in g.outputs}
        plans, reasons = {}, {}
        for node in g.nodes:
            plans[id(node)], reasons[id(node)] = self.plan_node(node)
        # Nodes computing only from constants and shapes, and Cast(to=FLOAT)/ConstantOfShape, follow
        # their readers: float16 only when every reader wants float16 (never a shape computation
        # ending in Cast-to-int, Reshape or Range). Readers come later in topological order.
        for node in reversed(g.nodes):
            plan = plans[id(node)]
            follows = node.op in _SOURCES or not any(id(t) in data for t in node.inputs)
            if not follows or not plan.converted:
                continue
            outs16 = [t for t, o16 in zip(node.outputs, plan.out16) if o16]
            if not outs16 or not all(self._all_want16(t, plans, own, outputs, pinned) for t in outs16):
                plans[id(node)] = _Plan([F32 if w is not None and node.op not in _ANY_INPUT else w
                                         for w in plan.wants], [False] * len(node.outputs))
                reasons[id(node)] = ""
        for node in g.nodes:
            if plans[id(node)].converted:
                self.converted += 1
            elif reasons[id(node)]:
                self.declined += 1
                self.result.reject(node, reasons[id(node)])

        tensors: dict[int, gs.Tensor] = {}
        for t in list(g.inputs) + list(g.outputs):
            tensors[id(t)] = t
        for node in g.nodes:
            for t in list(node.inputs) + list(node.outputs):
                tensors[id(t)] = t
        for t in tensors.values():
            if self._float(t):
                self._route(g, t, plans, own, outputs, io16, pinned)
        for node in list(g.nodes):
            plan = plans.get(id(node))
            if node.op in _SOURCES and plan is not None and plan.out16 and plan.out16[0]:
                self._retarget(g, node)
        dead = [n for n in g.nodes if n.op == "Constant" and not any(o.outputs or is_graph_output(g, o)
                                                                      for o in n.outputs)]
        _remove(g, dead)

    def _all_want16(self, t: gs.Tensor, plans, own, outputs, pinned) -> bool:
        if id(t) in outputs and pinned != F16:
            return False
        wants = []
        for node in t.outputs:
            if id(node) not in own:
                return False
            if node.op in ("Shape", "Size"):
                continue
            wants += [plans[id(node)].wants[i] for i, x in enumerate(node.inputs) if x is t]
        return bool(wants) and all(w == F16 for w in wants)

    def _route(self, g, t, plans, own, outputs, io16, pinned) -> None:
        """Give `t` its new type and make every reader read the version (float16/32) it wants."""
        producer = sole_producer(t)
        produced_here = producer is not None and id(producer) in own
        constant = isinstance(t, gs.Constant) or (producer is not None and producer.op == "Constant")
        if constant:
            base = F32
        elif produced_here:
            base = F16 if plans[id(producer)].out16[producer.outputs.index(t)] else F32
        elif any(x is t for x in g.inputs):
            base = F16 if io16 else F32
            if io16:
                t.dtype = F16
                self.io_changed = True
        else:
            base = F32  # an outer-scope value: the holder node asked for float32
        versions = {base: t}
        if id(t) in outputs and base != pinned and produced_here and not constant:
            versions = self._split_output(g, t, producer, base, pinned)
        elif produced_here and not constant:
            t.dtype = base
        readers = [(n, i) for n in list(t.outputs) for i, x in enumerate(n.inputs) if x is t]
        wants = [F32 if id(n) not in own else plans[id(n)].wants[i] for n, i in readers]
        if constant:  # Shape/Size read the float16 copy when it replaces the weight everywhere else
            typed = [w for (n, _), w in zip(readers, wants) if n.op not in ("Shape", "Size")]
            all16 = id(t) not in self.graph_outputs and bool(typed) and all(w == F16 for w in typed)
            wants = [F16 if all16 and w is None else w for w in wants]
        if base == F16:
            self.touched.update(id(n) for n, _ in readers if n.op == "Cast")
        for (node, i), want in zip(readers, wants):
            if want is None or versions.get(want) is t:
                continue
            if want not in versions:
                versions[want] = (self._weight16(g, t, reuse_name=all16) if constant
                                  else self._cast(g, versions[base], want))
            node.inputs[i] = versions[want]

    def _split_output(self, g, t, producer, base, pinned) -> dict:
        """A graph output keeps its name and IO type: the producer writes a new tensor, a Cast the output."""
        inner = gs.Variable(self.names(g, f"{t.name}_{'fp16' if base == F16 else 'fp32'}"), base, t.shape)
        producer.outputs[producer.outputs.index(t)] = inner
        t.dtype = pinned
        self._add_cast(g, inner, t, pinned)
        return {base: inner, pinned: t}

    def _cast(self, g: gs.Graph, src: gs.Tensor, to: np.dtype) -> gs.Variable:
        out = gs.Variable(self.names(g, f"{src.name}_{'fp16' if to == F16 else 'fp32'}"), to, src.shape)
        self._add_cast(g, src, out, to)
        return out

    def _add_cast(self, g, src, dst, to) -> None:
        elem = TensorProto.FLOAT16 if to == F16 else TensorProto.FLOAT
        node = gs.Node("Cast", name=self.names(g, f"{dst.name}_Cast"), attrs={"to": elem}, inputs=[src], outputs=[dst])
        g.nodes.append(node)
        self.touched.add(id(node))
        self.casts += 1

    def _weight16(self, g, t, reuse_name: bool) -> gs.Constant:
        values = _value(t)
        self.weights += 1
        name = t.name if reuse_name else self.names(g, f"{t.name}_fp16")
        return gs.Constant(name, self._to_f16(values))

    def _to_f16(self, values: np.ndarray) -> np.ndarray:
        """float16 copy; finite values beyond the range are clamped (counted), infinities kept."""
        values = np.asarray(values, dtype=np.float32)
        big = np.isfinite(values) & (np.abs(values) > FP16_MAX)
        self.clamped += int(big.sum())
        if big.any():
            values = np.where(big, np.sign(values) * FP16_MAX, values)
        out = values.astype(np.float16)
        self.underflowed += int(np.count_nonzero((out == 0) & (values != 0)))
        return out

    def _retarget(self, g: gs.Graph, node: Node) -> None:
        out = node.outputs[0]
        if node.op == "Cast":
            node.attrs["to"] = TensorProto.FLOAT16
            self.touched.add(id(node))
        else:
            value = node.attrs.get("value")
            values = np.zeros(1, np.float32) if value is None else _value(value)
            node.attrs["value"] = gs.Constant(self.names(g, f"{node.name}_value_fp16"), self._to_f16(values))
        out.dtype = F16

    # ------------------------------------------------------------------ clean-up
    def cancel_casts(self, graph: gs.Graph) -> None:
        """Drop the Casts this pass made no-ops, and Cast(fp16->fp32)->Cast(fp32->fp16) pairs (both
        exact). Casts the pass did not touch are left to the lossless passes."""
        graphs = list(walk_graphs(graph))
        for g in graphs:
            for node in list(g.nodes):
                if id(node) not in self.touched or not node.inputs or not node.outputs:
                    continue
                src, to = node.inputs[0], node.attrs.get("to")
                value = src if onnx_dtype(src.dtype) == to else None
                first = sole_producer(src)
                if value is None and to == TensorProto.FLOAT16 and first is not None and first.op == "Cast" \
                        and is_standard(first) and onnx_dtype(first.inputs[0].dtype) == TensorProto.FLOAT16 \
                        and first.attrs.get("to") == TensorProto.FLOAT:
                    value = first.inputs[0]
                    self.touched.add(id(first))
                edit = None if value is None else bypass(g, node, value)
                if edit is not None and not isinstance(edit, str):
                    edit.apply(g)
                    self.casts_removed += 1
        changed = True
        while changed:  # a body may have stopped reading an outer Cast: sweep every graph again
            changed = False
            for g in graphs:
                dead = [n for n in g.nodes if id(n) in self.touched and n.outputs and not n.outputs[0].outputs
                        and not is_graph_output(g, n.outputs[0])]
                _remove(g, dead)
                changed |= bool(dead)


def _remove(g: gs.Graph, nodes: list) -> None:
    ids = {id(n) for n in nodes}
    for n in nodes:
        n.inputs.clear()
        n.outputs.clear()
    if ids:
        g.nodes = [n for n in g.nodes if id(n) not in ids]


def _value(t: gs.Tensor) -> np.ndarray:
    if isinstance(t, gs.Constant):
        return t.values
    return constant_node_value(sole_producer(t))


def _data_dependent(g: gs.Graph) -> set[int]:
    """Ids of tensors whose values depend on graph data (not only on shapes and constants).

    Graph inputs and outer-scope values are data; Shape/Size outputs are not. Nodes reading no
    data tensor compute shapes or constants and stay float32."""
    produced = {id(t) for n in g.nodes for t in n.outputs}
    data = {id(t) for t in g.inputs if not isinstance(t, gs.Constant)}
    for n in g.nodes:
        for t in n.inputs:
            if isinstance(t, gs.Variable) and t.name and id(t) not in produced and not is_constant(t):
                data.add(id(t))
    for n in g.nodes:  # topological order
        if n.op in ("Shape", "Size") and is_standard(n):
            continue
        if _has_subgraph(n) or any(id(t) in data for t in n.inputs):
            data.update(id(t) for t in n.outputs)
    return data
