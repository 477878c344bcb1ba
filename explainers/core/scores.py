"""The target's score from logits: the one place that says what a method optimises, ranks or fits.

The softmax probability saturates: float32 rounds it to 1.0 once the target's margin exceeds ~17,
which a confident production model reaches on most images, and then every perturbation scores the
same and a method that follows it sees nothing. The other scores keep the probability's order (log
odds) or scale exactly with the logits (margin) and never saturate.
"""
from __future__ import annotations

import torch

SCORES = ("log_odds", "margin", "logit", "probability")


def check_score(score: object, allowed: tuple[str, ...] = SCORES) -> None:
    if score not in allowed:
        raise ValueError(f"score must be one of {', '.join(map(repr, allowed))}, got {score!r}")


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The probability of every class [N,K] under ``logits`` [N,K]: the softmax, except for a single
    output, a binary classifier's logit z, whose class is the positive one with probability sigmoid(z)
    (a softmax over one column is 1 whatever the image: every score and metric would be constant)."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def target_scores(logits: torch.Tensor, targets: torch.Tensor, score: str,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The target's score per row of ``logits`` [N,K] for ``targets`` [N], as ``dtype`` [N].

    "log_odds": log(p / (1 - p)) of the softmax probability p, computed stably as the target
        logit minus the logsumexp of the others: the probability's order on a scale that
        does not saturate.
    "margin": the target logit minus the largest other one; scales exactly with the logits.
    "logit": the target logit.  "probability": the softmax probability (saturates).
    A model with a single output is read as a binary classifier's logit: its log odds and
    margin are that logit, its probability the sigmoid of it (class_probabilities).
    """
    logits = logits.to(dtype)
    picked = targets.long().reshape(-1, 1)
    target = logits.gather(1, picked).squeeze(1)
    if score == "logit" or (score in ("log_odds", "margin") and logits.shape[1] == 1):
        return target
    if score == "probability":
        return class_probabilities(logits).gather(1, picked).squeeze(1)
    others = logits.scatter(1, picked, float("-inf"))
    if score == "margin":
        return target - others.max(dim=1).values
    if score == "log_odds":
        return target - torch.logsumexp(others, dim=1)
    check_score(score)
    raise AssertionError("unreachable")
