#!/usr/bin/env python3
"""Generate the small ONNX models shipped in models/ (used by the README, tests and examples).

This script is NOT imported by the package or the tests; it needs torch, scikit-learn and skl2onnx,
which live in a separate venv (see models/README.md for the exact commands):

    python3 -m venv /work/venv-models
    /work/venv-models/bin/pip install torch==2.13.0 scikit-learn onnx==1.23.2 onnxruntime skl2onnx onnxscript
    /work/venv-models/bin/python models/make_models.py            # all models
    /work/venv-models/bin/python models/make_models.py tf_style   # only some (name prefixes)

Everything is seeded. Every written file is checked with onnx.checker (full_check) and run in
onnxruntime before the script reports success.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
SEED = 0

# Digits preprocessing: pixel/16 -> bilinear (align_corners=False, no antialias) 8x8 -> 32x32 -> (x-MEAN)/STD.
# MEAN/STD are the training-split statistics rounded to 4 decimals (printed by the script).
DIGITS_MEAN = None  # filled in by digits_data()
DIGITS_STD = None


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# checks shared by every model


def ort_session(path_or_model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = path_or_model if isinstance(path_or_model, (str, Path)) else path_or_model.SerializeToString()
    return ort.InferenceSession(str(src) if isinstance(src, Path) else src, so, providers=["CPUExecutionProvider"])


def random_feed(sess: ort.InferenceSession, model: onnx.ModelProto, seed: int = SEED) -> dict:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for inp in sess.get_inputs():
        if inp.name in inits:
            continue
        shape = [d if isinstance(d, int) and d > 0 else 2 for d in inp.shape]
        assert inp.type == "tensor(float)", inp.type
        feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def save_and_check(model: onnx.ModelProto, name: str) -> Path:
    path = HERE / name
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    reloaded = onnx.load(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort_session(path)
    outs = sess.run(None, random_feed(sess, reloaded))
    for o in outs:
        if isinstance(o, np.ndarray):
            assert np.all(np.isfinite(o)) or not np.issubdtype(o.dtype, np.floating), name
    log(f"  wrote {name}: {path.stat().st_size} bytes, ir={reloaded.ir_version}, "
        f"opsets={[(o.domain or 'ai.onnx', o.version) for o in reloaded.opset_import]}, "
        f"nodes={len(reloaded.graph.node)}, initializers={len(reloaded.graph.initializer)}")
    return path


def op_counts(model: onnx.ModelProto) -> dict:
    counts: dict = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------------------------
# data


def digits_data():
    """Digits split 75/25 stratified (random_state=0), preprocessed as the CNN expects."""
    global DIGITS_MEAN, DIGITS_STD
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=SEED)

    def upsample(a):
        t = torch.from_numpy(a[:, None])
        return F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False).numpy()

    up_tr, up_te = upsample(x_tr), upsample(x_te)
    DIGITS_MEAN = round(float(up_tr.mean()), 4)
    DIGITS_STD = round(float(up_tr.std()), 4)
    norm = lambda a: ((a - np.float32(DIGITS_MEAN)) / np.float32(DIGITS_STD)).astype(np.float32)
    return norm(up_tr), y_tr, norm(up_te), y_te


# ----------------------------------------------------------------------------------------------------------------
# 1/2. digits CNN (torch)


def build_digits_cnn():
    import torch
    from torch import nn

    def cbr(cin, cout, stride=1):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class Residual(nn.Module):
        """conv-bn-relu-conv-bn + shortcut (identity, or 1x1 conv + BN projection), then ReLU."""

        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.body = nn.Sequential(*cbr(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout:
                self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
            else:
                self.proj = nn.Identity()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.body(x) + self.proj(x))

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(*cbr(1, 16))                 # 16 x 32 x 32
            self.block1 = Residual(16, 16)                         # identity shortcut
            self.block2 = Residual(16, 32, stride=2)               # stride-2 stage, 1x1 projection: 32 x 16 x 16
            self.block3 = Residual(32, 32)                         # identity shortcut
            self.pool = nn.AdaptiveAvgPool2d(1)                    # -> GlobalAveragePool
            self.flatten = nn.Flatten()
            self.head = nn.Linear(32, 10)                          # logits

        def forward(self, x):
            x = self.block3(self.block2(self.block1(self.stem(x))))
            return self.head(self.flatten(self.pool(x)))

    return DigitsCNN()


def train_digits_cnn(x_tr, y_tr, x_te, y_te):
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    model = build_digits_cnn()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    epochs, bs = 12, 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * ((len(xt) + bs - 1) // bs))
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), bs):
            idx = perm[i:i + bs]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = torch_accuracy(model, x_te, y_te)
        log(f"  epoch {epoch + 1:2d}: train loss {total / len(xt):.4f}, test acc {acc:.4f}")
    model.eval()
    return model


def torch_logits(model, x):
    import torch
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def torch_accuracy(model, x, y) -> float:
    return float((torch_logits(model, x).argmax(1) == y).mean())


def check_digits_export(path: Path, torch_model, x_te, y_te, torch_acc: float, label: str) -> float:
    m = onnx.load(str(path))
    counts = op_counts(m)
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) >= 8, f"{label}: expected BatchNormalization nodes kept, got {counts}"
    for n in bns:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.get("training_mode", 0) == 0 and len(n.output) == 1, f"{label}: BN not in inference mode"
    assert counts.get("Add", 0) >= 3 and counts.get("Conv", 0) == 8, counts
    assert counts.get("GlobalAveragePool", 0) + counts.get("ReduceMean", 0) == 1, counts
    dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch", f"{label}: batch dim is {dim0}"
    sess = ort_session(path)
    logits = sess.run(None, {sess.get_inputs()[0].name: x_te})[0]
    ref = torch_logits(torch_model, x_te)
    diff = float(np.abs(logits - ref).max())
    ort_acc = float((logits.argmax(1) == y_te).mean())
    log(f"  {label}: ops {counts}; max |ORT - torch| = {diff:.2e}; ORT accuracy {ort_acc:.4f}")
    assert diff < 1e-3, f"{label}: ORT disagrees with torch eval mode ({diff})"
    assert ort_acc == torch_acc, (ort_acc, torch_acc)
    # a single sample and an odd batch both work (dynamic batch)
    for n in (1, 7):
        assert sess.run(None, {sess.get_inputs()[0].name: x_te[:n]})[0].shape == (n, 10)
    return ort_acc


def export_digits_torchscript(model, x_te, y_te, torch_acc):
    import torch

    name = "digits_cnn.onnx"
    path = HERE / name
    dummy = torch.from_numpy(x_te[:2])
    # eval mode + TrainingMode.PRESERVE + no constant folding keeps BatchNormalization as its own node (with
    # inference semantics: the model's training flag is False) instead of folding it into the convs.
    torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    m = onnx.load(str(path))
    m.doc_string = "made by onnxslim-opt models/make_models.py (torch.onnx TorchScript exporter)"
    save_and_check(m, name)
    return check_digits_export(path, model, x_te, y_te, torch_acc, name)


def export_digits_dynamo(model, x_te, y_te, torch_acc):
    import torch

    name = "digits_cnn_dynamo.onnx"
    path = HERE / name
    batch = torch.export.Dim("batch", min=1, max=4096)
    # opset 18: the exporter's native opset (its conversion down to 17 fails on ReduceMean's axes input).
    # optimize=False: the raw translation (Shape/Expand/CastLike noise, BatchNormalization kept), the kind of
    # graph an optimizer has to clean up; with optimize=True onnxscript already folds BN into the convs.
    prog = torch.onnx.export(model, (torch.from_numpy(x_te[:2]),), dynamo=True, opset_version=18,
                             input_names=["input"], output_names=["logits"],
                             dynamic_shapes=({0: batch},), external_data=False, optimize=False,
                             verbose=False, report=False)
    m = prog.model_proto
    for vi in list(m.graph.input) + list(m.graph.output):
        assert vi.type.tensor_type.shape.dim[0].dim_param == "batch", vi
    m.doc_string = "made by onnxslim-opt models/make_models.py (torch.onnx dynamo exporter)"
    save_and_check(m, name)
    return check_digits_export(path, model, x_te, y_te, torch_acc, name)


def make_digits(results: dict):
    x_tr, y_tr, x_te, y_te = digits_data()
    log(f"digits: train {x_tr.shape}, test {x_te.shape}; normalization mean={DIGITS_MEAN} std={DIGITS_STD}")
    np.savez_compressed(HERE / "digits_test.npz", input=x_te, label=y_te)
    log(f"  wrote digits_test.npz: {(HERE / 'digits_test.npz').stat().st_size} bytes")
    model = train_digits_cnn(x_tr, y_tr, x_te, y_te)
    torch_acc = torch_accuracy(model, x_te, y_te)
    log(f"  torch eval accuracy on the held-out split: {torch_acc:.4f} ({len(y_te)} images)")
    assert torch_acc > 0.95, torch_acc
    results["digits torch accuracy"] = torch_acc
    results["digits_cnn.onnx ORT accuracy"] = export_digits_torchscript(model, x_te, y_te, torch_acc)
    try:
        results["digits_cnn_dynamo.onnx ORT accuracy"] = export_digits_dynamo(model, x_te, y_te, torch_acc)
    except Exception as e:  # noqa: BLE001 - optional model: report and go on
        (HERE / "digits_cnn_dynamo.onnx").unlink(missing_ok=True)
        log(f"  SKIPPED digits_cnn_dynamo.onnx: {type(e).__name__}: {e}")
        results["digits_cnn_dynamo.onnx"] = f"skipped: {type(e).__name__}: {str(e)[:200]}"


# ----------------------------------------------------------------------------------------------------------------
# 3. scikit-learn models (skl2onnx)


def make_sklearn(results: dict):
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    digits = load_digits()
    x = digits.data.astype(np.float32)  # [N, 64], pixel values 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=SEED)
    initial = [("input", FloatTensorType([None, 64]))]
    target = {"": 17, "ai.onnx.ml": 3}

    # Pipeline with the default ZipMap output: output_label (int64 [N]) and output_probability
    # (seq(map(int64, float))), the sequence-of-maps output that trips many optimizers.
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=SEED))
    pipe.fit(x_tr, y_tr)
    m = convert_sklearn(pipe, "digits_logreg", initial_types=initial, target_opset=target)
    m.doc_string = "made by onnxslim-opt models/make_models.py (skl2onnx)"
    path = save_and_check(m, "sklearn_logreg_zipmap.onnx")
    sess = ort_session(path)
    label, proba = sess.run(None, {"input": x_te})
    assert isinstance(proba, list) and isinstance(proba[0], dict), type(proba)
    acc = float((label == y_te).mean())
    assert np.array_equal(label, pipe.predict(x_te))
    p = np.array([[d[k] for k in range(10)] for d in proba])
    assert np.allclose(p, pipe.predict_proba(x_te), atol=1e-4)
    log(f"  sklearn_logreg_zipmap.onnx: outputs {[o.name + ':' + o.type for o in sess.get_outputs()]}; "
        f"ORT accuracy {acc:.4f}")
    results["sklearn_logreg_zipmap.onnx ORT accuracy"] = acc

    # Small random forest: ai.onnx.ml TreeEnsembleClassifier. ZipMap switched off here so this one has
    # plain tensor outputs (label int64 [N], probabilities float [N, 10]).
    forest = RandomForestClassifier(n_estimators=12, max_depth=8, random_state=SEED)
    forest.fit(x_tr, y_tr)
    m = convert_sklearn(forest, "digits_forest", initial_types=initial, target_opset=target,
                        options={id(forest): {"zipmap": False}})
    m.doc_string = "made by onnxslim-opt models/make_models.py (skl2onnx)"
    # skl2onnx 1.20 lists the default domain twice in opset_import here; keep one entry per domain
    seen, opsets = set(), []
    for o in m.opset_import:
        if o.domain not in seen:
            seen.add(o.domain)
            opsets.append(helper.make_opsetid(o.domain, o.version))
    del m.opset_import[:]
    m.opset_import.extend(opsets)
    path = save_and_check(m, "sklearn_tree.onnx")
    assert "TreeEnsembleClassifier" in op_counts(m), op_counts(m)
    sess = ort_session(path)
    label, proba = sess.run(None, {"input": x_te})
    assert np.array_equal(label, forest.predict(x_te))
    assert np.allclose(proba, forest.predict_proba(x_te), atol=1e-4)
    acc = float((label == y_te).mean())
    log(f"  sklearn_tree.onnx: ops {op_counts(m)}; ORT accuracy {acc:.4f}")
    results["sklearn_tree.onnx ORT accuracy"] = acc


# ----------------------------------------------------------------------------------------------------------------
# 4. Paddle-style: every weight in a Constant node, no initializers


def initializers_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    consts = [helper.make_node("Constant", [], [t.name], name=f"{t.name}_const", value=t) for t in g.initializer]
    init_names = {t.name for t in g.initializer}
    inputs = [vi for vi in g.input if vi.name not in init_names]
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.extend(inputs)
    del g.initializer[:]
    return model


def make_paddle_style(results: dict):
    import torch
    from torch import nn

    torch.manual_seed(SEED + 4)

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(self.flatten(self.relu(self.bn(self.conv(x)))))

    model = Small()
    with torch.no_grad():  # non-trivial BN statistics, so fusing BN into the conv actually changes weights
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
    model.eval()
    tmp = HERE / "_paddle_tmp.onnx"
    x = torch.randn(2, 3, 8, 8)
    torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=13,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["x"], output_names=["fc_out"],
                      dynamic_axes={"x": {0: "batch"}, "fc_out": {0: "batch"}})
    m = onnx.load(str(tmp))
    tmp.unlink()
    m = initializers_to_constants(m)
    m.producer_name = "onnxslim-opt models/make_models.py (Paddle-style: weights in Constant nodes)"
    path = save_and_check(m, "paddle_style_mlp.onnx")
    assert len(m.graph.initializer) == 0
    sess = ort_session(path)
    xn = np.random.default_rng(SEED).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(xn)).numpy()
    got = sess.run(None, {"x": xn})[0]
    assert np.allclose(got, ref, atol=1e-4), np.abs(got - ref).max()
    log(f"  paddle_style_mlp.onnx: ops {op_counts(m)}")
    results["paddle_style_mlp.onnx"] = "ok"


# ----------------------------------------------------------------------------------------------------------------
# 5. tf2onnx-style NHWC graph


def make_tf_style(results: dict):
    rng = np.random.default_rng(SEED + 5)
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def he(shape, fan_in):
        return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)

    x = "input_1:0"
    cin = 3
    # (out channels, stride) per layer
    for i, (cout, stride) in enumerate([(8, 1), (16, 2), (16, 1)]):
        pre = f"model/conv2d_{i}"
        w = init(f"{pre}/Conv2D/ReadVariableOp:0", he((cout, cin, 3, 3), cin * 9))
        b = init(f"{pre}/BiasAdd/ReadVariableOp:0", rng.standard_normal(cout) * 0.1)
        nodes += [
            helper.make_node("Transpose", [x], [f"{pre}/Conv2D__{i}_nchw:0"], name=f"{pre}/Conv2D__in",
                             perm=[0, 3, 1, 2]),
            helper.make_node("Conv", [f"{pre}/Conv2D__{i}_nchw:0", w], [f"{pre}/Conv2D_nchw:0"], name=f"{pre}/Conv2D",
                             kernel_shape=[3, 3], strides=[stride, stride], pads=[1, 1, 1, 1], dilations=[1, 1],
                             group=1),
            helper.make_node("Transpose", [f"{pre}/Conv2D_nchw:0"], [f"{pre}/Conv2D:0"], name=f"{pre}/Conv2D__out",
                             perm=[0, 2, 3, 1]),
            helper.make_node("Add", [f"{pre}/Conv2D:0", b], [f"{pre}/BiasAdd:0"], name=f"{pre}/BiasAdd"),
            helper.make_node("Relu", [f"{pre}/BiasAdd:0"], [f"{pre}/Relu:0"], name=f"{pre}/Relu"),
        ]
        x, cin = f"{pre}/Relu:0", cout
    w = init("model/dense/MatMul/ReadVariableOp:0", he((cin, 10), cin))
    b = init("model/dense/BiasAdd/ReadVariableOp:0", rng.standard_normal(10) * 0.1)
    nodes += [
        helper.make_node("ReduceMean", [x], ["model/global_average_pooling2d/Mean:0"],
                         name="model/global_average_pooling2d/Mean", axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["model/global_average_pooling2d/Mean:0", w], ["model/dense/MatMul:0"],
                         name="model/dense/MatMul"),
        helper.make_node("Add", ["model/dense/MatMul:0", b], ["dense"], name="model/dense/BiasAdd"),
    ]
    graph = helper.make_graph(nodes, "tf2onnx", [helper.make_tensor_value_info(x_in := "input_1:0", TensorProto.FLOAT,
                                                                                 [1, 16, 16, 3])],
                              [helper.make_tensor_value_info("dense", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                          producer_name="onnxslim-opt models/make_models.py (tf2onnx-style NHWC)",
                          producer_version="1.0")
    m.ir_version = 7
    path = save_and_check(m, "tf_style_nhwc.onnx")
    # reference in numpy NHWC to make sure the graph is what it claims to be
    sess = ort_session(path)
    xn = rng.standard_normal((1, 16, 16, 3)).astype(np.float32)
    got = sess.run(None, {x_in: xn})[0]
    assert got.shape == (1, 10)
    log(f"  tf_style_nhwc.onnx: ops {op_counts(m)}")
    results["tf_style_nhwc.onnx"] = "ok"


# ----------------------------------------------------------------------------------------------------------------
# 6. old IR: IR version 3 / opset 8, every initializer also a graph input


def make_old_ir(results: dict):
    rng = np.random.default_rng(SEED + 6)
    inits = []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    nodes = [
        helper.make_node("Conv", ["data", init("conv1_w", rng.standard_normal((8, 3, 3, 3)) * 0.3),
                                  init("conv1_b", rng.standard_normal(8) * 0.1)], ["conv1"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["conv1", init("bn1_scale", rng.uniform(0.5, 1.5, 8)),
                                                init("bn1_bias", rng.uniform(-0.2, 0.2, 8)),
                                                init("bn1_mean", rng.uniform(-0.5, 0.5, 8)),
                                                init("bn1_var", rng.uniform(0.5, 2.0, 8))], ["bn1"],
                         epsilon=1e-5),
        helper.make_node("Relu", ["bn1"], ["relu1"]),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", init("conv2_w", rng.standard_normal((16, 8, 3, 3)) * 0.2),
                                  init("conv2_b", rng.standard_normal(16) * 0.1)], ["conv2"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv2"], ["relu2"]),
        helper.make_node("GlobalAveragePool", ["relu2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", init("fc_w", rng.standard_normal((10, 16)) * 0.3),
                                  init("fc_b", rng.standard_normal(10) * 0.1)], ["prob_logits"],
                         transB=1, alpha=1.0, beta=1.0),
        helper.make_node("Softmax", ["prob_logits"], ["prob"], axis=1),
    ]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 16, 16])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "old_exporter", inputs,
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)],
                          producer_name="onnxslim-opt models/make_models.py (old IR: initializers as inputs)",
                          producer_version="1.0")
    m.ir_version = 3
    path = save_and_check(m, "old_ir_initializers_as_inputs.onnx")
    reloaded = onnx.load(str(path))
    names = {vi.name for vi in reloaded.graph.input}
    assert reloaded.ir_version == 3 and all(t.name in names for t in reloaded.graph.initializer)
    sess = ort_session(path)
    out = sess.run(None, {"data": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)})[0]
    assert np.isclose(out.sum(), 1.0, atol=1e-5)
    log(f"  old_ir_initializers_as_inputs.onnx: ops {op_counts(m)}; ORT inputs {[i.name for i in sess.get_inputs()]}")
    results["old_ir_initializers_as_inputs.onnx"] = "ok"


# ----------------------------------------------------------------------------------------------------------------

STEPS = {
    "digits": make_digits,
    "sklearn": make_sklearn,
    "paddle_style": make_paddle_style,
    "tf_style": make_tf_style,
    "old_ir": make_old_ir,
}


def main(argv):
    os.environ.setdefault("PYTHONHASHSEED", "0")
    try:
        import torch
        torch.set_num_threads(1)  # fixed thread count: reproducible float reductions while training
        torch.use_deterministic_algorithms(True)
    except ImportError:
        pass
    wanted = [s for s in STEPS if not argv or any(s.startswith(a) for a in argv)]
    results: dict = {}
    for step in wanted:
        log(f"== {step}")
        STEPS[step](results)
    log("== summary")
    for k, v in results.items():
        log(f"  {k}: {v}")
    total = sum(p.stat().st_size for p in HERE.iterdir() if p.is_file())
    log(f"  models/ total size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
