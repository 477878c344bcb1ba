"""Command-line options of the audit job; everything not listed here goes to Beam."""
from __future__ import annotations

import argparse
import json

DEFAULT_METHODS = "sal,grad,intg,deeplift"


class UsageError(Exception):
    """A bad invocation: reported in one line, before any work starts."""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W, got {text!r}") from None
    return h, w


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _target(text: str) -> str:
    if text in ("predicted", "label") or text.lstrip("-").isdigit():
        return text
    raise argparse.ArgumentTypeError(f"--target must be predicted, label or a class index, got {text!r}")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--input", required=True, help="glob of shards on any fsspec URL (.tar, .parquet, .png/.jpg/.npy)")
    add("--model", required=True, help="TorchScript file, torch.export .pt2 archive, or module:Callable")
    add("--weights", help="state dict for --model module:Callable (loaded with weights_only=True)")
    add("--trust-model", action="store_true", help="allow model files that need arbitrary unpickling")
    add("--methods", default=DEFAULT_METHODS, help=f"comma list of methods (default {DEFAULT_METHODS})")
    add("--output", required=True, help="output directory (any fsspec URL)")
    add("--target", type=_target, default="predicted", help="predicted | label | INT (default predicted)")
    add("--batch-size", type=int, default=32, help="images per batch (default 32)")
    add("--limit-per-shard", type=int, metavar="N",
        help="read only the first N records of every shard (a deterministic sample)")
    add("--device", default="auto", help="cpu | cuda | auto (default auto)")
    add("--metrics", dest="metrics", action="store_true", default=True,
        help="compute explanation-quality metrics (default on)")
    add("--no-metrics", dest="metrics", action="store_false", help="skip the metrics")
    add("--metric-steps", type=int, default=16,
        help="deletion/insertion steps (default 16: 2 x 17 forward passes per map)")
    add("--metric-substrate", default="zero", choices=("zero", "blur", "mean"),
        help="what deleted pixels become in deletion/insertion (default zero)")
    add("--abele-metrics", action="store_true",
        help="also ABELE's relevance, coherence and stability per image (costly: about --abele-neighbours "
             "times each method's own cost)")
    add("--abele-neighbours", type=int, default=20,
        help="salt-and-pepper copies for stability, and at most this many same-class batch images for "
             "coherence (default 20, as ABELE)")
    add("--sanity-check", action="store_true",
        help="after the job: cascading randomisation of the model's layers (Adebayo et al. 2018) on a sample")
    add("--sanity-images", type=int, default=16,
        help="images in the sanity check: the first N decodable ones in shard order (default 16)")
    add("--sanity-threshold", type=float, default=0.5,
        help="flag a method whose mean rank correlation with the fully randomised model's maps stays "
             "above this (default 0.5)")
    add("--method-options", type=_json_object, default={},
        help='per-method options, e.g. \'{"intg": {"n_steps": 32}}\'')
    add("--aae", help="adversarial autoencoder for abele")
    add("--seed", type=int, default=0, help="base seed; each image's seed derives from it and the image id")
    add("--storage-options", type=_json_object, default={},
        help='fsspec storage options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    add("--resize", type=_size, help="resize images to H,W (bilinear, antialiased)")
    add("--mean", type=_floats, help="per-channel mean subtracted after scaling to [0,1]")
    add("--std", type=_floats, help="per-channel std divided by after subtracting the mean")
    add("--channels", type=int, choices=(1, 3), help="channels the model takes")
    add("--to-grayscale", action="store_true", help="convert RGB images for a 1-channel model")
    add("--max-pixels", type=int, default=4096 * 4096, help="reject larger images (default 4096*4096)")
    add("--output-files", type=int, help="Parquet files per output (default: one per input shard, at most 256)")


def parse_run_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options and the remaining arguments, which are Beam pipeline options."""
    parser = argparse.ArgumentParser(prog="saliency-audit run", description="Run a saliency audit.")
    add_run_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.limit_per_shard is not None and args.limit_per_shard < 1:
        parser.error("--limit-per-shard must be at least 1")
    if args.abele_neighbours < 1 or args.sanity_images < 1:
        parser.error("--abele-neighbours and --sanity-images must be at least 1")
    return args, beam_args
