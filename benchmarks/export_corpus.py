#!/usr/bin/env python3
"""Export the benchmark corpus: torchvision models (random weights) and a small transformer encoder.

Each model is exported three ways:
  torchscript  torch.onnx.export(dynamo=False), opset 17 (Conv+BN already fused by the exporter)
  dynamo       torch.onnx.export(dynamo=True), the exporter's default opset and its own optimizer
  bn           torch.onnx.export(dynamo=False, training=PRESERVE) on the model in eval mode: the
               exporter skips its eval peephole, so BatchNormalization nodes stay (inference semantics)

    python benchmarks/export_corpus.py                                # everything
    python benchmarks/export_corpus.py --models resnet18,vit_b_16 --exporters torchscript,bn

Files go to benchmarks/work/corpus/<model>__<exporter>.onnx (gitignored), with manifest.json
recording each export's status, opset, node count, size, time, and the reason for any skip.
No weights are downloaded: every model is built with weights=None (and weights_backbone=None);
BERT-base comes from transformers.BertConfig() with random weights, with HF_HUB_OFFLINE=1 set.

Each export runs in its own subprocess (a crash or hang of the exporter skips that one entry).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "work" / "corpus"

MODELS = [
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
    "convnext_tiny", "vit_b_16", "regnet_y_400mf", "squeezenet1_1", "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "transformer_encoder", "bert_base",
]
EXPORTERS = ["torchscript", "dynamo", "bn"]
OPSET = 17


# ----------------------------------------------------------------------------- model building
def build(name: str):
    """Return (module in eval mode, example input tuple, input names, output names)."""
    import torch

    torch.manual_seed(0)
    model, args, in_names, out_names = _build(name)
    _make_realistic(model, args)
    return model.eval(), args, in_names, out_names


def _make_realistic(model, args) -> None:
    """Random init is not like a trained model in ways that hide optimizer bugs:
    - fresh BatchNorm is the identity (mean 0, var 1, scale 1, shift 0) and fresh LayerNorm has
      unit scale and zero shift, so a wrong Conv+BN or norm rewrite would still match;
    - identical tensors across layers let exporters and deduplication shrink the graph;
    - without real statistics, activations grow layer by layer (ResNet-50 outputs ~1e3), so
      float rounding of any fusion exceeds atol; ViT's head is zero-initialised (output all 0).
    So: all-zero weight tensors get small random values, every norm gets random affine
    parameters, and then (last, so that each BatchNorm sees its real input) BatchNorm running
    statistics are calibrated on two random batches (BN layers alone in train mode, momentum=None)."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(0.0, 0.02)
        for m in model.modules():
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0.0, 0.1)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if bns:
            saved = [(m, m.momentum) for m in bns]
            model.eval()
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
                m.train()
            gen = torch.Generator().manual_seed(1)
            for _ in range(2):
                batch = tuple(torch.randn((4,) + tuple(a.shape[1:]), generator=gen) for a in args)
                model(*batch)
            for m, momentum in saved:
                m.momentum = momentum
            model.eval()


def _detector(det):
    """Tensor in, tensors out: torchvision detectors take a list of images, return a list of dicts."""
    import torch

    class Detector(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, images):
            out = self.m(list(images))[0]
            return out["boxes"], out["scores"], out["labels"]

    return Detector(det.eval()).eval()


def _build_bert():
    """BERT-base (12 layers, hidden 768, 12 heads) from BertConfig() with random weights; seq 128.
    Inputs input_ids and attention_mask (token_type_ids defaults to zeros inside the model)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched from a hub
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig()).eval()
    with torch.no_grad():  # zero biases would be identical across layers (dedup shrinks them)
        for param in bert.parameters():
            if param.dim() == 1 and not param.any():
                param.normal_(0.0, 0.02)

    class Bert(torch.nn.Module):
        """Tuple out instead of a ModelOutput."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, bert.config.vocab_size, (1, 128), generator=gen)
    mask = torch.ones(1, 128, dtype=torch.int64)
    return (Bert(bert).eval(), (ids, mask), ["input_ids", "attention_mask"],
            ["last_hidden_state", "pooler_output"])


def _build(name: str):
    import torch

    if name == "bert_base":
        return _build_bert()
    if name == "transformer_encoder":
        layer = torch.nn.TransformerEncoderLayer(d_model=256, nhead=8, dim_feedforward=1024, dropout=0.1,
                                                 batch_first=True)
        enc = torch.nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        # TransformerEncoder deep-copies one layer: all four would carry identical weights, which
        # exporters and optimizers deduplicate. Give each layer its own random weights.
        with torch.no_grad():
            for param in enc.parameters():
                if param.dim() > 1:
                    torch.nn.init.xavier_uniform_(param)
                else:
                    param.normal_(0.0, 0.02)
        model = enc.eval()
        x = torch.randn(1, 128, 256)
        return model, (x,), ["input"], ["output"]
    import torchvision

    if name == "ssdlite320_mobilenet_v3_large":
        det = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
        return _detector(det), (torch.rand(1, 3, 320, 320),), ["images"], ["boxes", "scores", "labels"]
    if name == "fasterrcnn_mobilenet_v3_large_320_fpn":
        # box_score_thresh=0: random-init class scores (~1/91) are all under the default 0.05, so the
        # outputs would be empty and the output check meaningless; keep the top 100 detections.
        det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, box_score_thresh=0.0)
        return _detector(det), (torch.rand(1, 3, 320, 320),), ["images"], ["boxes", "scores", "labels"]
    model = torchvision.models.get_model(name, weights=None).eval()
    return model, (torch.randn(1, 3, 224, 224),), ["input"], ["output"]


def export_one(name: str, exporter: str, path: Path) -> dict:
    """Runs in a child process. Exports and returns facts about the file."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    model, args, in_names, out_names = build(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if exporter == "torchscript":
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=in_names, output_names=out_names, do_constant_folding=True)
    elif exporter == "bn":
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=in_names, output_names=out_names, do_constant_folding=True,
                          training=torch.onnx.TrainingMode.PRESERVE)
    elif exporter == "dynamo":
        # external_data=False: one self-contained file, like the other two exporters.
        prog = torch.onnx.export(model, args, dynamo=True, input_names=in_names, output_names=out_names,
                                 external_data=False)
        prog.save(str(path), external_data=False)
    else:
        raise ValueError(f"unknown exporter {exporter}")
    seconds = time.perf_counter() - t

    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    info = {"status": "ok", "opset": opset, "nodes": len(m.graph.node), "bytes": path.stat().st_size,
            "export_s": round(seconds, 2), "bn_nodes": ops.get("BatchNormalization", 0)}
    if exporter == "bn" and not info["bn_nodes"]:
        path.unlink(missing_ok=True)
        return {"status": "skipped", "reason": "no BatchNormalization in this model: same graph as torchscript"}
    if exporter == "bn":
        bad = [n.name for n in m.graph.node if n.op_type == "BatchNormalization"
               and (len(n.output) != 1 or any(a.name == "training_mode" and a.i for a in n.attribute))]
        if bad:
            info["note"] = f"{len(bad)} BatchNormalization in training mode"
    return info


def _reason(exc: BaseException) -> str:
    """One line: the exporter's wrapper error plus its root cause (torch wraps the real error)."""
    import re

    def clean(e):
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        first = next((l.strip() for l in text.splitlines() if l.strip()), "")
        return f"{type(e).__name__}: {first}"[:300]

    root = exc
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    return clean(exc) if root is exc else f"{clean(exc)} -- cause: {clean(root)}"


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--exporters", default=",".join(EXPORTERS), help="comma-separated subset of: " + ", ".join(EXPORTERS))
    p.add_argument("--out-dir", default=str(DEFAULT_OUT), help=f"corpus folder (default {DEFAULT_OUT})")
    p.add_argument("--force", action="store_true", help="re-export files that already exist")
    p.add_argument("--timeout", type=float, default=900, help="seconds per export (default 900)")
    p.add_argument("--_child", nargs=3, metavar=("MODEL", "EXPORTER", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        name, exporter, path = args._child
        try:
            info = export_one(name, exporter, Path(path))
        except Exception as exc:  # reported to the parent as a skip reason
            Path(path).unlink(missing_ok=True)
            info = {"status": "skipped", "reason": _reason(exc)}
        print("EXPORT-RESULT " + json.dumps(info), flush=True)
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    exporters = [e.strip() for e in args.exporters.split(",") if e.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for e in exporters:
        if e not in EXPORTERS:
            p.error(f"unknown exporter {e!r}; choose from {', '.join(EXPORTERS)}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}

    t_all = time.perf_counter()
    for name in models:
        for exporter in exporters:
            key = f"{name}__{exporter}"
            path = out / f"{key}.onnx"
            if path.exists() and not args.force and manifest.get(key, {}).get("status") == "ok":
                print(f"{key:45} exists, kept ({manifest[key].get('nodes')} nodes)")
                continue
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--_child", name, exporter, str(path)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
                                           "TRANSFORMERS_OFFLINE": "1"})
                line = next((l for l in proc.stdout.splitlines() if l.startswith("EXPORT-RESULT ")), None)
                if line:
                    info = json.loads(line[len("EXPORT-RESULT "):])
                else:
                    tail = [l for l in proc.stderr.splitlines() if l.strip()][-1:] or [f"exit code {proc.returncode}"]
                    info = {"status": "skipped", "reason": f"exporter process died: {tail[0][:400]}"}
            except subprocess.TimeoutExpired:
                info = {"status": "skipped", "reason": f"export timed out after {args.timeout:.0f} s"}
            if info["status"] != "ok":
                path.unlink(missing_ok=True)
            info.update(model=name, exporter=exporter, file=path.name, wall_s=round(time.perf_counter() - t, 1))
            manifest[key] = info
            manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            if info["status"] == "ok":
                extra = f", {info['bn_nodes']} BN" if exporter == "bn" else ""
                print(f"{key:45} ok: opset {info['opset']}, {info['nodes']} nodes{extra}, "
                      f"{info['bytes'] / 2**20:.1f} MB, {info['wall_s']} s")
            else:
                print(f"{key:45} SKIPPED: {info['reason']}")
    print(f"corpus: {out} ({time.perf_counter() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
