"""Benchmark compress_weights: size (raw and gzipped), fidelity, digits accuracy and ORT CPU latency.

    python benchmarks/bench_compress.py [extra.onnx ...] [--runs 200]

Each model is first optimized losslessly (the baseline: what `optimize` writes without
compression); each mode then runs the same pipeline plus compress_weights. Ratios are
baseline / compressed for sizes and compressed / baseline for latency (ORT CPU, default graph
optimizations as users get them, 1 thread, runs interleaved, medians). A synthetic MatMul MLP
at opset 21 (random weights) stands in for a transformer block, so int4 DequantizeLinear applies.
"""
from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxslim_opt.api import OptimizeOptions, run  # noqa: E402
from onnxslim_opt.errors import OptimizeError  # noqa: E402
from passes.compress_weights import CompressWeights, Options  # noqa: E402

SHIPPED = ["digits_cnn.onnx", "digits_cnn_dynamo.onnx", "paddle_style_mlp.onnx", "tf_style_nhwc.onnx",
           "old_ir_initializers_as_inputs.onnx"]
MODES = ["int8", "kmeans:16", "kmeans:256", "int4"]


def synthetic_mlp(path: Path, width: int = 256, hidden: int = 1024, layers: int = 3) -> Path:
    """x [1,16,width] -> layers x (MatMul, Add, Relu, MatMul, Add, residual Add): transformer-FFN-like."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        for j, (k, n) in enumerate(((width, hidden), (hidden, width))):
            w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"l{i}.w{j}"),
                      numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), f"l{i}.b{j}")]
        nodes += [helper.make_node("MatMul", [x, f"l{i}.w0"], [f"l{i}.h0"]),
                  helper.make_node("Add", [f"l{i}.h0", f"l{i}.b0"], [f"l{i}.h1"]),
                  helper.make_node("Relu", [f"l{i}.h1"], [f"l{i}.h2"]),
                  helper.make_node("MatMul", [f"l{i}.h2", f"l{i}.w1"], [f"l{i}.h3"]),
                  helper.make_node("Add", [f"l{i}.h3", f"l{i}.b1"], [f"l{i}.h4"]),
                  helper.make_node("Add", [x, f"l{i}.h4"], [f"l{i}.out"])]
        x = f"l{i}.out"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 16, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="bench")
    model.ir_version = 10
    onnx.save(model, path)
    return path


def optimize_to(src: Path, dst: Path, mode: str | None, opset: int) -> tuple[bool, str]:
    extra = []
    if mode:
        fmt = "dq" if mode != "int4" or opset >= 21 else "matmulnbits"
        extra = [CompressWeights(Options(mode=mode, int4_format=fmt, block_size=32))]
    try:
        out = run(src, dst, OptimizeOptions(extra_passes=extra), keep_model=False)  # as the CLI runs
    except OptimizeError as exc:
        return False, str(exc)
    stats = next((p for p in out.report.passes if p["name"] == "compress_weights"), None)
    return True, ("" if stats is None else f"{stats['rewrites']} weights")


def make_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds_for(session: ort.InferenceSession, digits: dict | None) -> dict:
    if digits is not None:
        return {session.get_inputs()[0].name: digits["input"][:1]}
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def latency_ratio(base: ort.InferenceSession, comp: ort.InferenceSession, feed: dict, runs: int) -> float:
    for s in (base, comp):
        for _ in range(5):
            s.run(None, feed)
    tb, tc = [], []
    for _ in range(runs):
        for s, times in ((base, tb), (comp, tc)):
            t = time.perf_counter()
            s.run(None, feed)
            times.append(time.perf_counter() - t)
    return statistics.median(tc) / statistics.median(tb)


def fidelity(base: ort.InferenceSession, comp: ort.InferenceSession, feed: dict) -> float:
    a, b = base.run(None, feed)[0].ravel().astype(np.float64), comp.run(None, feed)[0].ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def accuracy(session: ort.InferenceSession, digits: dict) -> float:
    logits = session.run(None, {session.get_inputs()[0].name: digits["input"]})[0]
    return float((logits.argmax(1) == digits["label"]).mean())


def gz(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), mtime=0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="extra model paths")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args(argv)
    digits = dict(np.load(REPO / "models" / "digits_test.npz"))
    rows = ["| model | mode | compressed | size KB | raw ratio | gzip ratio | cosine | digits acc | latency ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = [REPO / "models" / m for m in SHIPPED] + [synthetic_mlp(tmp / "mlp_opset21.onnx")]
        paths += [Path(p) for p in args.models]
        for src in paths:
            opset = next((o.version for o in onnx.load(src, load_external_data=False).opset_import
                          if o.domain in ("", "ai.onnx")), 0)
            base_path = tmp / f"{src.stem}.base.onnx"
            optimize_to(src, base_path, None, opset)
            base = make_session(base_path)
            is_digits = src.name.startswith("digits_cnn")
            feed = feeds_for(base, digits if is_digits else None)
            base_acc = f"{accuracy(base, digits):.4f}" if is_digits else "-"
            rows.append(f"| {src.name} | lossless baseline | - | {base_path.stat().st_size / 1024:.1f} | 1.00 | 1.00 | 1.0 "
                        f"| {base_acc} | 1.00 |")
            for mode in MODES:
                dst = tmp / f"{src.stem}.{mode.replace(':', '')}.onnx"
                ok, info = optimize_to(src, dst, mode, opset)
                label = mode if mode != "int4" else ("int4 (DQ)" if opset >= 21 else "int4 (MatMulNBits)")
                if not ok:
                    rows.append(f"| {src.name} | {label} | refused: {info[:60]} | | | | | | |")
                    continue
                comp = make_session(dst)
                acc = f"{accuracy(comp, digits):.4f}" if is_digits else "-"
                rows.append(f"| {src.name} | {label} | {info} | {dst.stat().st_size / 1024:.1f} "
                            f"| {base_path.stat().st_size / dst.stat().st_size:.2f} | {gz(base_path) / gz(dst):.2f} "
                            f"| {fidelity(base, comp, feed):.6f} | {acc} | {latency_ratio(base, comp, feed, args.runs):.2f} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
