"""Channel selection for prune_channels: score channel classes, rank them globally and remove the
cheapest until the FLOPs target is met, under a per-layer cap, round-to and never-zero rules."""
from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

from onnxslim_opt.graph import constant_value

from ._prune_graph import Analysis, node_cost

CRITERIA = ("l1", "l2", "bn", "activation")


def contribution_scores(a: Analysis, abs_means: dict[str, np.ndarray]) -> np.ndarray:
    """Data-driven importance per channel id: its contribution to the next layers' outputs,
    mean|x_c| * sum|W[:, c]| at every terminal consumer, each consumer normalized by its mean."""
    per_id = np.zeros(len(a.parent))
    for role in a.consumers:
        w = np.abs(np.asarray(constant_value(role.node.inputs[role.index]), np.float64))
        w = np.moveaxis(w, role.axis, 0).reshape(w.shape[role.axis], -1).sum(axis=1)
        x = abs_means[role.node.inputs[0].name]
        x = x.reshape(-1, w.size).sum(axis=0)  # grouped conv: position i of every group together
        c = (w * x).reshape(len(role.ids), role.block).sum(axis=1)
        per_id[role.ids] += c / max(float(c.mean()), 1e-12)
    return per_id


def producer_scores(a: Analysis, criterion: str, id_scores: Optional[np.ndarray] = None) -> dict[int, np.ndarray]:
    """Per producer, one importance per output channel, normalized by the producer's mean so
    layers of different scale rank together (global ranking)."""
    bn_scale = _bn_scales(a) if criterion == "bn" else {}
    out = {}
    for p, prod in enumerate(a.producers):
        if id_scores is not None:
            s = id_scores[prod.ids]
            out[p] = s / max(float(s.mean()), 1e-12)
            continue
        w = np.moveaxis(constant_value(prod.node.inputs[1]).astype(np.float64), prod.axis, 0).reshape(len(prod.ids), -1)
        if criterion == "bn" and p in bn_scale:
            s = np.abs(bn_scale[p])
        elif criterion == "l2":
            s = np.sqrt((w ** 2).sum(axis=1))
        else:
            s = np.abs(w).sum(axis=1)
        out[p] = s / max(float(s.mean()), 1e-12)
    return out


def _bn_scales(a: Analysis) -> dict[int, np.ndarray]:
    """|gamma / sqrt(var + eps)| of a BatchNormalization right after the producer (if any)."""
    scales = {}
    for p, prod in enumerate(a.producers):
        users = prod.node.outputs[0].outputs
        if prod.node.op == "Conv" and len(users) == 1 and users[0].op == "BatchNormalization":
            bn = users[0]
            gamma, var = constant_value(bn.inputs[1]), constant_value(bn.inputs[4])
            scales[p] = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + bn.attrs.get("epsilon", 1e-5))
    return scales


def select(a: Analysis, total: float, fraction: float, criterion: str = "l1", max_layer_ratio: float = 0.7,
           round_to: int = 1, id_scores: Optional[np.ndarray] = None, metric: str = "flops"
           ) -> tuple[set[int], dict]:
    """Roots of the channel classes to remove so about `fraction` of `total` (MACs or parameters,
    per `metric`) go, and numbers for the report."""
    classes = a.classes()
    scores = producer_scores(a, criterion, id_scores)
    saving = _class_savings(a, classes, metric)
    score = {r: float(np.mean([scores[a.owner[i]][i - a.producers[a.owner[i]].ids[0]]
                               for i in m if a.owner[i] >= 0])) for r, m in classes.items()}
    size = {p: len(prod.ids) for p, prod in enumerate(a.producers)}
    removed_per: Counter = Counter()
    removed: set[int] = set()
    target, gained = fraction * total, 0.0
    for r in sorted(classes, key=lambda r: (score[r], r)):
        if gained >= target:
            break
        owners = Counter(a.owner[i] for i in classes[r] if a.owner[i] >= 0)
        if all(_allowed(removed_per[p] + k, size[p], max_layer_ratio, round_to) for p, k in owners.items()):
            removed.add(r)
            removed_per.update(owners)
            gained += saving[r]
    if round_to > 1:
        _round(a, classes, removed, score, round_to, max_layer_ratio)
    for ids in a.min_keep:  # a Split output never becomes empty: give back its best channel
        if all(a.find(i) in removed for i in ids):
            removed.discard(max((a.find(i) for i in ids), key=lambda r: score[r]))
    info = {f"{metric}_target": target, "prunable_classes": len(classes)}
    if criterion == "bn":
        info["without_bn"] = len(a.producers) - len(_bn_scales(a))
    return removed, info


def _allowed(removed: int, size: int, cap: float, round_to: int) -> bool:
    kept = size - removed
    return removed <= int(cap * size) and kept >= max(1, min(round_to, size))


def _round(a: Analysis, classes: dict, removed: set[int], score: dict, round_to: int, cap: float) -> None:
    """Make each producer keep a multiple of round_to: remove its weakest kept classes when that
    is the nearer multiple and the cap allows it, else give back its best removed classes."""
    for _ in range(4):
        changed = False
        for prod in a.producers:
            roots = {a.find(i) for i in prod.ids}
            if not roots <= classes.keys():
                continue  # blocked channels: the producer keeps all of them anyway
            kept = sum(a.find(i) not in removed for i in prod.ids)
            more, back = kept % round_to, (-kept) % round_to
            if not more or kept == len(prod.ids):
                continue
            changed = True
            gone = len(prod.ids) - kept + more
            if more <= back and kept - more >= round_to and gone <= int(cap * len(prod.ids)):
                alive = sorted({a.find(i) for i in prod.ids} - removed, key=lambda r: score[r])
                removed.update(alive[:more])
            else:
                mine = sorted({a.find(i) for i in prod.ids} & removed, key=lambda r: -score[r])
                removed.difference_update(mine[:back])
        if not changed:
            return


def _class_savings(a: Analysis, classes: dict, metric: str) -> dict[int, float]:
    """Approximate cost removed with each class: its share of every producer and consumer."""
    per_id = np.zeros(len(a.parent))
    for prod in a.producers:
        per_id[prod.ids] += node_cost(prod.node, metric) / len(prod.ids)
    for role in a.consumers:
        per_id[role.ids] += node_cost(role.node, metric) / len(role.ids)
    for role in a.roles:
        if role.kind == "group":  # depthwise: each channel is its own slice of the work
            per_id[role.ids] += node_cost(role.node, metric) / len(role.ids)
    return {r: float(per_id[m].sum()) for r, m in classes.items()}


def total_cost(graph, metric: str = "flops") -> float:
    return sum(node_cost(n, metric) for n in graph.nodes)
