"""Merge identical constant tensors (same dtype, shape and bytes) into one.

Exporters often leave duplicates behind: tied embeddings written twice, the same shape constant
`[1, -1]` created once per Reshape, folding results that coincide. Candidates are initializers
and outputs of Constant nodes in the main graph and every subgraph. To stay fast and light on
big models, tensors are grouped by (dtype, shape) from metadata alone; only members of groups
with more than one tensor are loaded, hashed (blake2b) one at a time, and compared byte for byte
before any merge, so a hash collision can never merge different values.

Scoping: a duplicate is merged into a survivor defined in its own graph or an enclosing one
(ONNX scoping lets a subgraph read outer names, never the reverse). Graph inputs (overridable
initializers) are never touched; graph outputs are never merged away (they may survive).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxslim_opt.graph import constant_node_value, is_standard
from onnxslim_opt.pass_api import Pass, PassContext, PassResult


@dataclass
class _Scope:
    """A graph in the subgraph tree."""

    graph: gs.Graph
    parent: Optional["_Scope"]
    depth: int


@dataclass
class _Candidate:
    tensor: gs.Tensor
    scope: _Scope
    node: Optional[gs.Node]  # the Constant node producing `tensor`, or None for an initializer
    source: object  # gs.Constant (possibly lazy) or np.ndarray holding the value
    protected: bool  # a graph output: may survive, never merged away
    index: int


class DeduplicateInitializers(Pass):
    name = "deduplicate_initializers"
    description = "merge identical constant tensors (same dtype, shape, bytes) into one"
    stage = "simplify"
    order = 710
    transactional = True  # each merge redirects readers whole; a graph between merges is valid

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        candidates = _collect(graph)
        groups: dict[tuple, list[_Candidate]] = {}
        for cand in candidates:
            groups.setdefault(_meta(cand.source), []).append(cand)
        removed_nodes: dict[int, set[int]] = {}  # id(graph) -> ids of Constant nodes merged away
        hoist: dict[int, list[gs.Node]] = {}  # id(graph) -> surviving Constant nodes to move first
        saved = 0
        for group in groups.values():
            if len(group) < 2:
                continue
            # a cheap fingerprint of a few hundred bytes first: weights that merely share a
            # shape (every 3x3 conv of a stage) almost always differ there, so only real
            # duplicates pay for hashing every byte
            by_sample: dict[bytes, list[tuple[_Candidate, np.ndarray]]] = {}
            for cand in group:
                arr = _peek(cand.source)
                by_sample.setdefault(_sample(arr), []).append((cand, arr))
            for sampled in by_sample.values():
                if len(sampled) < 2:
                    continue
                by_digest: dict[bytes, list[_Candidate]] = {}
                for cand, arr in sampled:
                    by_digest.setdefault(_digest(arr), []).append(cand)
                for same in by_digest.values():
                    if len(same) > 1:
                        saved += _merge_group(same, removed_nodes, hoist, result)
        for scope in _scopes(graph):
            g = scope.graph
            gone = removed_nodes.get(id(g), set())
            first = hoist.get(id(g), [])
            if gone or first:
                firsts = {id(n) for n in first}
                g.nodes = first + [n for n in g.nodes if id(n) not in gone and id(n) not in firsts]
        result.changed = result.rewrites > 0
        if saved:
            result.details["bytes_saved"] = saved
            result.notes.append(f"merged {result.rewrites} duplicate constants ({saved} bytes)")
        return result


# ----------------------------------------------------------------------------- collecting
def _scopes(graph: gs.Graph, parent: Optional[_Scope] = None) -> list[_Scope]:
    """The graph and its subgraphs with their parents, outermost first."""
    scope = _Scope(graph, parent, 0 if parent is None else parent.depth + 1)
    found = [scope]
    for node in graph.nodes:
        for value in node.attrs.values():
            subs = value if isinstance(value, (list, tuple)) else [value]
            for sub in subs:
                if isinstance(sub, gs.Graph):
                    found.extend(_scopes(sub, scope))
    return found


def _collect(graph: gs.Graph) -> list[_Candidate]:
    """Initializers (homed at the common ancestor of the graphs reading them) and Constant-node outputs."""
    scopes = _scopes(graph)
    inputs: set[int] = set()
    outputs: set[int] = set()
    uses: dict[int, tuple[gs.Constant, list[_Scope]]] = {}
    const_nodes: list[tuple[gs.Node, _Scope]] = []
    for scope in scopes:
        g = scope.graph
        inputs.update(id(t) for t in g.inputs)
        outputs.update(id(t) for t in g.outputs)
        readers = [t for n in g.nodes for t in n.inputs] + list(g.outputs)
        for t in readers:
            if isinstance(t, gs.Constant):
                entry = uses.setdefault(id(t), (t, []))
                if not entry[1] or entry[1][-1] is not scope:
                    entry[1].append(scope)
        const_nodes.extend((n, scope) for n in g.nodes if n.op == "Constant" and is_standard(n))
    found: list[_Candidate] = []
    for t, scopes_using in uses.values():
        if id(t) in inputs or _is_sparse(t):
            continue
        found.append(_Candidate(t, _common_ancestor(scopes_using), None, t, id(t) in outputs, len(found)))
    for node, scope in const_nodes:
        if len(node.outputs) != 1 or node.outputs[0].is_empty() or id(node.outputs[0]) in inputs:
            continue
        source = node.attrs.get("value")
        if not isinstance(source, gs.Constant):
            source = constant_node_value(node)
        if source is None or _is_sparse(source):
            continue
        found.append(_Candidate(node.outputs[0], scope, node, source, id(node.outputs[0]) in outputs, len(found)))
    return found


def _common_ancestor(scopes: list[_Scope]) -> _Scope:
    result = scopes[0]
    for other in scopes[1:]:
        a, b = result, other
        while a.depth > b.depth:
            a = a.parent
        while b.depth > a.depth:
            b = b.parent
        while a is not b:
            a, b = a.parent, b.parent
        result = a
    return result


def _encloses(outer: _Scope, inner: _Scope) -> bool:
    scope: Optional[_Scope] = inner
    while scope is not None and scope.depth >= outer.depth:
        if scope is outer:
            return True
        scope = scope.parent
    return False


# ----------------------------------------------------------------------------- values
def _is_sparse(source: object) -> bool:
    values = getattr(source, "_values", None)
    return type(values).__name__ == "SparseValues"


def _meta(source: object) -> tuple:
    """(dtype, export dtype, shape) read without loading lazy weights."""
    if isinstance(source, gs.Constant):
        return str(source.dtype), str(source.export_dtype), tuple(source.shape)
    arr = np.asarray(source)
    return str(arr.dtype), str(arr.dtype), arr.shape


def _peek(source: object) -> np.ndarray:
    """The value, loading a lazy initializer without caching it (keeps memory at one weight)."""
    if isinstance(source, gs.Constant):
        values = source._values  # gs caches on `.values`; read the lazy loader directly
        return values.load() if isinstance(values, LazyValues) else np.asarray(values)
    return np.asarray(source)


def _raw(arr: np.ndarray) -> object:
    """A byte view of the array (strings: their text), for hashing and exact comparison."""
    if arr.dtype == object or arr.dtype.kind in "USO":
        return repr(arr.tolist()).encode()
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def _sample(arr: np.ndarray) -> bytes:
    """First, last and 256 evenly spread bytes: equal for equal arrays, cheap for big ones."""
    raw = _raw(arr)
    if isinstance(raw, bytes) or raw.size <= 1024:
        return bytes(raw)
    spread = raw[:: max(1, raw.size // 256)][:256]
    return bytes(raw[:256]) + bytes(raw[-256:]) + spread.tobytes()


def _digest(arr: np.ndarray) -> bytes:
    return hashlib.blake2b(_raw(arr), digest_size=16).digest()


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    ra, rb = _raw(a), _raw(b)
    if isinstance(ra, bytes) or isinstance(rb, bytes):
        return ra == rb
    return ra.shape == rb.shape and bool(np.array_equal(ra, rb))


# ----------------------------------------------------------------------------- merging
def _merge_group(same: list[_Candidate], removed_nodes: dict[int, set[int]], hoist: dict[int, list[gs.Node]],
                 result: PassResult) -> int:
    """Merge tensors with the same digest into survivors visible to them; returns bytes saved.

    Survivors are chosen outermost first, then graph outputs, then initializers over Constant nodes.
    """
    ordered = sorted(same, key=lambda c: (c.scope.depth, not c.protected, c.node is not None, c.index))
    survivors: list[tuple[_Candidate, np.ndarray]] = []
    saved = 0
    for cand in ordered:
        value = _peek(cand.source)
        target = None
        if not cand.protected:
            target = next((s for s, v in survivors if _encloses(s.scope, cand.scope) and _same_bytes(v, value)), None)
        if target is None:
            survivors.append((cand, value))
            continue
        _redirect(cand, target, removed_nodes, hoist)
        saved += int(value.nbytes)
        result.rewrites += 1
    return saved


def _redirect(victim: _Candidate, survivor: _Candidate, removed_nodes: dict[int, set[int]],
              hoist: dict[int, list[gs.Node]]) -> None:
    old, new = victim.tensor, survivor.tensor
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
    if victim.node is not None:
        victim.node.outputs.clear()
        removed_nodes.setdefault(id(victim.scope.graph), set()).add(id(victim.node))
    if survivor.node is not None:  # its readers may now precede it: a Constant node can always go first
        first = hoist.setdefault(id(survivor.scope.graph), [])
        if not any(n is survivor.node for n in first):
            first.append(survivor.node)
