"""The Beam graph of the job: shards -> batches -> explanations -> Parquet files in the run's folders."""
from __future__ import annotations

import dataclasses
from typing import Any

import apache_beam as beam
from apache_beam.utils import shared

from saliency_audit.pipelines.job import incremental, ledger
from saliency_audit.pipelines.job.findings_step import STATISTICS, GatherFindingStatistics
from saliency_audit.transforms.duplicates import DropRepeatedIds, FirstShardOfRepeatedIds, ListShardIds
from saliency_audit.transforms.explain import ExplainBatches
from saliency_audit.transforms.io import map_storage, progress
from saliency_audit.transforms.io.preprocess import Preprocessing
from saliency_audit.transforms.io.publication import Run
from saliency_audit.transforms.io.records import TARGETS
from saliency_audit.transforms.io.rows import ERROR_SCHEMA, SUMMARY_SCHEMA, saliency_schema
from saliency_audit.transforms.model.handler import ADAPTED, DEVICE, MODEL_CALLS, ExplainConfig
from saliency_audit.transforms.parquet_sink import WriteParquet
from saliency_audit.transforms.read import ERRORS, READ, ReadShardBatches
from saliency_audit.transforms.skip_explained import SKIPPED, ExplainedBefore, SkipExplained
from saliency_audit.transforms.summary import Summarize


def build_pipeline(p: beam.Pipeline, *, shards: list[str], run: Run, config: ExplainConfig, prep: Preprocessing,
                   batch_size: int, storage_options: dict[str, Any], schema=None, map_dtype: str = "float32",
                   limit_per_shard: int | None = None, work: incremental.Work | None = None) -> None:
    """The Beam job: shards -> batches -> explanations -> Parquet files in the run's folders.

    Shards are the unit of parallelism (one reader per shard, batches explained where they are
    read), so nothing between the reader and the sink is held for the whole dataset. An image id
    read from several shards is explained once, from the first of them in shard order. With
    ``work`` (an incremental run) only the shards it needs are read, and only the (image, method)
    pairs the history lacks are explained."""
    schema = schema or saliency_schema(config.methods)
    config = dataclasses.replace(config, progress=progress.sink_for(run),  # workers report to the launcher
                                 fingerprints=work.fingerprints if work is not None else {})
    # decodes ahead in its share of the workers' threads, while the fused explain step runs (transforms.read)
    reader = ReadShardBatches(prep, batch_size, storage_options, limit_per_shard, progress=config.progress,
                              threads=config.threads, device=config.device)
    if work is not None:
        shards = [url for url in shards if url in work.needed]
    shard_urls = p | "Shards" >> beam.Create(shards)
    history_files = work.history_files if work is not None else {}
    listed = (shard_urls | "ListIds" >> ListShardIds(reader, hashes=bool(history_files))
              if len(shards) > 1 or history_files else None)  # the hashes: for the history's skips only
    first_shard = (listed | "FindRepeatedIds" >> FirstShardOfRepeatedIds() if len(shards) > 1
                   else p | "NoRepeatedIds" >> beam.Create([]))  # one shard: the reader keeps ids unique
    done = (listed | "ExplainedBefore" >> ExplainedBefore(history_files, storage_options) if history_files
            else p | "NothingExplainedBefore" >> beam.Create([]))
    batched = (shard_urls
               | "SpreadShards" >> beam.Reshuffle()
               | "ReadAndBatch" >> beam.ParDo(reader).with_outputs(ERRORS, READ, main="batches"))
    unique = (batched.batches
              | "DropRepeatedIds" >> beam.ParDo(DropRepeatedIds(), beam.pvalue.AsDict(first_shard))
              .with_outputs(ERRORS, main="batches"))
    todo = (unique.batches
            | "SkipExplained" >> beam.ParDo(SkipExplained(list(config.methods), work.needed if work else {},
                                                          config.target),
                                            beam.pvalue.AsDict(done)).with_outputs(SKIPPED, TARGETS, main="batches"))
    explained = (todo.batches
                 | "Explain" >> beam.ParDo(ExplainBatches(config, shared.Shared()))
                 .with_outputs(ERRORS, DEVICE, SKIPPED, TARGETS, MODEL_CALLS, ADAPTED, main="rows"))
    facts = [
        (todo[TARGETS], explained[TARGETS]) | "AllTargets" >> beam.Flatten() | "Targets" >> ledger.entries("targets.json"),
        explained[MODEL_CALLS] | "KeyCalls" >> beam.Map(lambda c: ("model-calls.json", (c[0], (c[1], c[2])))),
        (todo[SKIPPED], explained[SKIPPED]) | "AllSkipped" >> beam.Flatten() | "Skipped" >> ledger.entries("skipped.json"),
        # what the workers changed to fit: each method's smallest batch after running out of memory, a compile fallback
        explained[ADAPTED] | "Adapted" >> ledger.entries("adapted.json"),
        explained[DEVICE] | "Devices" >> ledger.entries("devices.json"),
        batched[READ] | "ReadCounts" >> ledger.entries("read.json"),
    ]
    rows = explained.rows
    stored = rows | "StoredMaps" >> beam.Map(map_storage.stored_row, map_dtype)
    # the findings' statistics, from the maps as stored: the launcher reads them, not the maps
    stored | "FindingStatistics" >> GatherFindingStatistics(run.private(STATISTICS), config.target, storage_options)
    files = {
        "saliency": (stored
                     | "WriteSaliency" >> WriteParquet(run.folder("saliency"), schema, storage_options=storage_options)),
        "summary": (rows | "Summarize" >> Summarize(config.target)
                    | "WriteSummary" >> WriteParquet(run.folder("summary"), SUMMARY_SCHEMA,
                                                     storage_options=storage_options)),
        "errors": ((batched.errors, unique.errors, explained.errors) | "AllErrors" >> beam.Flatten()
                   | "ErrorRows" >> beam.Map(dataclasses.asdict)
                   | "WriteErrors" >> WriteParquet(run.folder("errors"), ERROR_SCHEMA, storage_options=storage_options)),
    }
    facts += [urls | f"Committed{name.title()}" >> ledger.entries(f"files-{name}.json")  # the run's result
              for name, urls in files.items()]
    facts | "AllFacts" >> beam.Flatten() | "Ledger" >> ledger.WriteLedger(run.private, storage_options)

