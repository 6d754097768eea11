"""Fold computations whose inputs are all known into constants.

The engine is onnx-graphsurgeon's `Graph.fold_constants` (evaluated by ONNX Runtime), driven
graph by graph so our exclusions also apply inside If/Loop bodies (gs does not forward
`should_exclude_node` to subgraphs). Two gs features are replaced by our own code:
- static shape folding (`fold_shapes=True` also runs gs's "cast elision", which turns a float
  constant such as 0.5 into the int 0 in place, and its Shape folding ignores `start`/`end`);
- If flattening (gs leaves the If outputs without a producer when a branch output is a
  constant or an outer tensor).
Folding never creates a constant above `ctx.fold_size_limit`, never materializes a result much
bigger than the constants it comes from (`growth_limit`: e.g. ConstantOfShape-generated
weights), and never asks ONNX Runtime for a huge intermediate.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from onnxslim_opt.graph import (Edit, NewNode, constant_node_value, constant_value, fresh_name, is_constant,
                                is_graph_output, is_standard, onnx_dtype, walk_graphs)
from onnxslim_opt.pass_api import Pass, PassContext, PassResult
from onnxslim_opt.shape_inference import ensure_shapes

QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Multinomial", "Bernoulli"})
#: ops whose outputs are sequences/optionals: gs can only store tensors as constants
NON_TENSOR_OPS = frozenset({"SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceErase",
                            "SplitToSequence", "SequenceMap", "Optional"})
SHAPE_OPS = ("Shape", "Size")
#: ONNX Runtime is never asked to compute a folded intermediate above this many bytes
INTERMEDIATE_LIMIT = 256 << 20
_CACHE_KEY = "_fold_constants_declined"


@dataclass(frozen=True)
class Options:
    #: a folded tensor bigger than the constants it is computed from is kept only up to this size
    growth_limit: int = 4096


class FoldConstants(Pass):
    name = "fold_constants"
    description = "evaluate nodes whose inputs are constants (or static shapes) and store the results"
    stage = "simplify"
    order = 100
    Options = Options

    def applicable(self, graph: gs.Graph, ctx: PassContext) -> bool:
        first_look = _CACHE_KEY not in graph.__dict__  # the first run reports what cannot fold
        return first_look or self._new_candidates(graph, PassResult()) is not None

    @staticmethod
    def _new_candidates(graph: gs.Graph, result: PassResult) -> Optional[dict]:
        """Foldable candidates, or None when there are none that the last run that folded
        nothing did not already decline."""
        candidates = _scan(graph, result)
        declined = graph.__dict__.get(_CACHE_KEY, {})
        if not candidates or all(key in declined for key in candidates):
            return None
        return candidates

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        first_look = _CACHE_KEY not in graph.__dict__
        candidates = self._new_candidates(graph, result)
        if candidates is None:
            graph.__dict__.setdefault(_CACHE_KEY, {})
            return result if first_look else PassResult()
        ensure_shapes(graph, ctx)
        folder = _Folder(ctx.fold_size_limit, self.options.growth_limit, result, graph.ir_version)
        folder.fold(graph)
        result.rewrites = folder.rewrites
        result.changed = folder.rewrites > 0 or folder.other_changes > 0
        # remember what was looked at and declined, so an unchanged graph is skipped quickly next time
        graph.__dict__[_CACHE_KEY] = {} if result.changed else candidates
        return result


# ----------------------------------------------------------------------------- what may fold
def never_fold_reason(node: gs.Node) -> Optional[str]:
    """Why `node` must never be folded, or None."""
    if not is_standard(node):
        return f"custom domain {node.domain!r}"
    if node.op in QUANT_OPS:
        return "quantization op: kept so the model stays quantized"
    if node.op in RANDOM_OPS:
        return "random op: folding would freeze one sample"
    if node.op in NON_TENSOR_OPS:
        return "produces a sequence/optional, not a tensor"
    if node.op == "Dropout" and len(node.inputs) > 2 and not node.inputs[2].is_empty():
        mode = constant_value(node.inputs[2])
        if mode is None or bool(np.asarray(mode).any()):
            return "Dropout in training mode is random"
    if node.op in ("Loop", "Scan") and _has_unused_body_input(node):
        return "its body has an unused input, which gs drops when it evaluates the loop"
    for sub in node.subgraphs():
        for inner in sub.nodes:
            reason = never_fold_reason(inner)
            if reason:
                return f"its subgraph holds {inner.op}: {reason}"
    return None


def _has_unused_body_input(node: gs.Node) -> bool:
    body = node.attrs.get("body")
    return isinstance(body, gs.Graph) and any(not t.outputs and not is_graph_output(body, t) for t in body.inputs)


def _foreign_known(node: gs.Node, known) -> bool:
    """Every tensor a subgraph of `node` reads from outside is known."""
    for sub in node.subgraphs():
        if not all(known(t) for t in sub._foreign_tensors().values()):
            return False
    return True


def _candidate_key(node: gs.Node) -> tuple:
    shapes = tuple(tuple(t.shape) if t.shape is not None else None for t in node.inputs) \
        if node.op in SHAPE_OPS else ()
    return (id(node), tuple(id(t) for t in node.inputs), shapes)


def _scan(graph: gs.Graph, result: PassResult) -> dict:
    """Nodes that might fold (cheap, no shape inference): all inputs constant, Shape/Size whose
    input shape is static or not yet inferred, If with a constant condition."""
    found = {}
    for g in walk_graphs(graph):
        for node in g.nodes:
            if node.op == "Constant" or not node.outputs:
                continue
            if node.op == "If" and is_standard(node) and constant_value(node.inputs[0]) is not None:
                found[_candidate_key(node)] = (node, list(node.inputs))  # flattened, whatever it holds
                continue
            inputs = [t for t in node.inputs if not t.is_empty()]
            all_const = all(is_constant(t) for t in inputs)
            reason = never_fold_reason(node)
            if reason:
                if all_const and inputs:
                    result.reject(node, reason)
                continue
            castlike = node.op == "CastLike" and is_constant(node.inputs[0])
            if not (castlike or _static_shape_value(node) is not None or _needs_shapes(node)
                    or (all_const and _foreign_known(node, is_constant))):
                continue
            found[_candidate_key(node)] = (node, list(node.inputs))
    return found


def _needs_shapes(node: gs.Node) -> bool:
    """A Shape/Size whose input shape is not (fully) inferred yet: shape inference may make it static."""
    if node.op not in SHAPE_OPS or not isinstance(node.inputs[0], gs.Variable):
        return False
    dims = node.inputs[0].shape
    return dims is None or any(d is None for d in dims)


# ----------------------------------------------------------------------------- static shapes
def _static_dim(d) -> bool:
    return isinstance(d, (int, np.integer)) and d >= 0


def _shape_dims(node: gs.Node) -> Optional[list]:
    """The dims a standard Shape node reports (its start/end applied), or None if unknown."""
    if node.op != "Shape" or not is_standard(node) or not isinstance(node.inputs[0], gs.Variable):
        return None
    dims = node.inputs[0].shape
    if dims is None:
        return None
    return list(dims)[node.attrs.get("start", 0):node.attrs.get("end", None)]


def _slice_indices(length: int, start: int, end: int, step: int) -> list[int]:
    """ONNX Slice semantics on one axis (clamping differs from Python for negative steps)."""
    start = start + length if start < 0 else start
    end = end + length if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), length), min(max(end, 0), length)
    else:
        start, end = min(max(start, 0), length - 1), min(max(end, -1), length - 1)
    return list(range(start, end, step))


def _given(node: gs.Node, index: int) -> bool:
    return len(node.inputs) > index and not node.inputs[index].is_empty()


def _scalar(tensor) -> Optional[int]:
    value = constant_value(tensor)
    return int(np.asarray(value).ravel()[0]) if value is not None and np.asarray(value).size == 1 else None


def _static_shape_value(node: gs.Node) -> Optional[np.ndarray]:
    """Value of Shape/Size of a statically shaped tensor, or of Gather/Slice reading only static dims
    of a Shape; None otherwise."""
    if not is_standard(node) or not node.inputs:
        return None
    if node.op == "Shape":
        dims = _shape_dims(node)
        return np.array(dims, dtype=np.int64) if dims is not None and all(map(_static_dim, dims)) else None
    if node.op == "Size":
        dims = node.inputs[0].shape if isinstance(node.inputs[0], gs.Variable) else None
        ok = dims is not None and all(map(_static_dim, dims))
        return np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64) if ok else None
    if node.op not in ("Gather", "Slice") or len(node.inputs[0].inputs) != 1:
        return None
    dims = _shape_dims(node.inputs[0].inputs[0])
    if dims is None:
        return None
    if node.op == "Gather":
        indices = constant_value(node.inputs[1])
        if indices is None or node.attrs.get("axis", 0) not in (0, -1):
            return None
        idx = np.asarray(indices).astype(np.int64)
        if idx.size and (idx.min() < -len(dims) or idx.max() >= len(dims)):
            return None
        picked = [dims[int(i)] for i in idx.ravel()]
        return np.array(picked, dtype=np.int64).reshape(idx.shape) if all(map(_static_dim, picked)) else None
    if len(node.inputs) >= 3:
        start, end = _scalar(node.inputs[1]), _scalar(node.inputs[2])
        axis = _scalar(node.inputs[3]) if _given(node, 3) else 0
        step = _scalar(node.inputs[4]) if _given(node, 4) else 1
    elif len(node.attrs.get("starts", ())) == 1:
        start, end = node.attrs["starts"][0], node.attrs["ends"][0]
        axis, step = node.attrs.get("axes", [0])[0], 1
    else:
        return None
    if None in (start, end, axis, step) or axis not in (0, -1) or step == 0:
        return None
    picked = [dims[i] for i in _slice_indices(len(dims), start, end, step)]
    return np.array(picked, dtype=np.int64) if all(map(_static_dim, picked)) else None


# ----------------------------------------------------------------------------- folding
def _known_nbytes(tensor: gs.Tensor) -> Optional[int]:
    shape, dtype = tensor.shape, tensor.dtype
    if shape is None or dtype is None or not all(map(_static_dim, shape)):
        return None
    try:
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    except TypeError:
        return None


class _Folder:
    """Folds one graph level at a time, outermost first, counting what changed."""

    def __init__(self, limit: int, growth_limit: int, result: PassResult, ir_version: Optional[int]):
        self.ir_version = ir_version
        self.limit = limit
        self.growth_limit = growth_limit
        self.result = result
        self.rewrites = 0
        self.other_changes = 0

    def fold(self, g: gs.Graph) -> None:
        g.toposort(recurse_subgraphs=False)
        self.rewrites += self._fold_static_shapes(g) + self._castlike_to_cast(g)
        excluded, foldable = self._plan(g)
        if foldable:
            self._run_gs(g, excluded)
        self.rewrites += self._flatten_ifs(g)
        self._drop_dangling(g)
        for node in list(g.nodes):
            for sub in node.subgraphs():
                self.fold(sub)

    def _fold_static_shapes(self, g: gs.Graph) -> int:
        count = 0
        for node in g.nodes:
            if node.op in ("Shape", "Size", "Gather", "Slice") and node.outputs:
                value = _static_shape_value(node)
                if value is not None:
                    out = node.outputs[0]
                    out.to_constant(value)
                    out.inputs.clear()
                    count += 1
        return count

    @staticmethod
    def _castlike_to_cast(g: gs.Graph) -> int:
        """CastLike(constant, x) only needs x's dtype: once that is known it is a foldable Cast
        (the dynamo exporter builds zero conv biases this way)."""
        count = 0
        for node in g.nodes:
            if node.op == "CastLike" and is_standard(node) and is_constant(node.inputs[0]):
                to = onnx_dtype(node.inputs[1].dtype)
                if to is None:
                    continue
                node.op = "Cast"
                node.attrs = {"to": to, **{k: v for k, v in node.attrs.items() if k == "saturate"}}
                del node.inputs[1]
                count += 1
        return count

    def _plan(self, g: gs.Graph) -> tuple[set[str], int]:
        """Names of foldable outputs gs must not fold (results over the size or growth limit), and
        how many nodes are left to fold. Excluding a producer moves materialization to its inputs,
        so this repeats until stable."""
        excluded: dict[int, gs.Node] = {}
        inter_limit = max(self.limit, INTERMEDIATE_LIMIT)
        while True:
            src: dict[int, int] = {}
            foldable: set[int] = set()

            def known(t) -> bool:
                return isinstance(t, gs.Constant) or id(t) in src

            def source_bytes(t) -> int:
                if id(t) in src:
                    return src[id(t)]
                return _known_nbytes(t) or 0

            for node in g.nodes:
                if node.op == "Constant" and is_standard(node):
                    value = constant_node_value(node)
                    for out in node.outputs:
                        src[id(out)] = value.nbytes if value is not None else 0
                    continue
                if not node.outputs or id(node) in excluded or never_fold_reason(node):
                    continue
                inputs = [t for t in node.inputs if not t.is_empty()]
                if all(known(t) for t in inputs) and _foreign_known(node, known):
                    total = sum(source_bytes(t) for t in inputs)
                    foldable.add(id(node))
                    for out in node.outputs:
                        src[id(out)] = total
            new = self._over_limits(g, foldable, src, inter_limit)
            if not new:
                return {o.name for n in excluded.values() for o in n.outputs}, len(foldable)
            excluded.update(new)

    def _over_limits(self, g: gs.Graph, foldable: set[int], src: dict[int, int], inter_limit: int) -> dict:
        new = {}
        for node in g.nodes:
            if id(node) not in foldable:
                continue
            for out in node.outputs:
                size = _known_nbytes(out)
                if size is None:
                    continue
                materialized = is_graph_output(g, out) or any(id(c) not in foldable for c in out.outputs)
                reason = None
                if size > inter_limit:
                    reason = f"would compute a {size} B intermediate"
                elif materialized and size > self.limit:
                    reason = f"result of {size} B exceeds fold_size_limit ({self.limit} B)"
                elif materialized and size > self.growth_limit and size > src.get(id(out), 0):
                    reason = (f"result of {size} B is bigger than the {src.get(id(out), 0)} B of constants it "
                              f"comes from (growth_limit {self.growth_limit} B)")
                if reason:
                    new[id(node)] = node
                    self.result.reject(node, reason)
                    break
        return new

    def _run_gs(self, g: gs.Graph, excluded: set[str]) -> None:
        produced = [t for n in g.nodes if n.op != "Constant" for t in n.outputs if isinstance(t, gs.Variable)]
        lowered = [t for n in g.nodes if n.op == "Constant" for t in n.outputs]

        def exclude(node: gs.Node) -> bool:
            return never_fold_reason(node) is not None or any(o.name in excluded for o in node.outputs)

        kwargs = dict(fold_shapes=False, recurse_subgraphs=False, flatten_subgraphs=False, size_threshold=self.limit,
                      should_exclude_node=exclude, recurse_functions=False)
        severity, ir_version = G_LOGGER.severity, g.ir_version
        G_LOGGER.severity = G_LOGGER.ERROR
        # gs exports a subgraph with onnx's newest IR version, which ONNX Runtime may not load yet
        g.ir_version = ir_version if ir_version is not None else self.ir_version
        try:
            with _quiet_sessions():
                try:  # one ORT session for everything; on failure, partition so one bad part blocks nothing else
                    g.fold_constants(partitioning=None, error_ok=False, **kwargs)
                except Exception:
                    g.fold_constants(partitioning="recursive", error_ok=True, **kwargs)
        finally:
            G_LOGGER.severity, g.ir_version = severity, ir_version
        self.rewrites += sum(isinstance(t, gs.Constant) for t in produced)
        self.other_changes += sum(isinstance(t, gs.Constant) for t in lowered)

    def _flatten_ifs(self, g: gs.Graph) -> int:
        """Replace an If whose condition is constant by the nodes of the branch it takes."""
        count = 0
        for node in list(g.nodes):
            if node.op != "If" or not is_standard(node):
                continue
            cond = constant_value(node.inputs[0])
            if cond is None or np.asarray(cond).size != 1:
                continue
            branch = node.attrs["then_branch" if bool(np.asarray(cond).ravel()[0]) else "else_branch"]
            if branch.inputs or len(branch.outputs) != len(node.outputs):
                self.result.reject(node, "malformed If branch")
                continue
            outer = {id(t) for t in g.tensors().values()}
            for t in _branch_locals(branch, outer):
                t.name = fresh_name(g, t.name)
            moved = list(branch.nodes)
            branch.nodes = []
            g.nodes.extend(moved)
            self._rewire_if(g, node, branch, moved)
            count += 1
        if count:
            g.toposort(recurse_subgraphs=False)
        return count

    @staticmethod
    def _rewire_if(g: gs.Graph, node: gs.Node, branch: gs.Graph, moved: list[gs.Node]) -> None:
        """Readers of the If outputs read the branch outputs; a graph output keeps its name (an
        Identity when the branch output is not produced by a moved node: constant, outer tensor)."""
        moved_ids = {id(n) for n in moved}
        edit = Edit(remove=[node])
        for out, value in zip(node.outputs, branch.outputs):
            local = len(value.inputs) == 1 and id(value.inputs[0]) in moved_ids
            if is_graph_output(g, out) and not local:
                identity = gs.Variable(fresh_name(g, out.name + "_flat"), out.dtype, out.shape)
                edit.replace.append((out, identity))
                edit.add.append(NewNode("Identity", [value], [identity]))
            else:
                edit.replace.append((out, value))
        edit.apply(g)

    def _drop_dangling(self, g: gs.Graph) -> None:
        """Nodes whose every output was folded away (gs leaves them in place without outputs)."""
        dangling = [n for n in g.nodes if not n.outputs and is_standard(n)]
        for node in dangling:
            node.inputs.clear()
        if dangling:
            drop = {id(n) for n in dangling}
            g.nodes = [n for n in g.nodes if id(n) not in drop]
            self.other_changes += len(dangling)


@contextlib.contextmanager
def _quiet_sessions() -> Iterator[None]:
    """gs builds its ONNX Runtime sessions with default options: evaluate with graph optimizations
    off (plain kernels, faster to build) and without the runtime's warnings on the console."""
    import onnxruntime as ort

    original = ort.InferenceSession

    def session(model, sess_options=None, providers=None, **kwargs):
        if sess_options is None:
            sess_options = ort.SessionOptions()
            sess_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess_options.log_severity_level = 3
        return original(model, sess_options, providers=providers, **kwargs)

    ort.InferenceSession = session
    try:
        yield
    finally:
        ort.InferenceSession = original


def _branch_locals(branch: gs.Graph, outer: set[int]) -> Iterable[gs.Tensor]:
    """Tensors defined by the branch itself (node outputs and its own initializers)."""
    seen: dict[int, gs.Tensor] = {}
    for node in branch.nodes:
        for t in node.outputs:
            seen[id(t)] = t
        for t in node.inputs:
            if isinstance(t, gs.Constant) and id(t) not in outer:
                seen[id(t)] = t
    for t in branch.outputs:
        if isinstance(t, gs.Constant) and id(t) not in outer:
            seen[id(t)] = t
    return [t for t in seen.values() if not t.is_empty()]
