"""The pass manager: runs passes in declared stage order, the simplify stage to a fixed point.

Modelled on compiler pass managers: every pass run is timed and measured (nodes removed and
added, weight bytes saved), a pass that raises is rolled back to the graph as it was before
that pass (and the error recorded), and in debug mode onnx.checker runs after every pass so the
pass that broke the graph is named.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import onnx
import onnx_graphsurgeon as gs

from .errors import OptimizeError
from .graph import export_model, node_count, weight_stats
from .pass_api import STAGES, Pass, PassContext, PassResult

log = logging.getLogger("onnxslim_opt")

#: the simplify stage stops after this many rounds even if passes keep reporting changes
MAX_SIMPLIFY_ROUNDS = 10
#: at most this many declined candidates are kept per pass in the report
MAX_REJECTIONS_KEPT = 50


@dataclass
class PassStats:
    name: str
    lossless: bool
    runs: int = 0
    changed_runs: int = 0
    rewrites: int = 0
    nodes_removed: int = 0
    nodes_added: int = 0
    bytes_saved: int = 0
    seconds: float = 0.0
    rejections: dict[str, int] = field(default_factory=dict)
    rejection_examples: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: what the pass reported in PassResult.details (later runs update earlier keys)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class PassFailure(Exception):
    """Raised in debug mode when a pass leaves a graph onnx.checker rejects."""


class PassManager:
    def __init__(self, passes: Sequence[Pass], ctx: PassContext, original: onnx.ModelProto,
                 progress: Optional[Callable[[str], None]] = None):
        self.passes = list(passes)
        self.ctx = ctx
        self.original = original
        self.stats: dict[str, PassStats] = {p.name: PassStats(p.name, p.lossless) for p in self.passes}
        self.rounds = 0
        self.progress = progress
        self._measured: Optional[tuple[int, int]] = None  # (nodes, weight bytes) of the current graph

    def run(self, graph: gs.Graph) -> gs.Graph:
        for stage in STAGES:
            stage_passes = [p for p in self.passes if p.stage == stage]
            if not stage_passes:
                continue
            if stage == "simplify":
                for round_index in range(MAX_SIMPLIFY_ROUNDS):
                    self.rounds = round_index + 1
                    changed = False
                    for p in stage_passes:
                        graph, did_change = self._run_one(p, graph)
                        changed |= did_change
                    if not changed:
                        break
            else:
                for p in stage_passes:
                    graph, _ = self._run_one(p, graph)
        return graph

    def _measure(self, graph: gs.Graph) -> tuple[int, int]:
        if self._measured is None:
            self._measured = (node_count(graph), weight_stats(graph)[1])
        return self._measured

    def _run_one(self, p: Pass, graph: gs.Graph) -> tuple[gs.Graph, bool]:
        stats = self.stats[p.name]
        if not p.applicable(graph, self.ctx):
            stats.runs += 1
            return graph, False
        if self.progress:
            self.progress(p.name)
        nodes_before, bytes_before = self._measure(graph)
        # structure-only copy (weight arrays are shared and never mutated in place)
        snapshot = None if p.transactional else graph.copy()
        start = time.perf_counter()
        try:
            result = p.run(graph, self.ctx) or PassResult()
        except OptimizeError:
            raise  # the user's input is wrong (e.g. calibration data): one clear line, not a rollback
        except Exception as exc:
            stats.seconds += time.perf_counter() - start
            stats.runs += 1
            message = f"{type(exc).__name__}: {exc}"
            if message not in stats.errors:
                stats.errors.append(message)
            log.warning("pass %s failed and was rolled back: %s", p.name, message)
            if self.ctx.debug:
                log.debug("traceback of pass %s", p.name, exc_info=True)
            self.ctx.shapes_stale = True
            self._measured = None
            if snapshot is None:
                # a transactional pass raised between whole edits: the graph is valid as it stands
                return graph, True
            return snapshot, False
        stats.seconds += time.perf_counter() - start
        stats.runs += 1
        stats.rewrites += result.rewrites
        if result.changed:
            stats.changed_runs += 1
            self.ctx.shapes_stale = True
            self._measured = None
            nodes_after, bytes_after = self._measure(graph)
            stats.nodes_removed += max(0, nodes_before - nodes_after)
            stats.nodes_added += max(0, nodes_after - nodes_before)
            stats.bytes_saved += bytes_before - bytes_after
        for r in result.rejections:
            stats.rejections[r.reason] = stats.rejections.get(r.reason, 0) + 1
            if len(stats.rejection_examples) < MAX_REJECTIONS_KEPT:
                stats.rejection_examples.append({"node": r.node, "op": r.op, "reason": r.reason})
        stats.details.update(result.details)
        for note in result.notes:
            if note not in stats.notes:
                stats.notes.append(note)
        if self.ctx.debug and result.changed:
            self._verify(p, graph)
        return graph, result.changed

    def _verify(self, p: Pass, graph: gs.Graph) -> None:
        try:
            model = export_model(graph, self.original)
            onnx.checker.check_model(model)
        except Exception as exc:
            raise PassFailure(f"pass {p.name} produced an invalid graph: {type(exc).__name__}: {exc}") from exc
