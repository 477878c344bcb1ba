"""The job's accounts: the small facts the launcher reads back after the job (how many records
were read, the committed files of each output, the model calls, the skipped work, the devices,
the extra targets, what the workers changed to fit), gathered by one combiner and written as one
JSON file each into the run's private folder.

One combiner for all of them, not one per fact: each Beam CombineGlobally is nine steps of the
graph, and constructing and starting the graph is the job's fixed cost (the facts were ten
combiners, 90 of the job's 158 steps: about a second of every run, whatever its size)."""
from __future__ import annotations

from typing import Any, Callable

import apache_beam as beam

from saliency_audit.transforms.io import storage


class Fact:
    """How a fact's entries merge, and the JSON written from the merged value."""

    def __init__(self, empty: Callable[[], Any], add: Callable[[Any, Any], Any], merge: Callable[[Any, Any], Any],
                 to_json: Callable[[Any], Any]) -> None:
        self.empty, self.add, self.merge, self.to_json = empty, add, merge, to_json


def _merge_keyed(pick: Callable[[Any, Any], Any]) -> Callable[[dict, dict], dict]:
    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for key, value in b.items():
            out[key] = pick(out[key], value) if key in out else value
        return out
    return merge


def _add_keyed(pick: Callable[[Any, Any], Any]) -> Callable[[dict, tuple], dict]:
    def add(state: dict, entry: tuple) -> dict:
        key, value = entry
        state[key] = pick(state[key], value) if key in state else value
        return state
    return add


def _sum_tuples(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


def count(to_json: Callable[[int], Any]) -> Fact:
    """Entries are ints, summed."""
    return Fact(lambda: 0, lambda n, v: n + v, lambda a, b: a + b, to_json)


def per_key(pick: Callable[[Any, Any], Any], to_json: Callable[[dict], Any]) -> Fact:
    """Entries are (key, value); values of one key combined by ``pick``."""
    return Fact(dict, _add_keyed(pick), _merge_keyed(pick), to_json)


def _added(values: set, value) -> set:
    values.add(value)  # in place: a copy per entry would grow with the square of the run's files
    return values


def distinct() -> Fact:
    """Entries are strings; the sorted list of the distinct ones."""
    return Fact(set, _added, lambda a, b: a | b, sorted)


OUTPUTS = ("saliency", "summary", "errors")
FACTS: dict[str, Fact] = {
    "read.json": count(lambda n: {"read": n}),
    "targets.json": count(lambda n: {"extra": n}),
    "model-calls.json": per_key(_sum_tuples, lambda calls: sorted([key, *value] for key, value in calls.items())),
    "skipped.json": per_key(lambda a, b: a + b,
                            lambda pairs: sorted([method, shard, n] for (method, shard), n in pairs.items())),
    "adapted.json": per_key(min, lambda pairs: dict(sorted(pairs.items()))),  # each method's smallest batch
    "devices.json": distinct(),
    **{f"files-{name}.json": distinct() for name in OUTPUTS},  # what committed bundles wrote: the run's result
}


class _Combine(beam.CombineFn):
    def create_accumulator(self):
        return {}

    def add_input(self, accumulator, entry):
        name, value = entry
        accumulator[name] = FACTS[name].add(accumulator.get(name, FACTS[name].empty()), value)
        return accumulator

    def merge_accumulators(self, accumulators):
        out: dict = {}
        for accumulator in accumulators:
            for name, state in accumulator.items():
                out[name] = FACTS[name].merge(out[name], state) if name in out else state
        return out

    def extract_output(self, accumulator):
        return {name: fact.to_json(accumulator.get(name, fact.empty())) for name, fact in FACTS.items()}


def entries(name: str) -> beam.PTransform:
    """Values of one fact -> ledger entries."""
    if name not in FACTS:
        raise KeyError(name)
    return beam.Map(lambda value: (name, value))


class WriteLedger(beam.PTransform):
    """Ledger entries (fact name, value), flattened from every branch -> one JSON file per fact
    (written when the job has seen them all, each one even where no entry came: 0, [], {})."""

    def __init__(self, private: Callable[[str], str], storage_options: dict[str, Any]) -> None:
        super().__init__()
        self.urls = {name: private(name) for name in FACTS}  # the run's private folder: Run.private
        self.storage_options = storage_options

    def expand(self, entries_):
        return (entries_ | "Combine" >> beam.CombineGlobally(_Combine())
                | "Write" >> beam.Map(_write_all, self.urls, self.storage_options))


def _write_all(documents: dict[str, Any], urls: dict[str, str], storage_options: dict[str, Any]) -> None:
    for name, document in documents.items():
        storage.write_json_atomic(urls[name], document, storage_options)
