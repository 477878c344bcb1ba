"""The batched explain step: one model per worker, every method and metric on every batch.

The work is the Beam-free BatchHandler's (transforms.model.handler); this DoFn holds it through
Beam's Shared handle, so the model loads once per worker process and never per element, and turns
what it yields into the step's outputs.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.utils import shared

from saliency_audit.transforms.io import progress
from saliency_audit.transforms.io.records import ImageBatch
from saliency_audit.transforms.model.handler import BatchHandler, ExplainConfig, build_explainers
from saliency_audit.transforms.model.threads import apply_threads, device_type


class ExplainBatches(beam.DoFn):
    """ImageBatch -> one saliency row per (image, method); the side outputs by their tags
    (ERRORS, SKIPPED, TARGETS, MODEL_CALLS, DEVICE, ADAPTED)."""

    def __init__(self, config: ExplainConfig, shared_handle: shared.Shared):
        self.config, self._shared = config, shared_handle

    def setup(self):
        config = self.config
        apply_threads(config.threads.split(device_type(config.device))[0])  # the reader's decode pool has the rest
        self.handler = BatchHandler(config, self._shared.acquire(lambda: build_explainers(config), tag=repr(config)))

    def process(self, batch: ImageBatch):
        for tag, value in self.handler.process(batch):
            yield value if tag is None else beam.pvalue.TaggedOutput(tag, value)

    def finish_bundle(self):
        progress.flush(self.config.progress)  # the bundle's last counts, not only those of WRITE_S ago
