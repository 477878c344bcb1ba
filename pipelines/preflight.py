"""Checks made before a job starts, so that a bad run fails in seconds with one clear line
instead of on the workers: the model loads, takes the preprocessed images, and every
method runs on a real sample image with its options."""
from __future__ import annotations

import itertools
from typing import Any

import torch

from pipelines.options import UsageError
from transforms.explain import ExplainConfig, build_explainers
from transforms.models import ModelLoadError
from transforms.preprocess import BadImage, Preprocessing, decode, preprocess
from transforms.readers import SHARD_SUFFIXES, read_shard, shard_kind
from transforms.records import RawImage, seed_for

SAMPLE_SEARCH = 64  # records looked at to find one decodable sample image


def check_shards(shards: list[str], pattern: str | None = None) -> list[str]:
    """The shards to read: all of them when at least one has a supported type (the others then
    become one errors/ row each, so they are counted); a UsageError when none has."""
    supported = [url for url in shards if _is_shard(url)]
    if not supported:
        found = sorted({_suffix(url) for url in shards})
        listed = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
        raise UsageError(f"no image shards among the {len(shards)} file(s) matching {pattern or '--input'} "
                         f"(found: {listed}); supported: {', '.join(SHARD_SUFFIXES)}")
    return shards


def _is_shard(url: str) -> bool:
    try:
        shard_kind(url)
    except ValueError:
        return False
    return True


def _suffix(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else "(no extension)"


def check_target(target: str, num_classes: int) -> None:
    """A class index the model does not have would only fill errors/; refuse it up front."""
    if target.isdigit() and int(target) >= num_classes:
        raise UsageError(f"--target {target} is not a class of the model, which has {num_classes} "
                         f"(0 to {num_classes - 1})")


def first_sample(shards: list[str], prep: Preprocessing, storage_options: dict) -> tuple[str, torch.Tensor] | None:
    readable = [url for url in shards if _is_shard(url)][:4]
    records = itertools.chain.from_iterable(read_shard(url, storage_options, max_pixels=prep.max_pixels)
                                            for url in readable)
    for record in itertools.islice(records, SAMPLE_SEARCH):
        if isinstance(record, RawImage):
            try:
                return record.image_id, torch.from_numpy(preprocess(decode(record, prep.max_pixels), prep))[None]
            except BadImage:
                continue
    return None


def preflight(config: ExplainConfig, shards: list[str], prep: Preprocessing,
              storage_options: dict[str, Any]) -> dict[str, Any]:
    check_shards(shards)  # before the model loads: nothing to audit is the cheaper finding
    try:
        loaded = build_explainers(config)
    except ModelLoadError as e:
        raise UsageError(str(e)) from None
    except (ValueError, TypeError) as e:  # an explainer refused its options or the model
        raise UsageError(f"cannot set up the methods: {e}") from None
    report = {"device": str(loaded.device), "num_classes": None, "sample_image": None,
              "methods": {name: {"options": ex.options(), "signed": ex.signed, "passes": ex.passes(),
                                 "extras": dict(ex.extras)} for name, ex in loaded.explainers.items()}}
    sample = first_sample(shards, prep, storage_options)
    if sample is None:
        return report  # nothing decodable up front: every record will reach errors/ with its reason
    image_id, image = sample
    image = image.to(loaded.device)
    try:
        with torch.inference_mode():
            logits = loaded.model(image)
    except Exception as e:
        raise UsageError(f"the model rejects input of shape {list(image.shape)} (image {image_id}): "
                         f"{type(e).__name__}: {str(e).splitlines()[0]}; check --channels/--resize") from None
    if logits.dim() != 2:
        raise UsageError(f"the model must return logits [B,K], returned shape {list(logits.shape)}")
    report["num_classes"], report["sample_image"] = int(logits.shape[1]), image_id
    check_target(config.target, report["num_classes"])
    target = logits.argmax(dim=1)
    seeds = torch.tensor([seed_for(image_id, config.seed)])
    for name, explainer in loaded.explainers.items():
        try:
            explainer.explain(image, target, seeds)
        except Exception as e:
            raise UsageError(f"method {name} fails on sample image {image_id}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return report
