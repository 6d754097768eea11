"""Replace the decomposed GELU exporters emit (Erf or Tanh form) with one Gelu node (opset >= 20).

torch exports below opset 20 spell GELU out as x * 0.5 * (1 + Erf(x / sqrt(2))) or, for
approximate="tanh", x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), in several
association orders. Matching walks from the Erf/Tanh node outwards; every intermediate tensor
must be private to the pattern, and constants must match within 1e-4 relative.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_opt.graph import Edit, NewNode, Node, constant_value, is_standard, single_consumer, sole_producer
from onnxslim_opt.pass_api import PassContext, RewritePass

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
KAPPA = 0.044715
_GELU_TYPES = ("float16", "float32", "float64", "bfloat16")


class _Match:
    """Nodes of a pattern found so far, with the input x."""

    def __init__(self, x: gs.Tensor):
        self.x = x
        self.nodes: list[Node] = []


def _close(tensor: gs.Tensor, target: float, x: gs.Tensor) -> bool:
    """`tensor` is a constant scalar within 1e-4 relative of `target` (fp16-rounding tolerant)
    that does not broadcast x to a higher rank."""
    value = constant_value(tensor)
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return False
    if value.ndim and (x.shape is None or len(x.shape) < value.ndim):
        return False
    tol = max(1e-4, float(np.finfo(value.dtype).eps))
    return abs(float(value.reshape(())) - target) <= tol * abs(target)


def _producer(graph: gs.Graph, tensor: gs.Tensor, op: str) -> Optional[Node]:
    """The standard `op` node producing `tensor`, if `tensor` is read only by one node."""
    node = sole_producer(tensor)
    if node is None or node.op != op or not is_standard(node) or single_consumer(graph, tensor) is None:
        return None
    return node


def _next(graph: gs.Graph, node: Node, op: str) -> Optional[tuple[Node, gs.Tensor]]:
    """(consumer, its other input) when the only reader of `node`'s output is a binary `op`."""
    out = node.outputs[0]
    user = single_consumer(graph, out)
    if user is None or user.op != op or not is_standard(user) or len(user.inputs) != 2:
        return None
    a, b = user.inputs
    if a is out and b is out:
        return None
    return user, (b if a is out else a)


def _match_outer(graph: gs.Graph, one_plus: Node, m: _Match) -> Optional[Node]:
    """Match the product of x, 0.5 and t = (1 + erf|tanh) in any association; returns the last Mul."""
    step = _next(graph, one_plus, "Mul")
    if step is None:
        return None
    mul1, other = step
    if _close(other, 0.5, m.x) or other is m.x:  # (t * 0.5) * x  or  (t * x) * 0.5
        step2 = _next(graph, mul1, "Mul")
        if step2 is None:
            return None
        mul2, last = step2
        ok = (last is m.x) if other is not m.x else _close(last, 0.5, m.x)
        if not ok:
            return None
        m.nodes += [mul1, mul2]
        return mul2
    half = _producer(graph, other, "Mul")  # (x * 0.5) * t
    if half is None or len(half.inputs) != 2:
        return None
    a, b = half.inputs
    if not ((a is m.x and _close(b, 0.5, m.x)) or (b is m.x and _close(a, 0.5, m.x))):
        return None
    m.nodes += [half, mul1]
    return mul1


def _match_one_plus(graph: gs.Graph, core: Node, m: _Match) -> Optional[Node]:
    step = _next(graph, core, "Add")
    if step is None or not _close(step[1], 1.0, m.x):
        return None
    m.nodes.append(step[0])
    return step[0]


def _match_erf_input(graph: gs.Graph, erf: Node) -> Optional[_Match]:
    """Erf input is x / sqrt(2) or x * (1 / sqrt(2))."""
    scaled = erf.inputs[0]
    div = _producer(graph, scaled, "Div")
    if div is not None and _close(div.inputs[1], SQRT2, div.inputs[0]):
        m = _Match(div.inputs[0])
        m.nodes.append(div)
        return m
    mul = _producer(graph, scaled, "Mul")
    if mul is None:
        return None
    for x, c in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        if _close(c, 1.0 / SQRT2, x):
            m = _Match(x)
            m.nodes.append(mul)
            return m
    return None


def _split_const(node: Node, target: float) -> Optional[gs.Tensor]:
    """The non-constant input of a binary node whose other input is close to `target`."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if _close(b, target, a):
        return a
    if _close(a, target, b):
        return b
    return None


def _is_cube(graph: gs.Graph, tensor: gs.Tensor, x: gs.Tensor, nodes: list[Node]) -> bool:
    """`tensor` is Pow(x, 3), Mul(x, Mul(x, x)) or Mul(Mul(x, x), x)."""
    pow_node = _producer(graph, tensor, "Pow")
    if pow_node is not None:
        exponent = constant_value(pow_node.inputs[1])
        if pow_node.inputs[0] is x and exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 3:
            nodes.append(pow_node)
            return True
        return False
    mul = _producer(graph, tensor, "Mul")
    if mul is None:
        return False
    a, b = mul.inputs
    square = b if a is x else a if b is x else None
    sq = _producer(graph, square, "Mul") if square is not None else None
    if sq is None or sq.inputs[0] is not x or sq.inputs[1] is not x:
        return False
    nodes += [mul, sq]
    return True


def _match_tanh_input(graph: gs.Graph, tanh: Node) -> Optional[_Match]:
    """Tanh input is sqrt(2/pi) * (x + 0.044715 * x^3), sums and products in any order."""
    scale = _producer(graph, tanh.inputs[0], "Mul")
    inner = _split_const(scale, SQRT_2_OVER_PI) if scale is not None else None
    add = _producer(graph, inner, "Add") if inner is not None else None
    if add is None or len(add.inputs) != 2:
        return None
    for x, k in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        kappa = _producer(graph, k, "Mul")
        cube = _split_const(kappa, KAPPA) if kappa is not None else None
        nodes: list[Node] = []
        if cube is not None and _is_cube(graph, cube, x, nodes):
            m = _Match(x)
            m.nodes += [scale, add, kappa] + nodes
            return m
    return None


class FuseGelu(RewritePass):
    name = "fuse_gelu"
    description = "replace a decomposed erf/tanh GELU with one Gelu node (opset >= 20)"
    stage = "simplify"
    order = 620
    anchors = ("Erf", "Tanh")

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        m = _match_erf_input(graph, node) if node.op == "Erf" else _match_tanh_input(graph, node)
        if m is None:
            return None
        m.nodes.append(node)
        one_plus = _match_one_plus(graph, node, m)
        last = _match_outer(graph, one_plus, m) if one_plus is not None else None
        if last is None:
            return None
        if ctx.opset < 20:
            return f"GELU pattern found but Gelu needs opset >= 20 (model has {ctx.opset})"
        dtype = m.x.dtype if m.x.dtype is not None else last.outputs[0].dtype
        if dtype is None or getattr(dtype, "name", str(dtype)) not in _GELU_TYPES:
            return f"element type {dtype} is not supported by Gelu"
        attrs = {"approximate": "tanh"} if node.op == "Tanh" else {}
        return Edit(add=[NewNode("Gelu", [m.x], list(last.outputs), attrs, name=last.name)], remove=m.nodes)
