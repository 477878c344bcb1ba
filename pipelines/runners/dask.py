"""Beam's DaskRunner, with the bugs that stop this job on it (Beam 2.77) worked around.

``--runner DaskRunner`` selects this class (``saliency_audit.pipelines.runners.beam.beam_pipeline_options``). It keeps
Beam's translation of Create, GroupByKey and Flatten to ``dask.bag`` and replaces three things:

1. A ParDo with tagged outputs (``.with_outputs``) sends all of them, tags dropped, to every
   consumer: the read count's ``CombineGlobally(sum)`` receives image batches. Here a ParDo's
   partition holds ``(tag, value)`` pairs and each consumer selects its own tag.
2. Only the last transform's bag is computed ("connected to the full graph", which a pipeline
   with several sinks is not): the other sinks never run. Here every leaf is computed.
3. ``finish_bundle`` outputs are collected before ``finish_bundle`` runs, so they are lost (our
   Parquet sink names its files there); and each task recomputes its side inputs' whole graph
   locally. Here outputs are collected after ``finish_bundle`` and a side input is one dask
   dependency, computed once.

Parallelism comes from ``Create``'s partitions: Beam's ``Reshuffle`` is a no-op on Dask, and its
default of 128 elements per partition would put every shard of a run in one task, so the default
here is one element (one shard) per partition. A partition's output is a list in memory, as in
Beam's runner: on Dask a shard's intermediate results are held whole, so shard size bounds memory.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from apache_beam import DoFn, ParDo, pvalue
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor
from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, Receiver, _OutputHandler
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask import transform_evaluator as beam_ops
from apache_beam.runners.dask.overrides import dask_overrides
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.utils.windowed_value import WindowedValue

MAIN = None  # the tag of a ParDo's main output


@dataclasses.dataclass
class _TagReceiver(Receiver):
    tag: str | None
    out: list

    def receive(self, windowed_value: WindowedValue):
        self.out.append((self.tag, windowed_value.value))


class _Receivers(dict):
    """One receiver per output tag, created when the DoFn first emits to it."""

    def __init__(self, out: list):
        super().__init__()
        self.out = out

    def __missing__(self, tag):
        self[tag] = receiver = _TagReceiver(tag, self.out)
        return receiver


def _run_bundle(items, fn: DoFn, label: str, window_fn, args, kwargs, side_specs, *side_values):
    """One partition through the DoFn as one bundle; returns its outputs as (tag, value)."""
    out: list = []
    receivers = _Receivers(out)
    handler = _OutputHandler(window_fn=window_fn, main_receivers=receivers[MAIN], tagged_receivers=receivers,
                             per_element_output_counter=None, output_batch_converter=None,
                             process_yields_batches=False, process_batch_yields_elements=False)
    side_inputs = [SideInputMap(view, options, [beam_ops.get_windowed_value(v, None) for v in values])
                   for (view, options), values in zip(side_specs, side_values)]
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(fn), handler, context=DoFnContext(label, state=None), side_inputs=side_inputs,
        input_args=list(args), input_kwargs=kwargs, user_state_context=None,
        bundle_finalizer_param=DoFn.BundleFinalizerParam())
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(beam_ops.get_windowed_value(item, window_fn))
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    return out


def _select(partition, tag):
    return [value for t, value in partition if t == tag]


def _concat(partitions: list[list]) -> list:
    return list(itertools.chain.from_iterable(partitions))


class _Visitor(PipelineVisitor):
    """Beam transforms -> dask bags. ``bags[node]`` is the node's bag; a ParDo's holds (tag, value)."""

    def __init__(self, bag_kwargs: dict[str, Any]):
        self.bag_kwargs = bag_kwargs
        self.bags: dict[AppliedPTransform, Any] = {}
        self.consumed: set[AppliedPTransform] = set()

    def bag_of(self, pcoll: pvalue.PValue):
        producer = pcoll.producer
        self.consumed.add(producer)
        bag = self.bags[producer]
        if type(producer.transform) is ParDo:  # exactly: Beam's Dask GroupAlsoByWindow (a subclass) is a no-op
            return bag.map_partitions(_select, pcoll.tag)
        return bag

    def visit_transform(self, node: AppliedPTransform) -> None:
        inputs = [self.bag_of(p) for p in node.inputs if not isinstance(p, pvalue.PBegin)]
        if type(node.transform) is ParDo:
            self.bags[node] = self._par_do(node, inputs[0])
            return
        op = beam_ops.TRANSLATIONS.get(node.transform.__class__, beam_ops.NoOp)(node, bag_kwargs=self.bag_kwargs)
        if isinstance(op, beam_ops.Flatten):
            self.bags[node] = op.apply(inputs)
        else:
            self.bags[node] = op.apply(inputs[0] if inputs else None)

    def _par_do(self, node: AppliedPTransform, input_bag):
        import dask
        transform = node.transform
        args, kwargs = transform.raw_side_inputs
        main = next(iter(node.main_inputs.values()))
        window_fn = main.windowing.windowfn if hasattr(main, "windowing") else None
        specs, values = [], []
        for side in node.side_inputs:
            specs.append((type(side), side._view_options()))  # pylint: disable=protected-access
            values.append(dask.delayed(_concat)(self.bag_of(side.pvalue).to_delayed()))
        return input_bag.map_partitions(_run_bundle, transform.fn, transform.label, window_fn, args, kwargs,
                                        specs, *values)

    def leaves(self) -> list:
        return [bag for node, bag in self.bags.items() if node not in self.consumed]


class DaskRunner(beam_dask.DaskRunner):
    """Beam's DaskRunner with tagged outputs, every sink, finish_bundle outputs and shared side
    inputs working (see the module docstring)."""

    def run_pipeline(self, pipeline, options: PipelineOptions):
        import dask
        import dask.distributed as ddist
        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(drop_default=True, current_only=True)
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)  # pylint: disable=protected-access
        if not bag_kwargs:
            bag_kwargs = {"partition_size": 1}  # one shard per task: Reshuffle does not spread them on Dask
        client = ddist.Client(**dask_options)
        pipeline.replace_all(dask_overrides())
        visitor = _Visitor(bag_kwargs)
        pipeline.visit(visitor)
        # Only the leaves' sizes come back to the client: a sink's output stays on the workers.
        counts = [leaf.count() for leaf in visitor.leaves()]
        futures = client.compute(list(dask.optimize(*counts)))
        return _Result(client, futures)


@dataclasses.dataclass
class _Result(beam_dask.DaskRunnerResult):
    def wait_until_finish(self, duration=None) -> str:
        try:
            return super().wait_until_finish(duration)
        except BaseException:
            # Tasks not yet started must not start writing into a run the launcher is about to
            # remove. A task already running finishes, and its files stay outside any result
            # (readers follow the manifest); nothing removes them yet.
            self.client.cancel(self.futures, force=True)
            raise
        finally:
            self.client.close()
