"""Weight compression for size (lossy): int8/int4 weight-only and k-means weight sharing.

Only the weight input (input 1) of Conv/ConvTranspose/Gemm/MatMul is compressed, and only when
every reader of that weight is such a weight input (never biases, shape computations or other
uses). The weight is rebuilt in float at run time, so activations and computation stay float:
- int8: int8 initializer + per-output-channel symmetric scales + DequantizeLinear (opset >= 13;
  per-tensor scales at opset 10-12; Cast+Mul below opset 10, where DequantizeLinear is missing).
- kmeans:K: uint8 indices + float32 codebook [K], rebuilt by Gather(codebook, Cast(indices, int32))
  (Gather takes int32/int64 indices only: casting at run time keeps 1 byte per weight in the file).
- int4 (MatMul/Gemm): symmetric block-wise along K, as an opset-21 int4 DequantizeLinear with
  `block_size`, or ONNX Runtime's com.microsoft MatMulNBits with `--int4-format matmulnbits`.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from typing import Any, Optional

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxslim_opt.errors import OptimizeError
from onnxslim_opt.graph import (Edit, NewNode, attr, constant_value, fresh_name, is_graph_output, is_standard,
                                make_constant, optional_input, sole_producer, walk_graphs)
from onnxslim_opt.pass_api import Pass, PassContext, PassResult

from ._compress_codecs import (dequantize_blocked, dequantize_int8, kmeans_1d, pack_matmulnbits, quantize_blocked,
                               quantize_int8, rel_l2)

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INT4_OPS = ("Gemm", "MatMul")


@dataclass(frozen=True)
class Options:
    mode: str = "int8"  # int8 | int4 | kmeans:K
    block_size: int = 32
    #: weights smaller than this many bytes stay float (scales/codebooks would not pay off)
    min_size: int = 4096
    int4_format: str = "dq"  # dq (opset >= 21) | matmulnbits (com.microsoft, ONNX Runtime)
    seed: int = 0


def parse_mode(text: str) -> tuple[str, int]:
    """("int8"|"int4"|"kmeans", K) from a --compress-weights value; OptimizeError when malformed."""
    t = str(text).strip().lower()
    if t in ("int8", "int4"):
        return t, 0
    if t.startswith("kmeans:"):
        try:
            k = int(t.split(":", 1)[1])
        except ValueError:
            k = 0
        if 2 <= k <= 256 and k & (k - 1) == 0:
            return "kmeans", k
        raise OptimizeError(f"--compress-weights {text}: K must be a power of two between 2 and 256 (uint8 indices)")
    raise OptimizeError(f"--compress-weights {text}: expected int8, int4 or kmeans:K")


class CompressWeights(Pass):
    name = "compress_weights"
    description = "weight-only compression for size (int8, int4 block-wise, k-means:K palettes); lossy"
    lossless = False
    stage = "transform"
    order = 50
    default = False
    Options = Options
    transactional = True  # everything is planned first, then applied as whole Edits

    def __init__(self, options: Optional[Options] = None):
        super().__init__(options)
        o = self.options
        self.kind, self.k = parse_mode(o.mode)
        if o.int4_format not in ("dq", "matmulnbits"):
            raise OptimizeError(f"--int4-format {o.int4_format}: expected dq or matmulnbits")
        if o.block_size < 2 or (o.int4_format == "matmulnbits" and (o.block_size < 16 or o.block_size & (o.block_size - 1))):
            raise OptimizeError(f"--block-size {o.block_size}: must be >= 2 (a power of two >= 16 for matmulnbits)")
        if o.min_size < 0:
            raise OptimizeError("--compress-min-size must be >= 0")

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--compress-weights", metavar="MODE",
                           help="compress weights for size: int8, int4 (MatMul/Gemm, block-wise) or kmeans:K "
                                "(K a power of two <= 256); lossy, computation stays float")
        group.add_argument("--block-size", type=int, default=32, metavar="N", help="int4 block size along K (default 32)")
        group.add_argument("--compress-min-size", type=int, default=4096, metavar="BYTES",
                           help="leave weights smaller than BYTES in float (default 4096 = 1024 float32)")
        group.add_argument("--int4-format", choices=("dq", "matmulnbits"), default="dq",
                           help="int4 as DequantizeLinear (opset >= 21) or com.microsoft MatMulNBits (ONNX Runtime)")

    @classmethod
    def from_arguments(cls, args: Any) -> Optional["CompressWeights"]:
        mode = getattr(args, "compress_weights", None)
        if mode is None:
            return None
        return cls(Options(mode=mode, block_size=args.block_size, min_size=args.compress_min_size,
                           int4_format=args.int4_format, seed=getattr(args, "seed", 0) or 0))

    def applicable(self, graph: gs.Graph, ctx: PassContext) -> bool:
        """Also where opset requirements are refused: raised here, outside the manager's rollback,
        so the user gets the error instead of a silently uncompressed model."""
        if self.kind == "int4" and self.options.int4_format == "dq" and ctx.opset < 21:
            raise OptimizeError(f"--compress-weights int4 stores int4 DequantizeLinear, which needs opset >= 21; "
                                f"this model has opset {ctx.opset}: re-export it at opset 21, or pass "
                                f"--int4-format matmulnbits (com.microsoft MatMulNBits, ONNX Runtime only)")
        return True

    # ------------------------------------------------------------------ planning
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        planned: list[tuple[gs.Graph, Edit]] = []
        layers: dict[str, dict] = {}
        for g in list(walk_graphs(graph)):
            members = {id(n) for n in g.nodes}
            seen: set[int] = set()
            for node in list(g.nodes):
                if node.op not in WEIGHT_OPS or not is_standard(node) or optional_input(node, 1) is None:
                    continue
                weight = node.inputs[1]
                if id(weight) in seen:
                    continue
                seen.add(id(weight))
                try:
                    outcome = self._plan(weight, g, members, ctx)
                except Exception as exc:  # an unexpected model: decline, never half-edit
                    outcome = f"planning failed: {type(exc).__name__}: {exc}"
                if isinstance(outcome, str):
                    result.reject(node, outcome)
                elif outcome is not None:
                    edit, layer = outcome
                    planned.append((g, edit))
                    layers[weight.name] = layer
        for g, edit in planned:
            edit.apply(g)
        result.rewrites = len(planned)
        result.changed = bool(planned)
        result.details = {"mode": self.options.mode, "layers": layers}
        if layers:
            result.notes.append(self._summary(layers, ctx))
        return result

    def _summary(self, layers: dict[str, dict], ctx: PassContext) -> str:
        before = sum(v["bytes_before"] for v in layers.values())
        after = sum(v["bytes_after"] for v in layers.values())
        gz_before = sum(v["gzip_before"] for v in layers.values())
        gz_after = sum(v["gzip_after"] for v in layers.values())
        worst = max(layers.items(), key=lambda kv: kv[1]["rel_l2"])
        forms = sorted({v["form"] for v in layers.values()})
        return (f"compress_weights {self.options.mode}: {len(layers)} weights, {before} -> {after} bytes "
                f"({before / max(after, 1):.2f}x), gzipped {gz_before} -> {gz_after} ({gz_before / max(gz_after, 1):.2f}x); "
                f"worst relative L2 error {worst[1]['rel_l2']:.4f} ({worst[0]}); form: {'; '.join(forms)} (opset {ctx.opset})")

    def _plan(self, weight: gs.Tensor, g: gs.Graph, members: set[int], ctx: PassContext):
        """(Edit, layer details), a reason string, or None (the input is not a constant)."""
        value = constant_value(weight)
        if value is None:
            return None
        if value.dtype != np.float32:
            return f"only float32 weights are compressed (this one is {value.dtype})"
        if value.nbytes < self.options.min_size:
            return f"weight smaller than --compress-min-size ({self.options.min_size} bytes)"
        if is_graph_output(g, weight):
            return "weight is also a graph output"
        readers = list(weight.outputs)
        for r in readers:
            if id(r) not in members:
                return "weight is also read in another graph scope"
            slots = [i for i, t in enumerate(r.inputs) if t is weight]
            if r.op not in WEIGHT_OPS or not is_standard(r) or slots != [1]:
                return f"weight also feeds {r.op} {r.name!r} other than as its weight input"
        remove = []
        if isinstance(weight, gs.Variable):
            producer = sole_producer(weight)
            if producer is None or not any(producer is n for n in g.nodes):
                return "weight comes from a Constant node of an outer graph"
            remove = [producer]
        if self.kind == "int8":
            edit, layer = self._int8(weight, value, readers, g, ctx)
        elif self.kind == "kmeans":
            edit, layer = self._kmeans(weight, value, g)
        else:
            planned = self._int4(weight, value, readers, g)
            if isinstance(planned, str):
                return planned
            edit, layer = planned
        edit.remove = list(edit.remove) + remove
        layer["consumers"] = [r.name for r in readers]
        layer["bytes_before"] = int(value.nbytes)
        layer["gzip_before"] = len(gzip.compress(value.tobytes(), mtime=0))
        return edit, layer

    # ------------------------------------------------------------------ modes
    def _int8(self, weight, value, readers, g, ctx):
        axis = _channel_axis(readers[0], value.ndim)
        out = gs.Variable(fresh_name(g, weight.name + "_dequantized"), np.float32, list(value.shape))
        if ctx.opset >= 10:
            axis = axis if ctx.opset >= 13 else None
            q, scale = quantize_int8(value, axis)
            qc = make_constant(g, weight.name + "_int8", q)
            sc = make_constant(g, weight.name + "_scale", scale)
            attrs = {"axis": axis} if axis is not None else {}
            nodes = [NewNode("DequantizeLinear", [qc, sc], [out], attrs, name=fresh_name(g, weight.name + "_DequantizeLinear"))]
            form = (f"DequantizeLinear per-channel axis {axis}" if axis is not None
                    else "DequantizeLinear per-tensor (per-channel needs opset >= 13)")
        else:  # no DequantizeLinear before opset 10: the same arithmetic as Cast + Mul
            q, scale = quantize_int8(value, axis)
            shape = [1] * value.ndim
            shape[axis] = -1
            qc = make_constant(g, weight.name + "_int8", q)
            sc = make_constant(g, weight.name + "_scale", scale.reshape(shape))
            cast = gs.Variable(fresh_name(g, weight.name + "_float"), np.float32, list(value.shape))
            nodes = [NewNode("Cast", [qc], [cast], {"to": onnx.TensorProto.FLOAT}, name=fresh_name(g, weight.name + "_Cast")),
                     NewNode("Mul", [cast, sc], [out], name=fresh_name(g, weight.name + "_Mul"))]
            form = f"Cast+Mul per-channel axis {axis} (DequantizeLinear needs opset >= 10)"
        approx = dequantize_int8(q, scale, axis)
        after = q.nbytes + scale.nbytes
        layer = {"mode": "int8", "bits": 8, "form": form, "rel_l2": rel_l2(value, approx), "bytes_after": int(after),
                 "gzip_after": _gz(q, scale)}
        return Edit(add=nodes, replace=[(weight, out)]), layer

    def _kmeans(self, weight, value, g):
        codebook, idx = kmeans_1d(value, self.k, seed=self.options.seed)
        cb = make_constant(g, weight.name + "_codebook", codebook)
        ic = make_constant(g, weight.name + "_indices", idx)
        i32 = gs.Variable(fresh_name(g, weight.name + "_indices_int32"), np.int32, list(value.shape))
        out = gs.Variable(fresh_name(g, weight.name + "_palettized"), np.float32, list(value.shape))
        nodes = [NewNode("Cast", [ic], [i32], {"to": onnx.TensorProto.INT32}, name=fresh_name(g, weight.name + "_Cast")),
                 NewNode("Gather", [cb, i32], [out], {"axis": 0}, name=fresh_name(g, weight.name + "_Gather"))]
        bits = int(np.log2(self.k))
        layer = {"mode": f"kmeans:{self.k}", "bits": bits, "form": "Gather(codebook, Cast(uint8 indices, int32))",
                 "rel_l2": rel_l2(value, codebook[idx]), "bytes_after": int(idx.nbytes + codebook.nbytes),
                 "gzip_after": _gz(idx, codebook)}
        return Edit(add=nodes, replace=[(weight, out)]), layer

    def _int4(self, weight, value, readers, g):
        if value.ndim != 2:
            return "int4 compresses 2-D MatMul/Gemm weights only"
        kaxes = set()
        for r in readers:
            if r.op not in INT4_OPS:
                return f"int4 compresses MatMul/Gemm weights only (read by {r.op})"
            kaxes.add(1 if r.op == "Gemm" and attr(r, "transB", 0) else 0)
        if len(kaxes) != 1:
            return "weight read both transposed and not by Gemm nodes"
        kaxis = kaxes.pop()
        block = self.options.block_size
        q, scale = quantize_blocked(value, kaxis, block)
        approx = dequantize_blocked(q, scale, kaxis, block)
        layer = {"mode": "int4", "bits": 4, "rel_l2": rel_l2(value, approx), "block_size": block}
        if self.options.int4_format == "matmulnbits":
            return self._matmulnbits(weight, value, readers, g, q, scale, kaxis, layer)
        q4 = numpy_helper.from_array(q.astype(ml_dtypes.int4), fresh_name(g, weight.name + "_int4"))
        qc = gs.Constant(q4.name, LazyValues(q4))
        sc = make_constant(g, weight.name + "_scale", scale)
        out = gs.Variable(fresh_name(g, weight.name + "_dequantized"), np.float32, list(value.shape))
        node = NewNode("DequantizeLinear", [qc, sc], [out], {"axis": kaxis, "block_size": block},
                       name=fresh_name(g, weight.name + "_DequantizeLinear"))
        packed = len(q4.raw_data)
        layer.update(form=f"int4 DequantizeLinear block_size {block} axis {kaxis} (opset >= 21)",
                     bytes_after=int(packed + scale.nbytes),
                     gzip_after=len(gzip.compress(q4.raw_data + scale.tobytes(), mtime=0)))
        return Edit(add=[node], replace=[(weight, out)]), layer

    def _matmulnbits(self, weight, value, readers, g, q, scale, kaxis, layer):
        block = self.options.block_size
        q_kn, scale_bn = (q, scale) if kaxis == 0 else (q.T, scale.T)
        k, n = q_kn.shape
        for r in readers:
            if r.op == "Gemm" and (attr(r, "transA", 0) or attr(r, "alpha", 1.0) != 1.0
                                   or (optional_input(r, 2) is not None and attr(r, "beta", 1.0) != 1.0)):
                return "MatMulNBits replaces Gemm only with transA=0, alpha=1 and beta=1"
            a_shape = r.inputs[0].shape
            if a_shape is not None and len(a_shape) < 2:
                return "MatMulNBits needs an input A of rank >= 2"
        packed, scales = pack_matmulnbits(q_kn, scale_bn, block)
        bc = make_constant(g, weight.name + "_nbits", packed)
        sc = make_constant(g, weight.name + "_scales", scales)
        nodes = []
        for r in readers:
            y = r.outputs[0]
            bias = optional_input(r, 2) if r.op == "Gemm" else None
            mm_out = y if bias is None else gs.Variable(fresh_name(g, y.name + "_matmul"), np.float32, None)
            nodes.append(NewNode("MatMulNBits", [r.inputs[0], bc, sc], [mm_out],
                                 {"K": k, "N": n, "bits": 4, "block_size": block},
                                 name=fresh_name(g, r.name + "_MatMulNBits"), domain="com.microsoft"))
            if bias is not None:
                nodes.append(NewNode("Add", [mm_out, bias], [y], name=fresh_name(g, r.name + "_bias")))
        layer.update(form=f"com.microsoft MatMulNBits bits 4 block_size {block} (ONNX Runtime only)",
                     bytes_after=int(packed.nbytes + scales.nbytes), gzip_after=_gz(packed, scales))
        return Edit(add=nodes, remove=list(readers)), layer


def _channel_axis(reader: gs.Node, ndim: int) -> int:
    """The output-channel axis of a weight, for per-channel scales."""
    if ndim <= 1:
        return 0
    if reader.op == "Conv":
        return 0  # [M, C/group, k...]
    if reader.op == "ConvTranspose":
        return 1  # [C, M/group, k...]
    if reader.op == "Gemm":
        return 0 if attr(reader, "transB", 0) else 1  # B is [N, K] when transposed, else [K, N]
    return ndim - 1  # MatMul B [..., K, N]


def _gz(*arrays: np.ndarray) -> int:
    return len(gzip.compress(b"".join(a.tobytes() for a in arrays), mtime=0))
