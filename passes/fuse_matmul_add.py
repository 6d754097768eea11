"""MatMul(A, B) followed by Add(bias) becomes one Gemm(A, B, bias).

Gemm only covers the 2-D case with a bias that broadcasts *into* (M, N), so the rewrite is
restricted to rank-2 operands and biases of shape [], [N], [1, N], [M, 1], [M, N] (or 1s);
anything else would change the result shape or need extra Reshape nodes.

One N-D case pays for its Reshapes: MatMul(A, W) + Add(bias), W a constant [K, N], bias [N], [1, N]
or a scalar, where A = Reshape(X) is read only by the MatMul. A matrix product on the last axis
does not care how the leading axes are grouped, so the result is Reshape(Gemm(X2, W, bias), S)
with X2 = X when X is [M, K] (the Reshape of A disappears: one node fewer) and X2 = Reshape(X,
[-1, K]) otherwise (as many nodes as before, so only done when the Add feeds a shape-only op the
new Reshape merges into; merge_reshapes then saves the node). S is the static output shape, or A's
Reshape target with its last entry replaced by N. A plain N-D MatMul (not fed by such a Reshape)
is declined (Reshape-Gemm-Reshape would add a node) unless its Reshape to [-1, K] is shared: when
X already has a reader Reshape(X, [-1, K]), or another MatMul with a constant [K, N'] weight and a
bias Add reads X too, the flat Reshape is paid once for all of them (attention's Q/K/V projections
of one LayerNorm output: three MatMul+Add+Reshape become one Reshape plus three Gemm+Reshape, the
last Reshapes merging with the head split). Also only when each Add feeds a shape op to merge with.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import (Edit, NewNode, Node, constant_value, fresh_name, is_standard, make_constant,
                                single_consumer, sole_producer, static_shape, tensor_shape,
                                walk_graphs)
from onnxslim_opt.pass_api import PassContext, PassResult, RewritePass
from onnxslim_opt.shape_inference import ensure_shapes

_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_INTS = {np.dtype(t) for t in (np.int32, np.int64, np.uint32, np.uint64)}


def _dtype_problem(dtype, opset: int) -> Optional[str]:
    """Why Gemm cannot take this element type here, or None."""
    if dtype is None:
        return "element type unknown"
    name = getattr(dtype, "name", str(dtype))
    if name == "bfloat16":
        return None if opset >= 13 else f"bfloat16 Gemm needs opset >= 13 (model has {opset})"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return f"element type {dtype} is not supported by Gemm"
    if dt in _FLOATS:
        return None
    if dt in _INTS:
        # valid ONNX from opset 9, but ONNX Runtime has no integer Gemm kernel: the model would not run
        return f"integer ({dt}) Gemm has no ONNX Runtime kernel"
    return f"element type {dt} is not supported by Gemm"


def _dim_fits(bias_dim, target) -> bool:
    """A bias dimension broadcasts into `target` without enlarging it."""
    if bias_dim == 1:
        return True
    if isinstance(bias_dim, int) and isinstance(target, int):
        return bias_dim == target
    return isinstance(bias_dim, str) and bias_dim != "" and bias_dim == target


def _bias_problem(bias_shape: Optional[Sequence], m, n) -> Optional[str]:
    """Why `bias` is not a Gemm C for an (M, N) product, or None."""
    if bias_shape is None:
        return "bias shape unknown"
    if len(bias_shape) > 2:
        return f"bias of rank {len(bias_shape)} would broadcast the result beyond 2-D"
    for bias_dim, target in zip(reversed(list(bias_shape)), (n, m)):
        if not _dim_fits(bias_dim, target):
            return f"bias shape {list(bias_shape)} does not broadcast unidirectionally to {[m, n]}"
    return None


def _output_target(reshape: Node, out: gs.Tensor, n: int) -> Optional[list[int]]:
    """A constant target giving the MatMul's output shape from a [M, N] product, or None."""
    static = static_shape(out)
    if static is not None:
        return static
    target = constant_value(reshape.inputs[1]) if len(reshape.inputs) > 1 else None
    if target is None:
        return None
    lead = [int(v) for v in np.asarray(target).reshape(-1)][:-1]
    if 0 in lead or lead.count(-1) > 1:
        return None
    return lead + [n]


def _merges_after(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """The tensor's only reader is a shape-only op a Reshape producing `tensor` would merge into."""
    reader = single_consumer(graph, tensor)
    if reader is None or not is_standard(reader) or not reader.inputs or reader.inputs[0] is not tensor:
        return False
    if reader.op == "Reshape":
        return len(reader.inputs) > 1 and constant_value(reader.inputs[1]) is not None
    return reader.op in ("Squeeze", "Unsqueeze", "Flatten") and static_shape(reader.outputs[0]) is not None


def _row_bias_ok(bias: gs.Tensor, n: int) -> bool:
    shape = tensor_shape(bias)
    return shape is not None and tuple(shape) in ((), (1,), (n,), (1, 1), (1, n))


def _lead_target(shape: Sequence, n: int) -> Optional[list[int]]:
    """Reshape target of an N-D product from its input's leading dims (one symbolic dim becomes -1)."""
    lead = [int(d) if isinstance(d, (int, np.integer)) else -1 for d in shape[:-1]]
    if 0 in lead or lead.count(-1) > 1 or any(d < -1 for d in lead):
        return None
    return lead + [n]


def _flat_reader(graph: gs.Graph, a: gs.Tensor, k: int) -> Optional[gs.Tensor]:
    """The output of an existing Reshape(a, [-1, K]) in this graph: a Gemm can read it directly."""
    ids = {id(n) for n in graph.nodes}
    for r in a.outputs:
        if id(r) not in ids or r.op != "Reshape" or not is_standard(r) or len(r.inputs) < 2 or r.inputs[0] is not a:
            continue
        target = constant_value(r.inputs[1])
        if target is not None and target.ndim == 1 and target.size == 2 and [int(v) for v in target] == [-1, k]:
            return r.outputs[0]
    return None


def _bias_add(graph: gs.Graph, matmul: Node) -> Optional[tuple[Node, gs.Tensor]]:
    """(Add, bias) when the MatMul's only reader is a two-input bias Add."""
    out = matmul.outputs[0]
    add = single_consumer(graph, out)
    if add is None or add.op != "Add" or not is_standard(add) or len(add.inputs) != 2:
        return None
    if add.inputs[0] is out and add.inputs[1] is out:
        return None
    return add, add.inputs[1] if add.inputs[0] is out else add.inputs[0]


def _has_twin(graph: gs.Graph, node: Node, a: gs.Tensor, k: int) -> bool:
    """Another MatMul(a, constant [K, N']) + bias Add feeding a shape op: it would share Reshape(a, [-1, K])."""
    ids = {id(n) for n in graph.nodes}
    for other in a.outputs:
        if other is node or id(other) not in ids or other.op != "MatMul" or not is_standard(other) \
                or other.inputs[0] is not a or other.inputs[1] is a:
            continue
        w = constant_value(other.inputs[1])
        found = _bias_add(graph, other)
        if w is None or w.ndim != 2 or w.shape[0] != k or w.shape[1] == 0 or found is None:
            continue
        if _row_bias_ok(found[1], int(w.shape[1])) and _merges_after(graph, found[0].outputs[0]):
            return True
    return False


def _plan_nd(node: Node, add: Node, bias: gs.Tensor, graph: gs.Graph) -> Edit | str:
    """N-D MatMul(A, W) + bias as Reshape(Gemm(A2, W, bias)); see the module docstring."""
    a, b = node.inputs
    rank = len(tensor_shape(a))
    plain = f"MatMul of ranks {rank}x2: Gemm is 2-D only (a Reshape-Gemm-Reshape would add nodes)"
    w = constant_value(b)
    if w is None:
        return plain + "; the weight is not a constant"
    k, n = (int(d) for d in w.shape)
    if k == 0 or n == 0:
        return "empty weight"
    if not _row_bias_ok(bias, n):
        return f"bias shape {tensor_shape(bias)} is not [N], [1, N] or a scalar"
    merges = _merges_after(graph, add.outputs[0])
    reshape = sole_producer(a)
    if reshape is not None and reshape.op == "Reshape" and is_standard(reshape) and len(reshape.inputs) > 1 \
            and single_consumer(graph, a) is node:
        target = _output_target(reshape, node.outputs[0], n)
        if target is None:
            return "MatMul output shape unknown and its input Reshape target cannot give it"
        x = reshape.inputs[0]
        direct = x.shape is not None and len(x.shape) == 2 and isinstance(x.shape[1], (int, np.integer)) \
            and x.shape[1] == k
        if not direct and not merges:
            return plain + "; its input is not [M, K] and the result feeds no shape op to merge with"
        return _gemm_edit(graph, node, add, b, bias, x, None if direct else k, target)
    if not merges:
        why = "its input Reshape has other readers" if reshape is not None and reshape.op == "Reshape" \
            else "the result feeds no shape op to merge with"
        return f"{plain}; {why}"
    target = static_shape(node.outputs[0]) or _lead_target(tensor_shape(a), n)
    if target is None:
        return "MatMul output shape unknown"
    flat = _flat_reader(graph, a, k)
    if flat is not None:
        return _gemm_edit(graph, node, add, b, bias, flat, None, target)
    if not _has_twin(graph, node, a, k):
        return plain + "; no other MatMul shares its Reshape to [-1, K]"
    return _gemm_edit(graph, node, add, b, bias, a, k, target)


def _gemm_edit(graph: gs.Graph, node: Node, add: Node, b: gs.Tensor, bias: gs.Tensor, x: gs.Tensor,
               flatten_k: Optional[int], target: list[int]) -> Edit:
    """MatMul and Add become [Reshape(x, [-1, K])], Gemm, Reshape (an input Reshape left unread goes to DCE)."""
    a = node.inputs[0]
    edit = Edit(remove=[node, add])
    base = f"{node.name}_flat"
    if flatten_k is not None:
        flat = gs.Variable(fresh_name(graph, f"{base}_2d"), dtype=a.dtype)
        flat_target = make_constant(graph, f"{base}_2d_shape", np.array([-1, flatten_k], dtype=np.int64))
        edit.add.append(NewNode("Reshape", [x, flat_target], [flat], name=fresh_name(graph, base)))
        x = flat
    product = gs.Variable(fresh_name(graph, f"{add.name}_gemm"), dtype=add.outputs[0].dtype)
    out_target = make_constant(graph, f"{add.name}_shape", np.array(target, dtype=np.int64))
    edit.add += [NewNode("Gemm", [x, b, bias], [product], name=fresh_name(graph, f"{node.name}_Gemm")),
                 NewNode("Reshape", [product, out_target], list(add.outputs), name=add.name)]
    return edit


class FuseMatMulAdd(RewritePass):
    name = "fuse_matmul_add"
    description = "fuse a 2-D MatMul (or one fed by a Reshape) followed by a bias Add into one Gemm"
    stage = "simplify"
    order = 600
    anchors = ("MatMul",)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if any(n.op == "MatMul" and is_standard(n) for g in walk_graphs(graph) for n in g.nodes):
            ensure_shapes(graph, ctx)  # ranks decide the rewrite; fills shapes in place, never restructures
        return super().run(graph, ctx)

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        out = node.outputs[0]
        add = single_consumer(graph, out)
        if add is None:
            return None if not out.outputs else "MatMul output has other consumers or is a graph output"
        if add.op != "Add" or not is_standard(add) or len(add.inputs) != 2:
            return None
        if add.inputs[0] is out and add.inputs[1] is out:
            return "Add adds the MatMul output to itself"
        bias = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        a, b = node.inputs
        a_shape, b_shape = tensor_shape(a), tensor_shape(b)
        if a_shape is None or b_shape is None:
            return "MatMul operand rank unknown"
        if len(b_shape) != 2 or len(a_shape) < 2:
            return (f"MatMul of ranks {len(a_shape)}x{len(b_shape)}: Gemm is 2-D only "
                    f"(a Reshape-Gemm-Reshape would add nodes)")
        problem = _dtype_problem(a.dtype if a.dtype is not None else out.dtype, ctx.opset)
        if problem:
            return problem
        if len(a_shape) > 2:
            if ctx.opset < 7:
                return "Gemm with a broadcast bias and Reshape-by-input need opset >= 7"
            return _plan_nd(node, add, bias, graph)
        problem = _bias_problem(tensor_shape(bias), a_shape[0], b_shape[1])
        if problem:
            return problem
        return Edit(add=[NewNode("Gemm", [a, b, bias], list(add.outputs), name=add.name)], remove=[node, add])
