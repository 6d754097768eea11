"""The pass interface: what every pass (built-in or a user's own) implements.

A pass has a stable `name` (the `--passes`/`--skip` key), says whether it is `lossless`,
takes typed `Options` (a dataclass), and returns a `PassResult` saying what it changed.
Node and byte statistics are measured by the pass manager, so a pass only counts its rewrites
and gives the reasons it declined candidates.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import onnx_graphsurgeon as gs

from .graph import Edit, Node, is_standard, topological_sort, walk_graphs

#: Pipeline stages, run in this order. "simplify" is repeated to a fixed point.
STAGES = ("prepare", "simplify", "transform", "finalize")


@dataclass
class Rejection:
    """A candidate a pass looked at and declined, and why (feeds the report and debugging)."""

    node: str
    op: str
    reason: str


@dataclass
class PassResult:
    changed: bool = False
    rewrites: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def reject(self, node: Node, reason: str) -> None:
        self.rejections.append(Rejection(node.name, node.op, reason))


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass
class PassContext:
    """What a pass may know about the run: settings shared by all passes, never global state."""

    opset: int
    input_shapes: dict[str, tuple] = field(default_factory=dict)
    #: folding never creates a constant larger than this many bytes (and never grows the model)
    fold_size_limit: int = 1 << 20
    debug: bool = False
    custom_op_libraries: tuple[str, ...] = ()
    #: set by the pass manager after a pass changed the graph; see shape_inference.ensure_shapes
    shapes_stale: bool = True
    #: the input model as loaded (large weights may be on-disk stubs): the template for
    #: graph.export_model when a pass needs a runnable model (e.g. to calibrate with ONNX Runtime)
    original: Optional[Any] = None
    #: the graph inputs with concrete shapes (specs.InputSpec), when they could be resolved
    input_specs: list = field(default_factory=list)
    #: user-given calibration data source (`--calibration`: .npz, directory, images), if any
    calibration: Optional[str] = None
    #: calibrate on this many random samples instead (`--calibration-random N`; ranges then mean nothing)
    calibration_random: int = 0
    #: preprocessing declared for image calibration data (`--preprocess`)
    preprocess: Optional[str] = None
    seed: int = 0


class Pass:
    """Base class for passes. Subclasses set the class attributes and implement `run`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    stage: ClassVar[str] = "simplify"
    #: position within its stage; lower runs first
    order: ClassVar[int] = 100
    #: part of the default `optimize` pipeline
    default: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions
    #: True when the pass never leaves a half-edited graph if it raises (it plans before it edits,
    #: or applies only self-contained edits). Otherwise the manager snapshots the graph first so
    #: it can roll the pass back; snapshots cost time on big graphs, so passes that can, say so.
    transactional: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def with_options(cls, **values: Any) -> "Pass":
        """Build the pass from loosely typed values (CLI/config), converted to the option types."""
        known = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"pass {cls.name} has no option(s) {sorted(unknown)}; it takes {sorted(known)}")
        return cls(cls.Options(**values))

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        """Add this pass's command-line flags to its argparse argument group (none by default).

        Lets a pass, built-in or a user's plug-in, own flags such as `--quantize int8` without
        the CLI knowing the pass."""

    @classmethod
    def from_arguments(cls, args: Any) -> Optional["Pass"]:
        """An instance configured from parsed flags when they ask for this pass, else None.
        Passes outside the default pipeline are enabled this way."""
        return None

    def applicable(self, graph: gs.Graph, ctx: PassContext) -> bool:
        """Cheap test whether `run` could change anything; False skips the run (and its snapshot)."""
        return True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError


class RewritePass(Pass):
    """A pass made of one local rewrite: `plan` looks at one anchor node and returns

    - None: not a candidate (silently skipped),
    - a string: a candidate declined, with the reason (recorded in the report),
    - an Edit: the rewrite, applied only after planning succeeded.

    Runs over the main graph and every subgraph.
    """

    #: op types the rewrite is anchored on; planning is only attempted for these
    anchors: ClassVar[tuple[str, ...]] = ()
    transactional = True  # planning happens before any edit; each Edit is applied whole

    def plan(self, node: Node, graph: gs.Graph, ctx: PassContext) -> Optional[Edit | str]:
        raise NotImplementedError

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        anchors = set(self.anchors)
        for g in list(walk_graphs(graph)):
            removed: set[int] = set()
            for node in list(g.nodes):
                if id(node) in removed or node.op not in anchors or not is_standard(node):
                    continue
                try:
                    outcome = self.plan(node, g, ctx)
                except Exception as exc:  # a bug or an unexpected model: decline, never half-edit
                    outcome = f"planning failed: {type(exc).__name__}: {exc}"
                if outcome is None:
                    continue
                if isinstance(outcome, str):
                    result.reject(node, outcome)
                    continue
                outcome.apply(g)
                removed.update(id(n) for n in outcome.remove)
                result.rewrites += 1
                result.changed = True
        if result.changed:
            topological_sort(graph)  # new nodes were appended; keep the order valid for later passes
        return result
