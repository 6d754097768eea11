"""Benchmark of the lowrank pass: MACs ratio, whole-model ORT CPU latency ratio, fidelity, time taken.

    python benchmarks/bench_lowrank.py [model.onnx ...] [--specs energy=0.9 energy=0.95 energy=0.99 ratio=0.5]

Without model paths it builds synthetic models with trained-like (decaying) weight spectra: a
VGG-style conv stack, ResNet-style bottleneck blocks and a transformer-encoder MLP. Latency is
the median of interleaved single-thread runs of the lossless-optimized model and the factored one.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxslim_opt.api import OptimizeOptions, run
from passes.lowrank import LowRankFactorize, parse_spec

RNG = np.random.default_rng(0)


def _decaying(shape_out: int, shape_in: int, decay: float = 0.93) -> np.ndarray:
    """A matrix whose singular values decay geometrically, like trained layers' do."""
    n = min(shape_out, shape_in)
    u = np.linalg.qr(RNG.standard_normal((shape_out, n)))[0]
    v = np.linalg.qr(RNG.standard_normal((shape_in, n)))[0]
    return ((u * decay ** np.arange(n)) @ v.T * np.sqrt(2.0 / shape_in) * np.sqrt(n) / 3).astype(np.float32)


def _conv(nodes, inits, x, cin, cout, k, stride=1, relu=True, name=""):
    w = _decaying(cout, cin * k * k).reshape(cout, cin, k, k)
    inits += [numpy_helper.from_array(w, f"{name}w"), numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}b")]
    nodes.append(helper.make_node("Conv", [x, f"{name}w", f"{name}b"], [f"{name}c"], pads=[k // 2] * 4,
                                  strides=[stride] * 2))
    if not relu:
        return f"{name}c"
    nodes.append(helper.make_node("Relu", [f"{name}c"], [f"{name}r"]))
    return f"{name}r"


def _model(nodes, inits, inp, out, shape):
    g = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info(inp, 1, shape)],
                          [helper.make_tensor_value_info(out, 1, [f"d{i}" for i in range(len(shape))])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def vgg() -> onnx.ModelProto:
    nodes, inits, x, c = [], [], "x", 3
    for i, (cout, stride) in enumerate([(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (256, 1)]):
        x, c = _conv(nodes, inits, x, c, cout, 3, stride, name=f"l{i}"), cout
    return _model(nodes, inits, "x", x, [1, 3, 64, 64])


def resnet() -> onnx.ModelProto:
    nodes, inits = [], []
    x = _conv(nodes, inits, "x", 3, 256, 3, 2, name="stem")
    for i in range(3):
        h = _conv(nodes, inits, x, 256, 64, 1, name=f"b{i}a")
        h = _conv(nodes, inits, h, 64, 64, 3, name=f"b{i}b")
        h = _conv(nodes, inits, h, 64, 256, 1, relu=False, name=f"b{i}c")
        nodes.append(helper.make_node("Add", [h, x], [f"b{i}s"]))
        nodes.append(helper.make_node("Relu", [f"b{i}s"], [f"b{i}o"]))
        x = f"b{i}o"
    return _model(nodes, inits, "x", x, [1, 3, 56, 56])


def mlp() -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    for i in range(2):
        for j, (a, b) in enumerate([(384, 1536), (1536, 384)]):
            inits.append(numpy_helper.from_array(_decaying(b, a).T.copy(), f"w{i}{j}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}{j}"], [f"m{i}{j}"]))
            x = f"m{i}{j}"
            if j == 0:
                nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
                x = f"r{i}"
    return _model(nodes, inits, "x", x, [1, 64, 384])


def latency_ratio(a: onnx.ModelProto, b: onnx.ModelProto, runs: int = 50) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]) for m in (a, b)]
    i = sessions[0].get_inputs()[0]
    feed = {i.name: RNG.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)}
    times = [[], []]
    for s in sessions:
        s.run(None, feed)
    for _ in range(runs):
        for k, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return float(np.median(times[1]) / np.median(times[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*")
    p.add_argument("--specs", nargs="+", default=["energy=0.9", "energy=0.95", "energy=0.99", "ratio=0.5"])
    p.add_argument("--runs", type=int, default=10, help="timed runs per candidate layer")
    args = p.parse_args()
    models = {path: onnx.load(path) for path in args.models} or {"vgg-style": vgg(), "resnet-style": resnet(),
                                                                    "encoder-mlp": mlp()}
    print("| model | spec | layers kept | MACs ratio (eligible) | latency ratio | cosine | top-1 agree | pass s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        base = run(model, None, OptimizeOptions()).model
        for spec in args.specs:
            options = parse_spec(spec)
            options.runs = args.runs
            t = time.perf_counter()
            outcome = run(model, None, OptimizeOptions(extra_passes=[LowRankFactorize(options)]))
            took = time.perf_counter() - t
            stats = next(s for s in outcome.report.passes if s["name"] == "lowrank")
            layers = stats["details"]["layers"]
            worst = min(outcome.report.validation["outputs"], key=lambda o: o["cosine"])
            print(f"| {name} | {spec} | {sum(l['kept'] for l in layers)}/{len(layers)} | "
                  f"{stats['details']['macs_ratio']:.3f} | {latency_ratio(base, outcome.model):.3f} | "
                  f"{worst['cosine']:.4f} | {worst.get('top1_agreement') or float('nan'):.3f} | {took:.1f} |")


if __name__ == "__main__":
    main()
