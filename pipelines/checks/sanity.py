"""The sanity checks, ``run --sanity-check``: model randomisation (Adebayo et al., NeurIPS 2018) and
the random logit test (Sixt et al., ICML 2020).

A driver-side step after the Beam job, before publishing: on a small deterministic sample
(the first ``--sanity-images`` decodable images in shard order) every method explains the
trained model and then each model of a cascading randomisation, top (logits) layer first.
Per method, layer and image we keep the Spearman rank correlation (signed and of |map|) and
the SSIM between the trained and the randomised maps. A method whose maps still correlate
with the trained model's maps once *every* layer is random does not explain the model
(an edge detector would pass any input through unchanged): it is flagged.

The flag uses the signed rank correlation: on MNIST-like images with black backgrounds,
gradient x input is exactly 0 on the background for any model, so the |map| correlation
stays near 1 for grad, intg and deeplift although their maps do change (the signed
correlation falls to about 0).

The random logit test explains the same images for another class, drawn at random per image
(seeded); a method whose maps for that class still correlate with the target's maps above the
threshold does not explain the decision (LRP's z+ rules on all layers are the known case): it is
flagged too. Its rows have check "random_logit" and step 0.
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from saliency_audit.explainers import explainer_class, get_explainer
from saliency_audit.explainers.metrics import (
    cascading_randomization,
    random_other_classes,
    sanity_rank_correlation,
    ssim,
)
from saliency_audit.transforms.io import storage
from saliency_audit.transforms.io.preprocess import BadImage, Preprocessing, decode, preprocess
from saliency_audit.transforms.io.readers import read_shard
from saliency_audit.transforms.io.records import RawImage, seed_for
from saliency_audit.transforms.io.rows import SUMMARY_SCHEMA
from saliency_audit.transforms.model.handler import ExplainConfig, build_explainers, choose_targets, predict
from saliency_audit.transforms.model.targets import main_request
from saliency_audit.transforms.parquet_sink import write_table

log = logging.getLogger("saliency_audit")

SANITY_SCHEMA = pa.schema([
    pa.field("method", pa.string()),
    pa.field("check", pa.string()),        # "cascading" (model randomisation) or "random_logit"
    pa.field("step", pa.int32()),          # 1 = only the top layer random, last = every layer random; 0: random logit
    pa.field("layer", pa.string()),        # the layer randomised at this step (null: random logit)
    pa.field("image_id", pa.string()),
    pa.field("rank_correlation", pa.float32()),      # Spearman, signed maps (null: a constant trained map;
                                                     # 0: only the other map is constant, sanity_rank_correlation)
    pa.field("rank_correlation_abs", pa.float32()),  # Spearman of |map|
    pa.field("ssim", pa.float32()),                  # maps min-max scaled on their own first
])


def sample_images(shards: list[str], prep: Preprocessing, storage_options: dict[str, Any],
                  count: int) -> tuple[list[str], torch.Tensor, list[int | None]]:
    """The first ``count`` decodable images in shard order: ids, model input [N,C,H,W], labels."""
    ids, images, labels = [], [], []
    records = itertools.chain.from_iterable(read_shard(url, storage_options, max_pixels=prep.max_pixels)
                                            for url in shards)
    for record in records:
        if len(ids) == count:
            break
        if not isinstance(record, RawImage):
            continue
        try:
            image = preprocess(decode(record, prep.max_pixels), prep)
        except BadImage:
            continue
        if images and image.shape != images[0].shape:
            continue  # without --resize images may differ in size; the sample needs one
        ids.append(record.image_id)
        images.append(image)
        labels.append(record.label)
    return ids, torch.from_numpy(np.stack(images)) if images else torch.empty(0), labels


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _values(tensor: torch.Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in tensor.cpu()]


def randomisation_rows(config: ExplainConfig, ids: list[str], images: torch.Tensor, labels: list[int | None]
                       ) -> tuple[list[dict], list[str], dict[str, str]]:
    """One row per (method, randomisation step, image); the layers, top first; and per method
    that failed (e.g. on a model whose random weights it cannot handle) the reason. A failing
    method gets no verdict but does not stop the run: the audit itself has succeeded."""
    loaded = build_explainers(config)
    images = images.to(loaded.device)
    logits, _, predicted = predict(loaded.model, images)  # the run's own decision, not this batch's
    # several --target requests: the main one's class (the predicted class for a topN)
    targets, reasons = choose_targets(main_request(config.target), predicted, labels, logits.shape[1])
    keep = [i for i, reason in enumerate(reasons) if reason is None]
    ids, images, targets = [ids[i] for i in keep], images[keep], targets[keep]
    seeds = torch.tensor([seed_for(image_id, config.seed) for image_id in ids], dtype=torch.int64)
    errors: dict[str, str] = {}

    def explain(name, model, explainer=None, stage="trained model", classes=targets):
        if name in errors:
            return None
        try:
            explainer = explainer or get_explainer(name, model, **config.methods[name])
            return explainer.explain(images, classes, seeds).maps.detach().float().cpu()
        except Exception as e:  # noqa: BLE001 - any failure of a method is reported, not raised
            errors[name] = f"{stage}: {type(e).__name__}: {e}"
            log.warning("sanity check: %s failed on the %s: %s", name, stage, e)
            return None

    trained = {name: explain(name, loaded.model, explainer) for name, explainer in loaded.explainers.items()}
    rows, layers = [], []

    def compare(name, maps, check, step, layer):
        columns = {"rank_correlation": _values(sanity_rank_correlation(trained[name], maps)),
                   "rank_correlation_abs": _values(sanity_rank_correlation(trained[name], maps, True)),
                   "ssim": _values(ssim(trained[name], maps))}
        return [{"method": name, "check": check, "step": step, "layer": layer, "image_id": image_id,
                 **{key: values[i] for key, values in columns.items()}} for i, image_id in enumerate(ids)]

    if logits.shape[1] >= 2 and len(ids):
        others = random_other_classes(targets, logits.shape[1], seeds).to(targets.device)
        for name, explainer in loaded.explainers.items():
            maps = explain(name, loaded.model, explainer, stage="random logit", classes=others)
            if maps is not None:
                rows += compare(name, maps, "random_logit", 0, None)
    steps = cascading_randomization(loaded.model, config.seed, example_input=images[:1])
    for step, (layer, randomised) in enumerate(steps, start=1):
        layers.append(layer)
        for name in config.methods:
            maps = explain(name, randomised, stage=f"model randomised down to {layer}")
            if maps is not None:
                rows += compare(name, maps, "cascading", step, layer)
    rows = [r for r in rows if r["method"] not in errors]  # a method that failed midway has no verdict
    return rows, layers, errors


def verdicts(rows: list[dict], methods: list[str], threshold: float,
             errors: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per method: mean similarities at full randomisation (the last step) and its flag, and the
    same for the random logit test (random_logit_*)."""
    last = max((r["step"] for r in rows if r["check"] == "cascading"), default=0)
    out = {}
    for method in methods:
        if method in (errors or {}):
            out[method] = {"rank_correlation": None, "rank_correlation_abs": None, "ssim": None, "flagged": None,
                           "random_logit_rank_correlation": None, "random_logit_ssim": None,
                           "random_logit_flagged": None, "error": errors[method]}
            continue
        final = [r for r in rows if r["method"] == method and r["check"] == "cascading" and r["step"] == last]
        rho = _mean([r["rank_correlation"] for r in final])
        other = [r for r in rows if r["method"] == method and r["check"] == "random_logit"]
        rho_other = _mean([r["rank_correlation"] for r in other])
        out[method] = {"rank_correlation": rho,
                       "rank_correlation_abs": _mean([r["rank_correlation_abs"] for r in final]),
                       "ssim": _mean([r["ssim"] for r in final]),
                       "flagged": None if rho is None else rho > threshold,
                       "random_logit_rank_correlation": rho_other,
                       "random_logit_ssim": _mean([r["ssim"] for r in other]),
                       "random_logit_flagged": None if rho_other is None else rho_other > threshold}
    return out


def annotate_summary(summary_dir: str, results: dict[str, dict[str, Any]], storage_options: dict[str, Any]) -> None:
    """Write each method's verdict into the sanity columns of every summary row of it."""
    fs, path = storage.filesystem(summary_dir, storage_options)
    for file in sorted(storage.glob_in(fs, path, "*.parquet")):
        with fs.open(file, "rb") as f:
            rows = pq.read_table(f).to_pylist()
        for row in rows:
            verdict = results.get(row["method"], {})
            row["sanity_rank_correlation"] = verdict.get("rank_correlation")
            row["sanity_flagged"] = verdict.get("flagged")
            row["random_logit_rank_correlation"] = verdict.get("random_logit_rank_correlation")
            row["random_logit_flagged"] = verdict.get("random_logit_flagged")
        with fs.open(file, "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA), f, compression="zstd")


def run_sanity_check(config: ExplainConfig, shards: list[str], prep: Preprocessing, *, sanity_dir: str,
                     summary_dir: str, images: int, threshold: float, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Writes ``sanity_dir`` and the sanity columns of the summary in ``summary_dir``; returns the
    manifest entry."""
    ids, pixels, labels = sample_images(shards, prep, storage_options, images)
    rows, layers, errors = randomisation_rows(config, ids, pixels, labels) if ids else ([], [], {})
    results = verdicts(rows, list(config.methods), threshold, errors)
    write_table(sanity_dir, pa.Table.from_pylist(rows, schema=SANITY_SCHEMA), storage_options)
    annotate_summary(summary_dir, results, storage_options)
    flagged = [m for m, v in results.items()  # the controls are flagged by design: not news
               if (v["flagged"] or v["random_logit_flagged"]) and not explainer_class(m).control]
    log.info("sanity check on %d image(s), %d layer(s): %s", len({r["image_id"] for r in rows}), len(layers),
             f"flagged {', '.join(flagged)}" if flagged else "no method flagged")
    return {"images": sorted({r["image_id"] for r in rows}), "layers_top_first": layers, "threshold": threshold,
            "methods": results,
            "convention": ("cascading randomisation from the logits down (saliency_audit.explainers.metrics.cascading_randomization, "
                           "seeded by --seed); per image Spearman rank correlation (signed and |map|) and SSIM "
                           "between trained and randomised maps; a method is flagged when the mean signed rank "
                           "correlation at full randomisation exceeds the threshold. Random logit test: the same "
                           "similarities between the maps of the target and of another class drawn per image "
                           "(saliency_audit.explainers.metrics.random_other_classes); flagged (random_logit_flagged) above the "
                           "same threshold")}
