"""The saliency-audit command line."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
DEMO_SHARD = DEMO_DATA / "mnist-test-sample.tar"
DEMO_WEIGHTS = DEMO_DATA / "mnist_cnn.pt"
DEMO_MODEL = "saliency_audit.pipelines.training.reference_model:mnist_cnn"
DEMO_AAE = DEMO_DATA / "mnist_aae.pt"
# The columns of ABELE's comparison figure first (abele, lime, sal, elrp, grad, intg), then the rest
# of the families.
DEMO_METHODS = "abele,lime,sal,elrp,grad,intg,deeplift,anchor,lore"
# The default demo is for a first look: a report in about a minute on 2 cores. 24 digits (the
# figure's 9 and 0 among them), a sanity check on 4, and smaller search budgets for the four
# black-box methods, which cost 99% of the full demo's time; on these digits their maps delete as
# fast as at the defaults. The sanity check's randomised models are what make them costly: no anchor
# reaches its precision there, so anchor grows rules to every size (20x its cost on the trained model).
DEMO_LIMIT = 24
DEMO_SANITY_IMAGES = 4
DEMO_BUDGETS = {"abele": {"neighbours": 300, "max_attempts": 300}, "lime": {"n_samples": 300},
                "anchor": {"max_anchor_size": 3, "coverage_samples": 1000}, "lore": {"population_size": 300}}
# demo --full: the published comparison, every method at its defaults (about 8.5 minutes on 2 cores).
DEMO_FULL_LIMIT = 100
DEMO_FULL_SANITY_IMAGES = 8


class _Parser(argparse.ArgumentParser):
    """allow_abbrev=False: a prefix such as --storage-opt would otherwise be taken for the full
    flag. Rejected arguments are echoed with secrets redacted (they may be misspelt credentials)."""

    def __init__(self, prog: str, description: str):
        super().__init__(prog=f"saliency-audit {prog}", description=description, allow_abbrev=False)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            from saliency_audit.pipelines.config.options import redact_argv
            self.error(f"unrecognized arguments: {' '.join(redact_argv(extras))}")
        return parsed


class _OneLine(_Parser):
    """A bad command line as one line (exit 2 in the command), as run reports it."""

    def error(self, message: str):
        from saliency_audit.pipelines.config import UsageError
        raise UsageError(message)


def _location(text: str) -> str:
    from saliency_audit.pipelines.config.kinds import location
    return location(text)


def _storage_options(parser: argparse.ArgumentParser) -> None:
    from saliency_audit.explainers.core.paths import keep_secret
    from saliency_audit.pipelines.config.kinds import json_object

    def secret_object(text: str) -> dict:  # its values are redacted from every message (paths.keep_secret)
        value = json_object(text)
        keep_secret(value)
        return value
    parser.allow_abbrev = False  # every parser that takes credentials refuses prefix spellings
    parser.add_argument("--storage-options", type=secret_object, default={},
                        help="fsspec storage options as a JSON object")


def cmd_run(argv: list[str]) -> int:
    from saliency_audit.pipelines import audit
    return audit.main(argv)


def cmd_demo(argv: list[str]) -> int:
    parser = _Parser("demo", f"Audit the bundled MNIST sample with the bundled model: {DEMO_LIMIT} digits, "
                     "nine methods, the black-box ones at smaller budgets (--full: the full comparison). "
                     "Any other run option passes through to run.")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--full", action="store_true",
                        help=f"the full comparison: {DEMO_FULL_LIMIT} digits, sanity check on "
                             f"{DEMO_FULL_SANITY_IMAGES}, every method at its defaults (about 8.5 minutes on 2 cores)")
    parser.add_argument("--methods", default=DEMO_METHODS, help=f"default {DEMO_METHODS}")
    parser.add_argument("--no-sanity-check", dest="sanity_check", action="store_false",
                        help="skip the sanity check (on by default in the demo)")
    parser.add_argument("--limit-per-shard", type=int,
                        help=f"digits to audit, of the 300 bundled (default {DEMO_LIMIT}, "
                             f"{DEMO_FULL_LIMIT} with --full)")
    parser.add_argument("--method-options",
                        help="as for run; without --full, merged over the demo's smaller budgets per method")
    parser.add_argument("--aae", default=str(DEMO_AAE), help="abele's autoencoder (default: the bundled one)")
    args, rest = parser.parse_known_args(argv)
    from saliency_audit.pipelines import audit
    methods = [m.strip() for m in args.methods.split(",")]
    limit = args.limit_per_shard if args.limit_per_shard is not None else (
        DEMO_FULL_LIMIT if args.full else DEMO_LIMIT)
    sanity = ["--sanity-check", "--sanity-images",
              str(DEMO_FULL_SANITY_IMAGES if args.full else DEMO_SANITY_IMAGES)] if args.sanity_check else []
    # One torch thread (a --torch-threads in the arguments overrides it): the demo's CNN and AAE are
    # too small for intra-op parallelism, and a second thread mostly spins, most of all on a shared
    # machine (abele: 1.75 CPU-s per digit with one thread, 12.7 with two, on a busy 2-core machine).
    threads = ["--torch-threads", "1"]
    code = audit.main(["--input", str(DEMO_SHARD), "--model", DEMO_MODEL, "--weights", str(DEMO_WEIGHTS),
                       "--methods", args.methods, "--output", args.output, "--channels", "1",
                       "--device", "cpu", "--limit-per-shard", str(limit),
                       *(["--aae", args.aae] if "abele" in methods else []),
                       *_demo_method_options(methods, args.method_options, args.full),
                       *sanity, *threads, *rest])
    if code != 0 or "--dry-run" in rest:  # a dry run wrote nothing to report on
        return code
    from saliency_audit.pipelines.reporting.audit_dir import AuditDir
    from saliency_audit.pipelines.reporting.figure import example_ids, save_figure
    from saliency_audit.pipelines.reporting.report import write_report
    from saliency_audit.transforms.io import storage
    report = write_report(args.output, storage.join(args.output, "report.html"))
    finished = AuditDir(args.output)
    figure = save_figure(finished, example_ids(finished), storage.join(args.output, "figure.png"))
    print(f"report: {report}\nfigure: {figure}")
    return 0


def _demo_method_options(methods: list[str], given: str | None, full: bool) -> list[str]:
    """--method-options for the demo's run: the small budgets of the methods it runs (none with
    --full), the user's options over them. Text that is not a JSON object goes to run as it is, to be
    refused there in run's one line."""
    import json
    options = {} if full else {m: dict(DEMO_BUDGETS[m]) for m in methods if m in DEMO_BUDGETS}
    if given is not None:
        try:
            user = json.loads(given)
        except ValueError:
            return ["--method-options", given]
        if not isinstance(user, dict):
            return ["--method-options", given]
        for name, values in user.items():  # run refuses what is wrong here (a method not run, not an object)
            options[name] = {**options.get(name, {}), **values} if isinstance(values, dict) else values
    return ["--method-options", json.dumps(options)] if options else []


def cmd_shards(argv: list[str]) -> int:
    parser = _Parser("shards", "Turn MNIST-format IDX files into WebDataset tar shards.")
    parser.add_argument("--from-idx", required=True, help="IDX images file (.gz or plain)")
    parser.add_argument("--labels", help="IDX labels file (.gz or plain)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--prefix", help="shard and key prefix (default: from the file name)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    args = parser.parse_args(argv)
    import numpy as np

    from saliency_audit.pipelines.training.mnist import read_idx, write_tar_shards
    images = read_idx(args.from_idx)
    if images.ndim != 3:
        raise ValueError(f"{args.from_idx} is not an IDX image file (shape {images.shape})")
    labels = read_idx(args.labels) if args.labels else np.full(len(images), -1, dtype=np.int64)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    prefix = args.prefix or Path(args.from_idx).name.split("-")[0]
    paths = write_tar_shards(images, labels, args.output, args.shard_size, prefix)
    print(f"wrote {len(images)} images in {len(paths)} shard(s) to {args.output}")
    return 0


def cmd_train_classifier(argv: list[str]) -> int:
    parser = _Parser("train-classifier", "Train a small reference classifier (a CNN, a ViT or a ConvNeXt) on 28x28 "
                                         "grayscale shards.")
    parser.add_argument("--input", required=True, help="glob of labelled training shards")
    parser.add_argument("--output", required=True, help="where to write the state dict")
    parser.add_argument("--test", help="glob of labelled test shards to report accuracy on")
    parser.add_argument("--architecture", choices=("cnn", "vit", "convnext"), default="cnn",
                        help="cnn (default), vit or convnext (these two need transformers)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int, default=0)
    _storage_options(parser)
    args = parser.parse_args(argv)
    import torch

    from saliency_audit.pipelines.training.classifier import evaluate, train_classifier
    from saliency_audit.pipelines.training.dataset import load_labelled
    from saliency_audit.transforms.io.preprocess import Preprocessing
    options = args.storage_options
    prep = Preprocessing(resize=(28, 28), channels=1, to_grayscale=True)
    images, labels, skipped = load_labelled(args.input, prep, options)
    print(f"training on {len(images)} images" + (f" ({len(skipped)} skipped, first: {skipped[0]})" if skipped else ""))
    kwargs = {"epochs": args.epochs} if args.epochs else {}
    model = train_classifier(images, labels, seed=args.seed, architecture=args.architecture, **kwargs)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.output)
    print(f"training accuracy {evaluate(model, images, labels):.4f}")
    if args.test:
        test_images, test_labels, _ = load_labelled(args.test, prep, options)
        print(f"test accuracy {evaluate(model, test_images, test_labels):.4f} on {len(test_images)} images")
    factory = DEMO_MODEL.replace(":mnist_cnn", f":mnist_{args.architecture}")
    print(f"saved {args.output}; use it with --model {factory} --weights {args.output}")
    return 0


def cmd_train_aae(argv: list[str]) -> int:
    from saliency_audit.pipelines.config.kinds import floats, size
    parser = _Parser("train-aae", "Train the adversarial autoencoder that abele needs (--aae).")
    parser.add_argument("--input", required=True, help="glob of image shards (labels are not needed)")
    parser.add_argument("--output", required=True, help="checkpoint path; written every epoch, resumed from")
    parser.add_argument("--latent-dim", type=int, help="code size (default 4 for grey images, 16 for colour)")
    parser.add_argument("--architecture", choices=("conv", "mlp"), help="default conv where the size allows")
    parser.add_argument("--hidden", type=lambda t: tuple(int(v) for v in t.split(",")),
                        help="conv channels per block or mlp widths, e.g. 32,64")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--adv-weight", type=float, default=0.001, help="weight of the adversarial loss")
    parser.add_argument("--holdout", type=float, default=0.05,
                        help="share of images held out for the report (at most 1000)")
    parser.add_argument("--shuffle-buffer", type=int, default=4096,
                        help="images held for shuffling while the shards stream (capped at 256 MB of images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if --output exists")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="as for run: prepare images as the model does")
    parser.add_argument("--resize", type=size)
    parser.add_argument("--mean", type=floats)
    parser.add_argument("--std", type=floats)
    parser.add_argument("--to-grayscale", action="store_true")
    _storage_options(parser)
    args = parser.parse_args(argv)
    from saliency_audit.explainers.blackbox.aae import default_config
    from saliency_audit.pipelines.training.aae import format_report, input_range, scan_shards, train_aae_stream
    from saliency_audit.transforms.io.preprocess import Preprocessing
    from saliency_audit.transforms.model.load import resolve_device
    prep = Preprocessing(resize=args.resize, channels=args.channels, mean=args.mean, std=args.std,
                         to_grayscale=args.to_grayscale)
    # streamed: memory follows --shuffle-buffer and the held-out images, not the dataset
    stream = scan_shards(args.input, prep, args.storage_options, holdout=args.holdout, seed=args.seed,
                         shuffle_buffer=args.shuffle_buffer)
    config = default_config(stream.image_shape, latent_dim=args.latent_dim, architecture=args.architecture,
                            hidden=args.hidden, value_range=input_range(prep, stream.image_shape[0]),
                            preprocessing={k: getattr(prep, k) for k in ("channels", "resize", "mean", "std")})
    skipped = stream.skipped
    print(f"training on {stream.train_count + len(stream.held_keys)} images of {config.describe()}, "
          f"latent size {config.latent_dim}" + (f" ({len(skipped)} skipped, first: {skipped[0]})" if skipped else ""))
    _, report = train_aae_stream(stream, config, output=args.output, epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr, adv_weight=args.adv_weight, seed=args.seed,
                                 device=str(resolve_device(args.device)),
                                 resume=not args.no_resume, progress=not args.no_progress)
    print(format_report(report))
    print(f"saved {args.output}; use it with --methods abele --aae {args.output}")
    return 0


def _comma_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# Storage clients whose errors are not OSError (botocore's EndpointConnectionError, aiohttp's...).
STORAGE_CLIENTS = ("botocore", "aiobotocore", "s3fs", "aiohttp", "gcsfs", "google", "adlfs", "azure", "requests",
                   "urllib3")


@contextlib.contextmanager
def _reading(*places: str):
    """A store that cannot be read fails in one line naming what (main prints an OSError, exit 2),
    not in a traceback per chained cause."""
    try:
        yield
    except Exception as e:
        if type(e).__module__.split(".")[0] not in STORAGE_CLIENTS:
            raise
        raise OSError(f"cannot read {' or '.join(places)}: {type(e).__name__}: "
                      f"{' '.join(str(e).split())[:200]}") from None


def cmd_report(argv: list[str]) -> int:
    parser = _Parser("report", "Write one self-contained HTML page about a finished audit.")
    parser.add_argument("directory", type=_location, help="the audit's --output directory")
    parser.add_argument("--output", type=_location, required=True, help="where to write the HTML file")
    parser.add_argument("--per-class", type=int, default=3, help="gallery images per class (default 3)")
    _storage_options(parser)
    args = parser.parse_args(argv)
    from saliency_audit.pipelines.reporting.report import write_report
    with _reading(args.directory):
        path = write_report(args.directory, args.output, args.storage_options, per_class=args.per_class)
    print(f"report: {path}")
    return 0


def cmd_figure(argv: list[str]) -> int:
    parser = _Parser("figure", "A PNG grid: one row per image, one column per method.")
    parser.add_argument("directory", type=_location, help="the audit's --output directory")
    parser.add_argument("--ids", required=True, help="comma list of image ids, one row each")
    parser.add_argument("--output", type=_location, required=True, help="where to write the PNG")
    parser.add_argument("--methods", help="comma list of methods, in column order (default: the run's)")
    parser.add_argument("--cell", type=int, default=112, help="cell size in pixels (default 112)")
    parser.add_argument("--overlay", action="store_true", help="draw the maps over the images")
    _storage_options(parser)
    args = parser.parse_args(argv)
    from saliency_audit.pipelines.reporting.audit_dir import AuditDir
    from saliency_audit.pipelines.reporting.figure import save_figure
    with _reading(args.directory):
        audit = AuditDir(args.directory, args.storage_options)
        path = save_figure(audit, _comma_list(args.ids), args.output,
                           _comma_list(args.methods) if args.methods else None, cell=args.cell, overlay=args.overlay)
    print(f"figure: {path}")
    return 0


def cmd_diff(argv: list[str]) -> int:
    parser = _Parser("diff", "Compare two audits of the same images, map by map.")
    parser.add_argument("directory_a", type=_location, help="the first audit (e.g. the current model)")
    parser.add_argument("directory_b", type=_location, help="the second audit (e.g. the candidate model)")
    parser.add_argument("--output", type=_location, required=True,
                        help="output directory: diff/ Parquet and diff.html")
    parser.add_argument("--top-k", type=float, default=0.1,
                        help="top-k overlap: a fraction of the pixels (< 1) or a pixel count (default 0.1)")
    parser.add_argument("--show", type=int, default=12, help="images shown in diff.html (default 12)")
    _storage_options(parser)
    args = parser.parse_args(argv)
    from saliency_audit.pipelines.reporting.diff import diff_audits
    with _reading(args.directory_a, args.directory_b):
        result = diff_audits(args.directory_a, args.directory_b, args.output, top_k=args.top_k, show=args.show,
                             storage_options=args.storage_options)
    print(f"diff: {result['pairs']} (image, method) pairs; tables in {result['table']}, page {result['page']}")
    return 0


def cmd_check(argv: list[str]) -> int:
    from saliency_audit.pipelines.config.options import OneSpec
    parser = _OneLine("check", "Evaluate the gates on a finished audit, against a baseline audit; exit 1 if one fails.")
    parser.add_argument("directory", type=_location, help="the audit's --output directory")
    parser.add_argument("--config", action=OneSpec, metavar="SPEC",
                        help="an audit spec: its [gates] and [baseline] tables")
    parser.add_argument("--verdict", type=_location, help="where to write verdict.json (default DIRECTORY/verdict.json)")
    _storage_options(parser)
    from saliency_audit.pipelines.checks import gates
    from saliency_audit.pipelines.config import spec
    from saliency_audit.pipelines.config.options import UsageError
    spec.gate_parser(parser)  # --baseline, --gate NAME=VALUE: as run reads them
    try:
        args = parser.parse_args(argv)
        if args.config:  # the spec's [gates] and [baseline] first, so the flags override them
            read = spec.gate_parser().parse_known_args(spec.spec_arguments(spec.load(args.config), args.config))[0]
            args.gates = [*(read.gates or []), *(args.gates or [])]
            args.baseline = args.baseline or read.baseline
    except UsageError as e:
        print(f"saliency-audit check: error: {e}", file=sys.stderr)
        return 2
    with _reading(args.directory, *([args.baseline] if args.baseline else [])):
        verdict, url = gates.check(args.directory, args.baseline, args.gates, args.verdict, args.storage_options)
    for line in gates.summary_lines(verdict):
        print(line)
    print(f"verdict: {url}")
    return 1 if verdict["status"] == gates.FAIL else 0


def cmd_history(argv: list[str]) -> int:
    parser = _OneLine("history", "List the runs of an audit history (--incremental), one line per slot.")
    parser.add_argument("directory", type=_location, help="the history's root (the runs' --output)")
    parser.add_argument("--json", action="store_true", help="one JSON object per slot instead of the table")
    _storage_options(parser)
    from saliency_audit.pipelines.config import UsageError  # not .options, which imports torch (the run's options)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"saliency-audit history: error: {e}", file=sys.stderr)
        return 2
    import json

    from saliency_audit.transforms.io import history
    left_out: dict[str, str] = {}
    try:
        rows = history.read(args.directory, args.storage_options, left_out)
    except Exception as e:  # noqa: BLE001 - storage errors come in many types (botocore's are not OSError)
        print(f"saliency-audit history: error: cannot read {args.directory}: {type(e).__name__}: "
              f"{' '.join(str(e).split())[:200]}", file=sys.stderr)
        return 2
    for name, why in left_out.items():
        print(f"saliency-audit history: warning: {history.FOLDER}/{name} is left out: {why}", file=sys.stderr)
    if not rows:
        print(f"saliency-audit history: error: {args.directory} holds no audit history "
              f"(no readable {history.FOLDER}/*.parquet)", file=sys.stderr)
        return 2
    for row in rows:
        if args.json:
            print(json.dumps({k: v for k, v in row.items() if k not in ("shard_list", "files")}, default=str))
            continue
        methods = ", ".join(f"{m['method']} {m['explained']}+{m['skipped']} skipped" for m in row["methods"] or [])
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        print(f"{row['slot']}  run {row['run_id']}  model {row['model'][:12]}  read {row['read']}  shards "
              f"{row['shards_read']} read / {row['shards_skipped']} skipped  accuracy {accuracy}  verdict "
              f"{row['verdict'] or '-'}  [{methods}]")
    return 0


def cmd_benchmark(argv: list[str]) -> int:
    from saliency_audit.pipelines import benchmark
    return benchmark.main(argv)


COMMANDS = {
    "run": (cmd_run, "run an audit job (Beam)"),
    "demo": (cmd_demo, "audit the bundled sample with the bundled model"),
    "shards": (cmd_shards, "turn MNIST IDX files into tar shards"),
    "train-classifier": (cmd_train_classifier, "train the reference CNN"),
    "train-aae": (cmd_train_aae, "train the adversarial autoencoder for abele"),
    "benchmark": (cmd_benchmark, "measure each method's throughput against its compute floor"),
    "report": (cmd_report, "one self-contained HTML page about a finished audit"),
    "figure": (cmd_figure, "a PNG grid of maps: one row per image, one column per method"),
    "diff": (cmd_diff, "compare two audits of the same images (e.g. two model versions)"),
    "check": (cmd_check, "evaluate the gates on an audit against a baseline (exit 1 if one fails)"),
    "history": (cmd_history, "list the runs of an audit history (run --incremental), one line per slot"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: saliency-audit COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<18} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nsaliency-audit: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    from saliency_audit.explainers.core.paths import redacted_streams
    with redacted_streams():  # storage clients quote storage-option values in their errors
        try:
            return COMMANDS[argv[0]][0](argv[1:])
        except (ValueError, FileNotFoundError, OSError) as e:
            print(f"saliency-audit {argv[0]}: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
