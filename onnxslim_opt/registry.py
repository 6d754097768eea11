"""Finds passes through the `onnxslim_opt.passes` entry-point group.

The core never imports a pass module by name: built-in passes and a user's own passes are
discovered the same way. `register` lets code (tests, notebooks) add a pass at run time.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Iterable

from .errors import OptimizeError
from .pass_api import STAGES, Pass

ENTRY_POINT_GROUP = "onnxslim_opt.passes"


class PassRegistry:
    def __init__(self) -> None:
        self._passes: dict[str, type[Pass]] = {}
        self._loaded = False
        self.load_errors: dict[str, str] = {}

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self._passes:
                continue
            try:
                cls = ep.load()
            except Exception as exc:  # a broken plug-in must not take the tool down
                self.load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                continue
            self.register(cls, name=ep.name)

    def register(self, cls: type[Pass], name: str | None = None) -> type[Pass]:
        name = name or cls.name
        if not isinstance(cls, type) or not issubclass(cls, Pass):
            raise TypeError(f"{name}: a pass must subclass onnxslim_opt.Pass")
        if cls.name != name:
            raise TypeError(f"pass class {cls.__name__} is named {cls.name!r} but registered as {name!r}")
        if cls.stage not in STAGES:
            raise TypeError(f"pass {name}: unknown stage {cls.stage!r}; use one of {STAGES}")
        self._passes[name] = cls
        return cls

    def get(self, name: str) -> type[Pass]:
        self._load()
        if name not in self._passes:
            hint = f" (it failed to load: {self.load_errors[name]})" if name in self.load_errors else ""
            raise OptimizeError(f"unknown pass {name!r}{hint}; see `optimize --list-passes`")
        return self._passes[name]

    def all(self) -> list[type[Pass]]:
        self._load()
        return sorted(self._passes.values(), key=lambda c: (STAGES.index(c.stage), c.order, c.name))

    def names(self) -> list[str]:
        return [c.name for c in self.all()]

    def default_pipeline(self) -> list[type[Pass]]:
        return [c for c in self.all() if c.default]

    def select(self, only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> list[type[Pass]]:
        """Passes to run, in declared order: `only` (or the defaults) minus `skip`."""
        skip = set(skip)
        for name in skip:
            self.get(name)  # unknown names are an error, not silently ignored
        if only is not None:
            chosen = [self.get(n) for n in only]
            chosen.sort(key=lambda c: (STAGES.index(c.stage), c.order, c.name))
        else:
            chosen = self.default_pipeline()
        return [c for c in chosen if c.name not in skip]


#: The process-wide registry. It holds only pass classes (no run settings), so sharing it is safe.
registry = PassRegistry()


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator for registering a pass without packaging it."""
    return registry.register(cls)
