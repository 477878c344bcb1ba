"""Which classes an image is explained for: ``--target``, one request or a comma list of them.

A request is ``predicted`` (the model's class), ``label`` (the record's label), ``topN`` (the model's
N highest classes) or a class index. One forward pass serves every request; each image gets one
row per distinct class its requests name (two requests naming one class make one row, credited to
the first of them in the order given), with the class's rank in the model's scores (1 = the
predicted class). A request an image cannot satisfy (``label`` on a record without one) costs that
(image, target) only: an error row, while its other targets are explained.

Ranks order the classes by logit, the predicted class first (it is the class the image gets alone,
saliency_audit.explainers.core.base.stable_argmax), ties by class index. Where a target's logit lies
within the batch's rounding noise of another class's, the image's logits are recomputed alone, so
which classes ``topN`` picks and every rank are the same whichever images share the batch.

Every target of an image uses the image's one seed (records.seed_for), so the map of a class is the
same whichever request asked for it: an audit history keys its maps by (image, method, class).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable

import torch

from saliency_audit.explainers.core.base import DECISION_RTOL

PREDICTED, LABEL = "predicted", "label"
_TOP = re.compile(r"top(\d+)")


class TargetError(ValueError):
    """A --target that cannot be read; the message is one line."""


def _request(item: str) -> str:
    """One item of --target, normalised (``top03`` -> ``top3``, ``07`` -> ``7``)."""
    if item in (PREDICTED, LABEL):
        return item
    if re.fullmatch(r"(?:top)?[0-9]{25,}", item):  # no class count needs that; past 4300 digits int() raises
        raise TargetError(f"{repr(item[:20])[:30]}... is too long for a target")
    if item.isascii() and item.isdigit():
        return str(int(item))
    top = _TOP.fullmatch(item) if item.isascii() else None
    if top:
        if int(top.group(1)) < 1:
            raise TargetError(f"{item!r}: topN needs N of at least 1")
        return f"top{int(top.group(1))}"
    raise TargetError(f"must be predicted, label or a class index >= 0 (or topN, e.g. top3, or a comma list of "
                      f"them), got {repr(item[:30])[:40]}")


def parse_targets(text: Any) -> tuple[str, ...]:
    """``predicted,label,top3,7`` -> its requests in order; TargetError for an empty item, an unknown
    word, top0 or an item given twice. (A class or topN beyond the model's classes is refused by
    ``check_classes`` once the model is loaded.)"""
    if not isinstance(text, str):
        raise TargetError(f"expected predicted, label, topN or a class index, got {type(text).__name__}")
    requests = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise TargetError(f"empty item in {repr(text[:60])[:80]}: give targets separated by single commas")
        request = _request(item)
        if request in requests:
            raise TargetError(f"{request!r} given twice")
        requests.append(request)
    return tuple(requests)


def normalise(text: str) -> str:
    """The --target text as the run records it."""
    return ",".join(parse_targets(text))


def top_n(request: str) -> int | None:
    match = _TOP.fullmatch(request)
    return int(match.group(1)) if match else None


def several(requests: Iterable[str] | str) -> bool:
    """Whether an image may get more than one row per method."""
    requests = parse_targets(requests) if isinstance(requests, str) else tuple(requests)
    return len(requests) > 1 or any((top_n(r) or 1) > 1 for r in requests)


def main_request(requests: Iterable[str] | str) -> str:
    """The request the report's main view, the findings and the sanity check follow: the first one
    given, ``predicted`` for a ``topN`` (its rank-1 class), so the view holds one map per image."""
    first = (parse_targets(requests) if isinstance(requests, str) else tuple(requests))[0]
    return PREDICTED if top_n(first) is not None else first


def summary_requests(target: str) -> tuple[str, ...]:
    """The --target requests the summary has rows for: each one given, and the main one (the
    predicted class for a topN) if it is not among them."""
    requests = parse_targets(target)
    main = main_request(requests)
    return requests if main in requests else (*requests, main)


def check_classes(requests: Iterable[str], num_classes: int) -> None:
    """A class index or a topN beyond the model's classes would only fill errors/: refused up front."""
    for request in requests:
        n = top_n(request)
        if n is not None and n > num_classes:
            raise TargetError(f"--target {request} asks for more classes than the model's {num_classes}")
        if request.isdigit() and int(request) >= num_classes:
            raise TargetError(f"--target {request} is not a class of the model, which has {num_classes} "
                              f"(0 to {num_classes - 1})")


def covers(recorded: Iterable[str], wanted: Iterable[str]) -> bool:
    """Whether every class the requests ``wanted`` name is among those ``recorded`` named, for the
    same image and model (whose prediction, label and ranks are then the same)."""
    recorded = set(recorded)
    tops = [top_n(r) for r in recorded if top_n(r) is not None]
    widest = max(tops, default=1 if PREDICTED in recorded else 0)

    def held(request: str) -> bool:
        n = 1 if request == PREDICTED else top_n(request)
        return request in recorded or (n is not None and n <= widest)
    return all(held(r) for r in wanted)


def satisfies(request: str, row: dict) -> bool:
    """Whether a saliency row (target, target_rank, predicted, label) answers ``request``."""
    target = row.get("target")
    if request == PREDICTED:
        return target is not None and target == row.get("predicted")
    if request == LABEL:
        return target is not None and target == row.get("label")
    n = top_n(request)
    if n is not None:
        rank = row.get("target_rank")
        if rank is None and target is not None and target == row.get("predicted"):
            rank = 1  # a row written before ranks were: its predicted class is rank 1
        return rank is not None and rank <= n
    return target is not None and target == int(request)


def request_filter(request: str):
    """``satisfies`` as a pyarrow expression over saliency rows (the report's and findings' view)."""
    import pyarrow.compute as pc
    if request == PREDICTED:
        return pc.field("target") == pc.field("predicted")
    if request == LABEL:
        return pc.field("target") == pc.field("label")
    n = top_n(request)
    if n is not None:
        return pc.field("target_rank") <= n
    return pc.field("target") == int(request)


FILTER_COLUMNS = ("target", "predicted", "label", "target_rank")  # the columns request_filter reads


# --- choosing the classes of a batch ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Choice:
    """One target of one image: the class, its rank in the model's scores, the request that asked."""

    cls: int
    rank: int
    source: str


@dataclasses.dataclass(frozen=True)
class Failure:
    """A request one image cannot satisfy (an error row of stage ``target``)."""

    source: str
    reason: str
    cls: int | None = None


def _rank(row: torch.Tensor, predicted: int, cls: int) -> int:
    """1 for the predicted class; else 2 + the other classes ordered before ``cls`` (higher logit,
    or equal and a smaller index)."""
    if cls == predicted:
        return 1
    value = row[cls]
    others = torch.ones_like(row, dtype=torch.bool)
    others[[predicted, cls]] = False
    before = (row > value) | ((row == value) & (torch.arange(len(row)) < cls))
    return 2 + int((before & others).sum())


def _choose(requests: tuple[str, ...], row: torch.Tensor, predicted: int, label: int | None
            ) -> tuple[list[tuple[int, str]], list[Failure]]:
    """(class, request) in order, each class once, and the requests the image cannot satisfy."""
    k = len(row)
    chosen: dict[int, str] = {}
    failures = []
    for request in requests:
        n = top_n(request)
        if request == PREDICTED:
            classes = [predicted]
        elif request == LABEL:
            if label is None:
                failures.append(Failure(request, "--target label, but the record has no label"))
                continue
            if not 0 <= label < k:
                failures.append(Failure(request, f"label {label} is outside the model's {k} classes", label))
                continue
            classes = [label]
        elif n is not None:
            if n > k:
                failures.append(Failure(request, f"--target {request} asks for more classes than the model's {k}"))
                continue
            order = [c for c in torch.sort(-row, stable=True).indices.tolist() if c != predicted]
            classes = [predicted, *order[:n - 1]]
        else:
            cls = int(request)
            if cls >= k:
                failures.append(Failure(request, f"--target {cls} is outside the model's {k} classes", cls))
                continue
            classes = [cls]
        for cls in classes:
            chosen.setdefault(cls, request)
    return list(chosen.items()), failures


def _near(row: torch.Tensor, predicted: int, classes: Iterable[int], rtol: float) -> bool:
    """Whether a chosen class other than the predicted one has a logit within the rounding tolerance
    of another class's: its rank, or whether topN picks it, could follow the batch's noise."""
    scale = max(1.0, float(row.abs().max()))
    for cls in classes:
        if cls == predicted:
            continue
        gaps = (row - row[cls]).abs()
        gaps[[cls, predicted]] = float("inf")
        if len(row) > 2 and not bool((gaps > rtol * scale).all()):
            return True
    return False


def resolve(requests: tuple[str, ...], logits: torch.Tensor, predicted: torch.Tensor, labels: list[int | None],
            recompute: Callable[[torch.Tensor], torch.Tensor] | None = None, rtol: float | None = DECISION_RTOL
            ) -> tuple[list[list[Choice]], list[list[Failure]]]:
    """Per image of a batch, its targets (in slot order) and the requests it cannot satisfy.
    ``logits`` [B,K]; ``predicted`` [B] (the stable argmax); ``recompute(rows)`` -> those rows'
    logits computed alone, for rows whose choice sits within ``rtol`` of the batch's noise."""
    if requests == (PREDICTED,):  # the default: no rank to compute
        return [[Choice(int(p), 1, PREDICTED)] for p in predicted.tolist()], [[] for _ in range(len(predicted))]
    logits, predicted = logits.detach().float().cpu(), predicted.cpu().tolist()
    picks = [_choose(requests, logits[i], predicted[i], labels[i]) for i in range(len(predicted))]
    if recompute is not None and rtol is not None:
        near = [i for i, (chosen, _) in enumerate(picks)
                if torch.isfinite(logits[i]).all() and _near(logits[i], predicted[i], [c for c, _ in chosen], rtol)]
        if near:
            logits = logits.clone()
            logits[near] = recompute(torch.tensor(near)).detach().float().cpu()
            for i in near:
                picks[i] = _choose(requests, logits[i], predicted[i], labels[i])
    choices = [[Choice(cls, _rank(logits[i], predicted[i], cls), source) for cls, source in chosen]
               for i, (chosen, _) in enumerate(picks)]
    return choices, [failures for _, failures in picks]


def main_of(target_option: Any) -> str:
    """The main request of a recorded --target (a manifest's, a history row's); ``predicted`` for
    anything unreadable (an audit of an older release)."""
    try:
        return main_request(str(target_option or PREDICTED))
    except TargetError:
        return PREDICTED


def main_summary(rows: Iterable[dict], target_option: Any) -> list[dict]:
    """The summary rows of the main request (rows without ``target_source``: an older release's,
    of its one target)."""
    main = main_of(target_option)
    return [r for r in rows if r.get("target_source") in (None, main)]


def held_classes(requests: Iterable[str], held: dict[int, int | None], label: int | None) -> set[int] | None:
    """The classes ``requests`` name for an image whose maps of the classes ``held`` (class -> its
    rank, None if unknown) an audit history holds, when every one of them is held; else None. (The
    same model and record give the same prediction, ranks and label, so no forward pass is needed.)"""
    by_rank = {rank: cls for cls, rank in held.items() if rank is not None}
    out: set[int] = set()
    for request in requests:
        n = 1 if request == PREDICTED else top_n(request)
        if n is not None:
            need = [by_rank.get(rank) for rank in range(1, n + 1)]
        else:
            cls = label if request == LABEL else int(request)
            need = [cls if cls in held else None]
        if None in need:
            return None
        out.update(need)
    return out
