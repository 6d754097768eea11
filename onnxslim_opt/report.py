"""The run report: a versioned JSON document for pipelines and a before/after table for people."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import onnx

#: bump the major part when a field is removed or changes meaning
#: 1.1 added "metrics", "benchmark", "accuracy" and "gates" (see README, "JSON report")
SCHEMA_VERSION = "1.1"


@dataclass
class ModelSummary:
    nodes: int
    ops: dict[str, int]
    parameters: int
    weight_bytes: int
    file_bytes: Optional[int] = None

    @classmethod
    def of_model(cls, model: onnx.ModelProto, file_bytes: Optional[int] = None) -> "ModelSummary":
        ops: Counter = Counter()
        nodes = 0
        for g in _graphs(model.graph):
            ops.update(n.op_type for n in g.node)
            nodes += len(g.node)
        params = weight_bytes = 0
        for g in _graphs(model.graph):
            tensors = list(g.initializer) + [a.t for n in g.node if n.op_type == "Constant"
                                             for a in n.attribute if a.name == "value"]
            for t in tensors:
                count = 1
                for d in t.dims:
                    count *= d
                params += count
                weight_bytes += count * _itemsize(t.data_type)
        return cls(nodes, dict(sorted(ops.items())), params, weight_bytes, file_bytes)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


def _itemsize(data_type: int) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except Exception:
        return 0


@dataclass
class Report:
    input: str
    output: Optional[str]
    before: Optional[ModelSummary] = None
    after: Optional[ModelSummary] = None
    passes: list[dict] = field(default_factory=list)
    simplify_rounds: int = 0
    validation: Optional[dict] = None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    written: bool = False
    #: the figures gates read (gates.metrics_of), always present once validation ran
    metrics: dict[str, Any] = field(default_factory=dict)
    benchmark: Optional[dict] = None
    accuracy: Optional[dict] = None
    gates: Optional[dict] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "onnxslim-opt",
            "input": self.input,
            "output": self.output,
            "written": self.written,
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
            "passes": self.passes,
            "simplify_rounds": self.simplify_rounds,
            "validation": self.validation,
            "notes": self.notes,
            "seconds": self.seconds,
            "metrics": self.metrics,
            "accuracy": self.accuracy,
            "benchmark": self.benchmark,
            "gates": self.gates,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    def format_table(self) -> str:
        """Human summary for stderr."""
        lines = []
        b, a = self.before, self.after
        if b and a:
            lines.append(f"{'':14}{'before':>14}{'after':>14}{'change':>10}")
            lines.append(_row("nodes", b.nodes, a.nodes, str))
            lines.append(_row("parameters", b.parameters, a.parameters, _count))
            lines.append(_row("weights", b.weight_bytes, a.weight_bytes, _bytes))
            if b.file_bytes is not None and a.file_bytes is not None:
                lines.append(_row("file size", b.file_bytes, a.file_bytes, _bytes))
            changed_ops = sorted(set(b.ops) | set(a.ops), key=lambda op: -(b.ops.get(op, 0)))
            diffs = [f"{op} {b.ops.get(op, 0)}->{a.ops.get(op, 0)}" for op in changed_ops
                     if b.ops.get(op, 0) != a.ops.get(op, 0)]
            if diffs:
                lines.append("ops changed: " + ", ".join(diffs))
        active = [p for p in self.passes if p["rewrites"] or p["errors"]]
        idle = [p["name"] for p in self.passes if p["runs"] and not (p["rewrites"] or p["errors"])]
        if active:
            lines.append(f"{'pass':34}{'rewrites':>9}{'-nodes':>8}{'+nodes':>8}{'saved':>10}{'time':>9}")
            for p in active:
                flag = "  (errors, rolled back)" if p["errors"] else ""
                lines.append(f"{p['name']:34}{p['rewrites']:>9}{p['nodes_removed']:>8}{p['nodes_added']:>8}"
                             f"{_bytes(p['bytes_saved']):>10}{p['seconds']:>8.2f}s{flag}")
        if idle:
            total = sum(p["seconds"] for p in self.passes if p["name"] in idle)
            lines.append(f"({len(idle)} passes found nothing to change, {total:.2f}s in all)")
        if self.validation:
            v = self.validation
            text = f"validation: {v['status']}"
            if v["status"] in ("passed", "failed", "fidelity") and v["outputs"]:
                worst = max(v["outputs"], key=lambda o: o["max_abs_diff"])
                text += (f" ({v['samples']} samples, {len(v['outputs'])} outputs, max abs diff "
                         f"{worst['max_abs_diff']:.2g} on {worst['name']!r}, min cosine "
                         f"{min(o['cosine'] for o in v['outputs']):.6f}")
                agreements = [o["top1_agreement"] for o in v["outputs"] if o.get("top1_agreement") is not None]
                text += f", top-1 agreement {min(agreements):.4f})" if agreements else ")"
            if v["message"]:
                text += f": {v['message']}"
            lines.append(text)
        if self.accuracy:
            a = self.accuracy
            lines.append(f"accuracy on {a['samples']} labels ({a['output']!r}): original {a['original']:.4f}, "
                         f"optimized {a['optimized']:.4f}")
        if self.benchmark:
            from .benchmark import format_table as benchmark_table

            lines.append(benchmark_table(self.benchmark))
        if self.gates:
            for c in self.gates["checks"]:
                lines.append(f"gate {c['gate']!r}: {'passed' if c['passed'] else 'FAILED'} ({c['message']})")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def _row(label: str, before: int, after: int, fmt) -> str:
    change = f"{(after - before) / before * 100:+.1f}%" if before else ""
    return f"{label:14}{fmt(before):>14}{fmt(after):>14}{change:>10}"


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
