"""Graph helpers over onnx-graphsurgeon shared by every pass.

The pipeline keeps one `gs.Graph` for its whole run; passes read constants through
`constant_value` (which sees initializers and Constant nodes alike), and change the graph
through `Edit` so a rewrite that is planned but not applied leaves nothing behind.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

Tensor = gs.Tensor
Node = gs.Node
Graph = gs.Graph

STANDARD_DOMAINS = ("", "ai.onnx", None)  # gs leaves the default domain as None


# ----------------------------------------------------------------------------- import / export
def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import without copying weights: gs keeps initializers as lazy views of the proto."""
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph` as a complete model, carrying over what gs drops: model metadata,
    non-tensor IO types, opset imports."""
    topological_sort(graph)  # edits append nodes at the end; ONNX requires topological order
    model = gs.export_onnx(graph, do_type_check=False)
    _finish_export(model, original, set())
    return model


def export_skeleton(graph: gs.Graph, original: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, Any]]]:
    """Export `graph` without its top-level weights, and list them (name, values source).

    The sources are what the graph holds (file-backed, lazy proto or numpy array), so a writer
    can stream them to disk without a full in-memory copy of the model (weights_on_disk).
    """
    topological_sort(graph)
    weights = [(name, t._values) for name, t in graph.tensors().items()
               if isinstance(t, gs.Constant) and not getattr(t, "is_sparse", False)]
    names = {name for name, _ in weights}
    light = graph.copy()
    for name, tensor in light.tensors().items():
        if name in names and isinstance(tensor, gs.Constant):
            tensor.to_variable(dtype=None, shape=None)
            tensor.type = "tensor_type"
    model = gs.export_onnx(light, do_type_check=False)
    _finish_export(model, original, names)
    return model, weights


def _finish_export(model: onnx.ModelProto, original: onnx.ModelProto, outer_weights: set[str]) -> None:
    model.ir_version = original.ir_version
    input_names = {i.name for i in model.graph.input}
    if model.ir_version < 4 and (outer_weights or any(t.name not in input_names for t in model.graph.initializer)):
        # IR < 4 requires every initializer to be an input; constants that stopped being
        # inputs need IR 4, which every runtime that reads IR 3 also reads
        model.ir_version = 4
    model.producer_name = original.producer_name
    model.producer_version = original.producer_version
    model.domain = original.domain
    model.model_version = original.model_version
    model.doc_string = original.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    # keep every opset import of the original (custom domains included), never lower one
    imports = {imp.domain: imp.version for imp in original.opset_import}
    for imp in model.opset_import:
        imports[imp.domain] = max(imports.get(imp.domain, 0), imp.version)
    del model.opset_import[:]
    for domain, version in sorted(imports.items()):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    if original.functions and not model.functions:
        model.functions.extend(original.functions)
    _restore_non_tensor_types(original.graph, model.graph)
    _drop_copied_outer_initializers(model.graph, outer_weights, top=True)


def _drop_copied_outer_initializers(graph: onnx.GraphProto, outer: set[str], top: bool = False) -> None:
    """gs writes every outer-scope weight a subgraph reads as that subgraph's own initializer
    (same name, same data): drop those copies so a weight is stored once. At the top level,
    `outer` names weights written separately (export_skeleton)."""
    if outer and not top:
        kept = [t for t in graph.initializer if t.name not in outer]
        if len(kept) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(kept)
    visible = outer | {t.name for t in graph.initializer}
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _drop_copied_outer_initializers(sub, visible)


def _restore_non_tensor_types(original: onnx.GraphProto, exported: onnx.GraphProto) -> None:
    """gs collapses sequence/map/optional types to tensors; put the original types back."""
    originals = {}
    for vi in list(original.input) + list(original.output) + list(original.value_info):
        if vi.type.WhichOneof("value") not in (None, "tensor_type"):
            originals[vi.name] = vi.type
    if not originals:
        return
    for vi in list(exported.input) + list(exported.output) + list(exported.value_info):
        if vi.name in originals:
            vi.type.CopyFrom(originals[vi.name])
    # an intermediate value_info gs wrote with a guessed tensor type for a non-tensor value is wrong
    keep = [vi for vi in exported.value_info
            if vi.name in originals or vi.type.WhichOneof("value") == "tensor_type"]
    del exported.value_info[:]
    exported.value_info.extend(keep)


# ----------------------------------------------------------------------------- reading the graph
def constant_value(tensor: Optional[Tensor]) -> Optional[np.ndarray]:
    """The value of a tensor known at optimization time, or None.

    Sees initializers (gs.Constant) and outputs of `Constant` nodes (Paddle and many other
    exporters keep every weight that way).
    """
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return tensor.values
    producer = sole_producer(tensor)
    if producer is not None and producer.op == "Constant" and producer.domain in STANDARD_DOMAINS:
        return constant_node_value(producer)
    return None


def constant_node_value(node: Node) -> Optional[np.ndarray]:
    """Value of a `Constant` node, whichever attribute form it uses; None if not decodable."""
    attrs = node.attrs
    if "value" in attrs:
        v = attrs["value"]
        return v.values if isinstance(v, gs.Constant) else np.asarray(v)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(list(attrs[key]), dtype=dtype)
    return None


def tensor_shape(tensor: Tensor) -> Optional[list]:
    """The tensor's shape if known (dims may be symbolic strings or None); never loads weights."""
    shape = tensor.shape
    return None if shape is None else list(shape)


def static_shape(tensor: Tensor) -> Optional[list[int]]:
    """The tensor's shape if every dim is a known positive int (0-sized tensors are left alone)."""
    shape = tensor.shape
    if shape is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return None
    return [int(d) for d in shape]


def onnx_dtype(dtype: Any) -> Optional[int]:
    """TensorProto element type of a gs dtype (gs keeps exotic types as the ONNX enum)."""
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


def optional_input(node: Node, index: int) -> Optional[Tensor]:
    """Input `index`, or None when absent or given as the empty name."""
    if index < len(node.inputs) and node.inputs[index].name != "":
        return node.inputs[index]
    return None


def is_constant(tensor: Optional[Tensor]) -> bool:
    return tensor is not None and (isinstance(tensor, gs.Constant) or (
        sole_producer(tensor) is not None and sole_producer(tensor).op == "Constant"))


def sole_producer(tensor: Tensor) -> Optional[Node]:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def consumers(tensor: Tensor) -> list[Node]:
    return list(tensor.outputs)


def is_graph_output(graph: Graph, tensor: Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def is_graph_input(graph: Graph, tensor: Tensor) -> bool:
    return any(t is tensor for t in graph.inputs)


def single_consumer(graph: Graph, tensor: Tensor) -> Optional[Node]:
    """The only node reading `tensor`, if it is read once and is not a graph output."""
    if len(tensor.outputs) == 1 and not is_graph_output(graph, tensor):
        return tensor.outputs[0]
    return None


def is_standard(node: Node) -> bool:
    return node.domain in STANDARD_DOMAINS


def walk_graphs(graph: Graph) -> Iterator[Graph]:
    """The graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from walk_graphs(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, gs.Graph):
                        yield from walk_graphs(item)


def attr(node: Node, name: str, default: Any = None) -> Any:
    return node.attrs.get(name, default)


def op_histogram(graph: Graph) -> Counter:
    counts: Counter = Counter()
    for g in walk_graphs(graph):
        counts.update(n.op for n in g.nodes)
    return counts


def node_count(graph: Graph) -> int:
    return sum(len(g.nodes) for g in walk_graphs(graph))


def weight_stats(graph: Graph) -> tuple[int, int]:
    """(parameter count, bytes) over distinct initializers and Constant-node values."""
    params = nbytes = 0
    seen: set[int] = set()
    for g in walk_graphs(graph):
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                shape = tensor.shape
                count = math.prod(shape) if shape is not None else 0
                params += count
                nbytes += count * np.dtype(tensor.dtype).itemsize if _is_numpy_dtype(tensor.dtype) else 0
        for node in g.nodes:
            if node.op == "Constant":
                value = constant_node_value(node)
                if value is not None:
                    params += value.size
                    nbytes += value.nbytes
    return params, nbytes


def _is_numpy_dtype(dtype: Any) -> bool:
    try:
        np.dtype(dtype)
        return True
    except TypeError:
        return False


def fresh_name(graph: Graph, base: str) -> str:
    """A tensor/node name not used in the graph (nor in the names already handed out)."""
    used = graph.__dict__.setdefault("_onnxslim_opt_names", None)
    if used is None:
        used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        graph.__dict__["_onnxslim_opt_names"] = used
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


# ----------------------------------------------------------------------------- editing the graph
@dataclass
class NewNode:
    """A node to create when an Edit is applied (gs nodes register with their inputs on creation)."""

    op: str
    inputs: Sequence[Tensor]
    outputs: Sequence[Tensor]
    attrs: dict = field(default_factory=dict)
    name: str = ""
    domain: Optional[str] = None


@dataclass
class Edit:
    """A planned, not yet applied, change to one graph.

    Rewrites compute everything (and may fail) while building the Edit; `apply` only rewires,
    so a rejected or failed plan leaves the graph untouched.
    - `replace`: (old, new) pairs: every reader of `old` reads `new` instead; a graph output
      keeps its name.
    - `remove`: nodes to delete (disconnected from their tensors).
    - `add`: nodes to create.
    """

    add: list[NewNode] = field(default_factory=list)
    remove: list[Node] = field(default_factory=list)
    replace: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def apply(self, graph: Graph) -> None:
        for spec in self.add:
            node = gs.Node(op=spec.op, name=spec.name or fresh_name(graph, spec.op), attrs=dict(spec.attrs),
                           inputs=list(spec.inputs), outputs=list(spec.outputs))
            if spec.domain is not None:
                node.domain = spec.domain
            graph.nodes.append(node)
        removing = {id(n) for n in self.remove}
        for old, new in self.replace:
            replace_uses(graph, old, new, ignore=removing)
        for node in self.remove:
            node.inputs.clear()
            node.outputs.clear()
        if removing:
            graph.nodes = [n for n in graph.nodes if id(n) not in removing]


def replace_uses(graph: Graph, old: Tensor, new: Tensor, ignore: set[int] = frozenset()) -> None:
    """Make every reader of `old` read `new`; a graph output named like `old` keeps its name."""
    if old is new:
        return
    for node in list(old.outputs):
        if id(node) in ignore:
            continue
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
    for i, out in enumerate(graph.outputs):
        if out is not old:
            continue
        if renamable(graph, new):
            old_name = old.name
            old.name = fresh_name(graph, old_name + "_replaced")
            new.name = old_name
            if new.dtype is None:
                new.dtype = old.dtype
            if new.shape is None:
                new.shape = old.shape
            graph.outputs[i] = new
        else:
            # keep `old` as the output tensor, now produced by Identity(new)
            for producer in list(old.inputs):
                if old in producer.outputs:
                    producer.outputs[producer.outputs.index(old)] = gs.Variable(
                        fresh_name(graph, old.name + "_dead"), old.dtype, old.shape)
            graph.nodes.append(gs.Node("Identity", name=fresh_name(graph, "Identity"), inputs=[new], outputs=[old]))


def renamable(graph: Graph, tensor: Tensor) -> bool:
    """Whether replace_uses may give `tensor` a graph output's name: it is produced by a node of
    this very graph (not an outer scope) and is neither a graph input nor already an output."""
    return (isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1
            and any(n is tensor.inputs[0] for n in graph.nodes)
            and not is_graph_input(graph, tensor) and not is_graph_output(graph, tensor))


def bypass(graph: Graph, node: Node, value: Tensor) -> "Edit | str":
    """Edit removing `node`, whose first output always equals `value`, or why it must stay.

    A graph output fed from a graph input, a constant or an outer-scope value cannot take that
    value's name, so the node becomes an Identity; an Identity there is declined (removing it
    would only re-add itself, and the simplify fixed point would never settle).
    """
    out = node.outputs[0]
    if is_graph_output(graph, out) and not renamable(graph, value):
        if node.op == "Identity":
            return "Identity from a graph input, constant or outer value to a graph output must stay"
        return Edit(add=[NewNode("Identity", [value], [out])], remove=[node])
    return Edit(remove=[node], replace=[(out, value)])


def make_constant(graph: Graph, base_name: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(fresh_name(graph, base_name), np.asarray(value, order="C"))  # keeps 0-d as 0-d


def topological_sort(graph: Graph) -> None:
    """Toposort every graph level; gs raises on cycles, which we surface as-is."""
    for g in walk_graphs(graph):
        g.toposort(recurse_subgraphs=False)
