"""The batched explain step: one model per worker, every method on every batch."""
from __future__ import annotations

import time

import apache_beam as beam
import torch
from apache_beam.utils import shared

from saliency_audit.explainers import metrics as quality
from saliency_audit.explainers.metrics.abele_protocol import abele_metrics
from saliency_audit.transforms.io import progress
from saliency_audit.transforms.io.records import ErrorRecord, ImageBatch, seed_for
from saliency_audit.transforms.io.rows import extra_value, map_problems, map_statistics
from saliency_audit.transforms.model.handler import (
    ALL,
    DEVICE,
    HTTP,
    MODEL_CALLS,
    NOT_COUNTED,
    ExplainConfig,
    _http,
    build_explainers,
    choose_targets,
    ground_truth,
    localisation,
    metric_value,
    predict,
)
from saliency_audit.transforms.model.threads import apply_threads
from saliency_audit.transforms.read import ERRORS
from saliency_audit.transforms.skip_explained import SKIPPED


class ExplainBatches(beam.DoFn):
    """ImageBatch -> one saliency row per (image, method); failures to ``errors``.

    The model is loaded once per worker process through Beam's Shared handle and never
    per element. Gradients are enabled here on purpose: Beam's RunInference wraps
    inference in torch.no_grad(), which gradient explainers cannot run under.
    """

    def __init__(self, config: ExplainConfig, shared_handle: shared.Shared):
        self.config, self._shared = config, shared_handle

    def setup(self):
        config = self.config
        apply_threads(config.threads.resolve())
        self._state = self._shared.acquire(lambda: build_explainers(config), tag=repr(config))

    def process(self, batch: ImageBatch):
        state = self._state
        with state.lock:
            before, http = self._calls(), _http(state.model)
            outputs = list(self._explain_batch(batch))
            after, http_after = self._calls(), _http(state.model)
        if after is not None:
            yield beam.pvalue.TaggedOutput(MODEL_CALLS, (ALL, after[0] - before[0], after[1] - before[1]))
            progress.model_asked(self.config.progress, "*", after[1] - before[1])
        else:  # a model that takes no hook (TorchScript): say so, rather than count nothing
            yield beam.pvalue.TaggedOutput(MODEL_CALLS, (NOT_COUNTED, 1, 0))
        if http_after != http:
            yield beam.pvalue.TaggedOutput(MODEL_CALLS, (HTTP, http_after[0] - http[0], http_after[1] - http[1]))
        progress.images_explained(self.config.progress, len(batch.image_ids))
        yield beam.pvalue.TaggedOutput(DEVICE, str(self._state.device))
        yield from outputs

    def finish_bundle(self):
        progress.flush(self.config.progress)  # the bundle's last counts, not only those of WRITE_S ago

    def _calls(self) -> tuple[int, int] | None:
        counter = getattr(self._state, "counter", None)  # (a state built by hand, in tests, has none)
        return counter.snapshot() if counter is not None else None

    def _explain_batch(self, batch: ImageBatch):
        state, config = self._state, self.config
        images = torch.from_numpy(batch.pixels).to(state.device)
        try:
            logits, probabilities, predicted = predict(state.model, images)
        except Exception:
            # Alone, one at a time: a record the model fails on (an endpoint that keeps refusing
            # it) costs that record, not its batch.
            answered = []
            for i, (image_id, source) in enumerate(zip(batch.image_ids, batch.sources)):
                try:
                    answered.append((i, predict(state.model, images[i:i + 1])))
                except Exception as e:
                    yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(
                        image_id, source, "model", f"model forward failed: {type(e).__name__}: {e}"))
            if not answered:
                return
            keep = [i for i, _ in answered]
            batch = batch.take(keep)
            images = images[keep]
            logits, probabilities, predicted = (torch.cat(parts) for parts in zip(*(p for _, p in answered)))
        # A non-finite output costs that image only: its maps and scores would be NaN too.
        finite = (torch.isfinite(logits).all(dim=1) & torch.isfinite(probabilities).all(dim=1)).tolist()
        targets, reasons = choose_targets(config.target, predicted, batch.labels, probabilities.shape[1])
        keep = []
        for i, reason in enumerate(reasons):
            if not finite[i]:
                stage, reason = "model", "model output (logits or probabilities) is not finite"
            elif reason is None:
                keep.append(i)
                continue
            else:
                stage = "target"
            yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(batch.image_ids[i], batch.sources[i], stage, reason))
        if not keep:
            return
        index = torch.tensor(keep, device=images.device)
        images, targets = images[index], targets[index]
        seeds = torch.tensor([seed_for(batch.image_ids[i], config.seed) for i in keep], dtype=torch.int64)
        reference = self._random_reference(images, targets, seeds) if config.metrics else None
        for name, explainer in state.explainers.items():
            if batch.skip is None:
                yield from self._explain_method(name, explainer, batch, keep, images, targets, seeds,
                                                probabilities, predicted, reference)
                continue
            # an incremental audit: only the images whose history lacks this method
            chosen = [j for j, i in enumerate(keep) if name not in batch.skip[i]]
            if len(chosen) < len(keep):
                yield beam.pvalue.TaggedOutput(SKIPPED, ((name, batch.sources[0]), len(keep) - len(chosen)))
            if chosen:
                rows = torch.tensor(chosen, device=images.device)
                yield from self._explain_method(
                    name, explainer, batch, [keep[j] for j in chosen], images[rows], targets[rows], seeds[chosen],
                    probabilities, predicted, None if reference is None else {k: v[chosen] for k, v in reference.items()})

    def _metric_kwargs(self, seeds):
        return {"steps": self.config.metric_steps, "substrate": self.config.metric_substrate, "seeds": seeds}

    def _random_reference(self, images, targets, seeds) -> dict[str, torch.Tensor]:
        """Deletion/insertion AUCs of a random pixel order: the level a map must beat."""
        maps = quality.random_maps(images.shape[:1] + images.shape[2:], seeds, device=images.device)
        kwargs = self._metric_kwargs(seeds)
        return {"deletion_auc_random": quality.deletion_auc(self._state.model, images, maps, targets, **kwargs),
                "insertion_auc_random": quality.insertion_auc(self._state.model, images, maps, targets, **kwargs)}

    def _metrics(self, images, maps, targets, seeds) -> dict[str, torch.Tensor]:
        kwargs = self._metric_kwargs(seeds)
        return {"deletion_auc": quality.deletion_auc(self._state.model, images, maps, targets, **kwargs),
                "insertion_auc": quality.insertion_auc(self._state.model, images, maps, targets, **kwargs),
                "gini": quality.gini(maps)}

    def _explain_method(self, name, explainer, batch, keep, images, targets, seeds, probabilities, predicted,
                        reference):
        outcomes = []  # (position in keep, Explanation, index in it, ms per image)
        before = self._calls()
        try:
            start = time.perf_counter()
            result = explainer.explain(images, targets, seeds)
            ms = 1000 * (time.perf_counter() - start) / len(keep)
            outcomes = [(j, result, j, ms) for j in range(len(keep))]
        except Exception:
            # Isolate the failing images: explain one at a time, so one bad image does
            # not cost the whole batch.
            for j, i in enumerate(keep):
                try:
                    start = time.perf_counter()
                    single = explainer.explain(images[j:j + 1], targets[j:j + 1], seeds[j:j + 1])
                    outcomes.append((j, single, 0, 1000 * (time.perf_counter() - start)))
                except Exception as e:  # stage model: the model could not be asked (an endpoint down)
                    yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(
                        batch.image_ids[i], batch.sources[i], getattr(e, "stage", "explain"),
                        f"{type(e).__name__}: {e}", name))
        after = self._calls()
        if after is not None:
            yield beam.pvalue.TaggedOutput(MODEL_CALLS, (name, after[0] - before[0], after[1] - before[1]))
            progress.model_asked(self.config.progress, name, after[1] - before[1])
        if not outcomes:
            return
        # One array and one set of statistics for the batch's maps, not per row. A map with NaN or
        # inf costs that image and method; the metrics never see it.
        arrays = torch.stack([result.maps[k] for _, result, k, _ in outcomes]).detach().float().cpu().numpy()
        statistics = map_statistics(arrays)
        stored = []
        for n, (outcome, problem) in enumerate(zip(outcomes, map_problems(arrays, statistics))):
            if problem is None:
                stored.append((n, outcome))
            else:
                i = keep[outcome[0]]
                yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(batch.image_ids[i], batch.sources[i], "explain",
                                                                   problem, name))
        scores = {}
        truth = ground_truth(batch, keep, images.device)
        if stored and (reference is not None or self.config.abele is not None or self.config.road
                       or truth is not None):
            done = [outcome[0] for _, outcome in stored]
            maps = torch.from_numpy(arrays[[n for n, _ in stored]]).to(images.device)
            scores = self._scores(explainer, done, maps, keep, images, targets, seeds, predicted, reference, truth)
        for n, (j, result, k, ms) in stored:
            row = self._row(name, batch, keep[j], result, k, targets[j], seeds[j], probabilities, predicted, ms,
                            arrays[n], {key: float(values[n]) for key, values in statistics.items()})
            row.update(scores.get(j, {}))
            yield row

    def _scores(self, explainer, done, maps, keep, images, targets, seeds, predicted, reference, truth):
        """{position in keep: {metric: value}} for the explained images. A metric that fails
        on the batch is retried per image, and an image it still fails on gets nulls: a
        metric costs a value, never the row or the run."""
        try:
            return self._batch_scores(explainer, done, maps, keep, images, targets, seeds, predicted, reference, truth)
        except Exception:
            scores = {}
            for n, j in enumerate(done):
                try:
                    scores.update(self._batch_scores(explainer, [j], maps[n:n + 1], keep, images, targets, seeds,
                                                     predicted, reference, truth))
                except Exception:
                    scores[j] = {}
            return scores

    def _batch_scores(self, explainer, done, maps, keep, images, targets, seeds, predicted, reference, truth):
        metrics = {}
        if self.config.road:
            curves = quality.road(self._state.model, images[done], maps, targets[done], seeds=seeds[done])
            metrics.update(road_morf_auc=curves.morf_auc, road_lerf_auc=curves.lerf_auc, road_gap=curves.gap)
        if truth is not None:
            metrics.update(localisation(maps, *(part[done] for part in truth)))
        if reference is not None:
            metrics.update(self._metrics(images[done], maps, targets[done], seeds[done]))
            metrics.update({key: values[done] for key, values in reference.items()})
        if self.config.abele is not None:
            metrics.update(abele_metrics(
                self._state.model, lambda x, t, s: explainer.explain(x, t, s).maps, images[done], maps,
                targets[done], predicted[[keep[j] for j in done]], seeds[done], self.config.abele,
                chunk=len(keep)))
        return {j: {key: metric_value(values[n]) for key, values in metrics.items()} for n, j in enumerate(done)}

    def _row(self, name, batch, i, result, k, target, seed, probabilities, predicted, ms, saliency, statistics):
        target = int(target)
        row = {
            "image_id": batch.image_ids[i], "source": batch.sources[i], "label": batch.labels[i],
            "content_sha256": batch.content_sha256[i] if batch.content_sha256 else None,
            "method": name, "method_fingerprint": self.config.fingerprints.get(name), "target": target, "predicted": int(predicted[i]),
            "score": float(probabilities[i, target]), "predicted_score": float(probabilities[i, predicted[i]]),
            "height": saliency.shape[0], "width": saliency.shape[1],
            "original_height": batch.sizes[i][0], "original_width": batch.sizes[i][1],
            "saliency": saliency.reshape(-1), "time_ms": float(ms), "seed": int(seed), **statistics,
        }
        for extra, values in result.extras.items():
            row[extra] = extra_value(values[k])
        return row
