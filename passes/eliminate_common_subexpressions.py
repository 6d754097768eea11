"""Common-subexpression elimination: nodes computing the same thing are merged into one.

Two nodes are the same computation when op type, domain, attributes (compared by value) and
input tensors (the same objects, in order) agree. Torch exports repeat `Shape -> Gather ->
Unsqueeze` chains per use; visiting nodes in topological order with a table keyed on
(op, domain, input ids, attributes) collapses whole chains in one run, since merging a node
makes its consumers' inputs identical. Equal constants held by distinct tensors are merged by
deduplicate_initializers; here inputs only need to be identical objects.

Declined: nondeterministic ops (random generators, Dropout in training mode), ops in custom
domains (a custom op may be stateful), nodes holding subgraphs, and Constant nodes (values are
deduplicated by deduplicate_initializers).
"""
from __future__ import annotations

import hashlib
import heapq
import struct
from typing import Any, Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import constant_value, replace_uses, walk_graphs
from onnxslim_opt.pass_api import Pass, PassContext, PassResult

#: domains whose ops are pure functions of their inputs, except the random ones named below
TRUSTED_DOMAINS = ("", "ai.onnx", None, "ai.onnx.ml", "com.microsoft")
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}


class _Unmergeable(Exception):
    """An attribute this pass cannot compare by value."""


class EliminateCommonSubexpressions(Pass):
    name = "eliminate_common_subexpressions"
    description = "merge nodes with the same op, attributes and inputs (common subexpressions)"
    stage = "simplify"
    order = 700
    transactional = True  # each merge redirects readers whole; a graph between merges is valid

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        all_graphs = list(walk_graphs(graph))
        output_owner: dict[int, list[gs.Graph]] = {}
        for g in all_graphs:
            for t in g.outputs:
                output_owner.setdefault(id(t), []).append(g)
        for g in all_graphs:
            _eliminate(g, ctx, output_owner, result)
        result.changed = result.rewrites > 0
        return result


def _eliminate(g: gs.Graph, ctx: PassContext, output_owner: dict[int, list[gs.Graph]], result: PassResult) -> None:
    order = _topological_order(g)
    if order is None:
        result.notes.append(f"graph {g.name!r} has a cycle; skipped")
        return
    if any(a is not b for a, b in zip(order, g.nodes)):
        g.nodes = order  # merging keeps the first of two nodes, which must precede the other's readers
    table: dict[tuple, list[gs.Node]] = {}
    declined: set[tuple] = set()
    removed: set[int] = set()
    for node in order:
        if node.op == "Constant" or not node.outputs:
            continue
        reason = _decline_reason(node, ctx)
        if reason is not None:
            shallow = (node.op, node.domain, _input_key(node))
            if shallow in declined:
                result.reject(node, reason)
            declined.add(shallow)
            continue
        try:
            key = _key(node)
        except _Unmergeable:
            continue
        bucket = table.setdefault(key, [])
        survivor = next((s for s in bucket if _same_attrs(s, node)), None)
        if survivor is None:
            bucket.append(node)
            continue
        reason = _output_conflict(g, node, output_owner)
        if reason is not None:
            result.reject(node, reason)
            continue
        for old, new in zip(node.outputs, survivor.outputs):
            if not old.is_empty():
                replace_uses(g, old, new)
        node.inputs.clear()
        node.outputs.clear()
        removed.add(id(node))
        result.rewrites += 1
    if removed:
        g.nodes = [n for n in g.nodes if id(n) not in removed]


# ----------------------------------------------------------------------------- eligibility
def _decline_reason(node: gs.Node, ctx: PassContext) -> Optional[str]:
    if node.domain not in TRUSTED_DOMAINS:
        return f"custom domain {node.domain!r}: determinism unknown (a custom op may be stateful)"
    if node.op in NONDETERMINISTIC or "Random" in node.op:
        return "nondeterministic op"
    if "Dropout" in node.op and _dropout_may_train(node, ctx):
        return "Dropout in training mode draws a random mask"
    if _holds_subgraph(node):
        return "holds a subgraph"
    return None


def _dropout_may_train(node: gs.Node, ctx: PassContext) -> bool:
    """True unless the Dropout is provably in inference mode (then it is an identity)."""
    if node.domain not in ("", "ai.onnx", None):
        return True  # contrib variants (BiasDropout...) take training_mode at other positions
    if ctx.opset and ctx.opset < 7:
        return node.attrs.get("is_test", 0) == 0
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        flag = constant_value(node.inputs[2])
        return flag is None or bool(np.any(flag))
    return False


def _holds_subgraph(node: gs.Node) -> bool:
    for value in node.attrs.values():
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(item, gs.Graph) for item in items):
            return True
    return False


def _output_conflict(g: gs.Graph, node: gs.Node, output_owner: dict[int, list[gs.Graph]]) -> Optional[str]:
    """Why the node's outputs cannot be redirected, if they cannot (replace_uses handles `g`'s outputs)."""
    for out in node.outputs:
        owners = output_owner.get(id(out), [])
        if any(owner is not g for owner in owners):
            return "an output is a subgraph output"
        if len(owners) > 1 or sum(t is out for t in g.outputs) > 1:
            return "an output is listed several times as a graph output"
    return None


# ----------------------------------------------------------------------------- keys
def _input_key(node: gs.Node) -> tuple:
    return tuple("" if t.is_empty() else id(t) for t in node.inputs)


def _key(node: gs.Node) -> tuple:
    domain = "" if node.domain in ("", "ai.onnx", None) else node.domain
    outputs = tuple(t.is_empty() for t in node.outputs)
    attrs = tuple(sorted((k, _norm(v, exact=False)) for k, v in node.attrs.items()))
    return node.op, domain, _input_key(node), outputs, attrs


def _same_attrs(a: gs.Node, b: gs.Node) -> bool:
    """Exact attribute equality; the key only holds digests of tensor attributes."""
    if not any(_has_tensor(v) for v in a.attrs.values()):
        return True
    return all(_norm(a.attrs[k], exact=True) == _norm(b.attrs[k], exact=True) for k in a.attrs)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    return isinstance(value, (gs.Constant, np.ndarray))


def _norm(value: Any, exact: bool) -> tuple:
    """A hashable, type-tagged form of an attribute value that compares by value."""
    if isinstance(value, gs.Graph):
        raise _Unmergeable("subgraph")
    if isinstance(value, (gs.Constant, np.ndarray)):
        return _norm_tensor(value.values if isinstance(value, gs.Constant) else value, exact)
    if isinstance(value, (bool, np.bool_)):
        return ("b", bool(value))
    if isinstance(value, (float, np.floating)):
        return ("f", struct.pack("<d", float(value)))  # bit-exact: 0.0 and -0.0 differ
    if isinstance(value, (int, np.integer)):
        return ("i", int(value))
    if isinstance(value, (str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        return ("L", tuple(_norm(v, exact) for v in value))
    if isinstance(value, np.dtype):
        return ("dtype", str(value))
    if hasattr(value, "SerializeToString"):
        return (type(value).__name__, value.SerializeToString())
    try:
        hash(value)
    except TypeError:
        raise _Unmergeable(type(value).__name__) from None
    return (type(value).__name__, value)


def _norm_tensor(arr: np.ndarray, exact: bool) -> tuple:
    arr = np.asarray(arr)
    if arr.dtype == object or arr.dtype.kind in "USO":
        data = repr(arr.tolist()).encode()
    else:
        data = np.ascontiguousarray(arr).tobytes()
    if not exact:
        data = hashlib.blake2b(data, digest_size=16).digest()
    return ("T", str(arr.dtype), arr.shape, data)


# ----------------------------------------------------------------------------- order
def _topological_order(g: gs.Graph) -> Optional[list[gs.Node]]:
    """Nodes in a topological order that keeps the existing order when it is already valid.

    Nodes holding subgraphs depend on the outer tensors their subgraphs read. None on a cycle.
    """
    index = {id(n): i for i, n in enumerate(g.nodes)}
    if _is_sorted(g.nodes, index):
        return list(g.nodes)
    readers: list[list[int]] = [[] for _ in g.nodes]
    pending = [0] * len(g.nodes)
    for i, node in enumerate(g.nodes):
        producers = set()
        for t in _read_tensors(node):
            for p in t.inputs:
                j = index.get(id(p))
                if j is not None and j != i:
                    producers.add(j)
        pending[i] = len(producers)
        for j in producers:
            readers[j].append(i)
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order: list[gs.Node] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(g.nodes[i])
        for r in readers[i]:
            pending[r] -= 1
            if pending[r] == 0:
                heapq.heappush(ready, r)
    return order if len(order) == len(g.nodes) else None


def _is_sorted(nodes: list[gs.Node], index: dict[int, int]) -> bool:
    """Every in-graph producer comes before its readers (the usual case: no allocation-heavy sort)."""
    for i, node in enumerate(nodes):
        for t in _read_tensors(node):
            for p in t.inputs:
                if index.get(id(p), -1) >= i:
                    return False
    return True


def _read_tensors(node: gs.Node) -> list[gs.Tensor]:
    """Inputs plus every tensor read inside the node's subgraphs (outer-scope reads included)."""
    tensors = list(node.inputs)
    for value in node.attrs.values():
        items = value if isinstance(value, (list, tuple)) else [value]
        for sub in items:
            if isinstance(sub, gs.Graph):
                for inner in walk_graphs(sub):
                    tensors.extend(t for n in inner.nodes for t in n.inputs)
                    tensors.extend(inner.outputs)
    return tensors
