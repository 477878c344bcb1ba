"""Hugging Face `transformers` image classifiers as plain logits models.

``--model hf:FOLDER`` names a model folder as ``save_pretrained`` writes it (local or on any fsspec
URL): config.json, the weights in safetensors (one file, or shards and their index) and
preprocessor_config.json. Loading runs no code from the folder and downloads nothing: a config
that asks for the folder's own Python code (``auto_map``) or weights only in pickle form
(``pytorch_model.bin``) is refused unless --trust-model. preprocessor_config.json becomes the run's
preprocessing (``read_processor``), so the user copies no numbers.

The explainers call ``model(x)`` and expect a (batch, classes) tensor; a `transformers` model
takes ``pixel_values=`` and answers an output object. ``LogitsOnly`` bridges the two, and
asks for eager attention so that attention weights exist as tensors (fused kernels never
materialise them, and the methods made for transformers read them).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import tempfile
from typing import Any

import torch
from torch import nn

from saliency_audit.transforms.io import storage
from saliency_audit.transforms.io.preprocess import Preprocessing
from saliency_audit.transforms.model.load import EAGER_WHY, ModelLoadError

CONFIG, PROCESSOR = "config.json", "preprocessor_config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
MAX_JSON_BYTES = 16 << 20  # configs are kilobytes; a larger file is not one
MAX_SIDE = 8192  # pixels: twice the side of the largest image --max-pixels admits by default
# PIL's resampling codes, as image processors store them; the three Preprocessing can express
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
RESAMPLE_NAMES = {1: "LANCZOS", 4: "BOX", 5: "HAMMING"}


class LogitsOnly(nn.Module):
    """``forward(x) -> logits`` over a `transformers` image classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        use_eager(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def use_eager(model: nn.Module) -> str:
    """Switch the model to eager attention where it has a choice; answer what it uses now."""
    config = getattr(model, "config", None)
    if config is None:
        return "none"
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        try:
            setter("eager")
        except (ValueError, TypeError, AttributeError):
            pass  # a model without attention (ConvNeXt, ResNet) has nothing to switch
    return str(getattr(config, "_attn_implementation", None) or "eager")


def attention_entry(model: nn.Module) -> dict[str, str]:
    """What the manifest says of the attention: eager here (for the predictions and the
    explanations alike), and what `transformers` would have chosen unasked (SDPA where the
    model class supports it)."""
    inner = getattr(model, "model", model)
    used = str(getattr(getattr(inner, "config", None), "_attn_implementation", None) or "eager")
    return {"implementation": used, "default": "sdpa" if getattr(type(inner), "_supports_sdpa", False) else "eager",
            "why": EAGER_WHY}


# --- the folder -------------------------------------------------------------------------------------

def _fail(url: str, problem: str) -> ModelLoadError:
    return ModelLoadError(f"Hugging Face model folder {storage.shown(url)}: {problem}")


def _listing(url: str, storage_options: dict | None) -> set[str]:
    """The names of the files directly in the folder."""
    try:
        fs, path = storage.filesystem(url, storage_options)
        if not fs.isdir(path):
            raise _fail(url, "not found (hf:FOLDER names a folder holding config.json and the weights)")
        return {posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True) if e["type"] == "file"}
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - storage clients raise errors of their own types
        raise _fail(url, f"cannot list it: {type(e).__name__}: {' '.join(storage.unquoted(e, url).split())[:200]}") \
            from None


def _read_json(url: str, name: str, storage_options: dict | None) -> Any:
    target = storage.join(url, name)
    try:
        fs, path = storage.filesystem(target, storage_options)
        if fs.size(path) > MAX_JSON_BYTES:
            raise _fail(url, f"{name} is over {MAX_JSON_BYTES >> 20} MiB: not a config")
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except ModelLoadError:
        raise
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested beyond the parser
        raise _fail(url, f"{name} is not valid JSON: {' '.join(str(e).split())[:200]}") from None
    except Exception as e:  # noqa: BLE001 - storage clients raise errors of their own types
        raise _fail(url, f"cannot read {name}: {type(e).__name__}: {' '.join(storage.unquoted(e, target).split())[:200]}"
                    ) from None


def folder_files(url: str, storage_options: dict | None = None, trust: bool = False) -> list[str]:
    """The URLs of the files loading reads: config.json, the safetensors weights (each shard its
    index names, and the index), preprocessor_config.json where there is one, and only with
    ``trust`` pickled weights and the folder's own code. ModelLoadError, in one line, for a
    folder that is missing or incomplete or asks for what needs trust."""
    url = url.rstrip("/")
    if not url:
        raise ModelLoadError("--model hf:FOLDER names no folder")
    if storage.has_query(url):
        raise _fail(url, "a folder URL with a query (a presigned signature, a SAS token) is refused: it would reach "
                         "the manifest; give credentials in --storage-options or the environment")
    names = _listing(url, storage_options)
    if CONFIG not in names:
        raise _fail(url, f"no {CONFIG} in it (save the model with model.save_pretrained(FOLDER))")
    config = _read_json(url, CONFIG, storage_options)
    if not isinstance(config, dict):
        raise _fail(url, f"{CONFIG} is not a JSON object")
    wanted = {CONFIG} | ({PROCESSOR} & names)
    if "auto_map" in config:
        if not trust:
            raise _fail(url, f"{CONFIG} asks for the folder's own Python code (auto_map), which would run when the "
                             "model loads; refused. Pass --trust-model if you trust this folder")
        wanted |= {n for n in names if n.endswith(".py")}
    # a timm_wrapper config hands model_args to timm.create_model, whose checkpoint_path unpickles
    # any file on the machine, outside the folder and without --trust-model
    from saliency_audit.transforms.model.timm_models import FORBIDDEN
    model_args = config.get("model_args")
    reads = sorted(set(model_args) & set(FORBIDDEN)) if isinstance(model_args, dict) else []
    if reads:
        raise _fail(url, f"{CONFIG}: model_args {', '.join(reads)} would read weights from outside the folder; refused")
    if SAFE_INDEX in names:
        wanted |= {SAFE_INDEX} | _shards(url, SAFE_INDEX, names, storage_options)
    elif SAFE_WEIGHTS in names:
        wanted.add(SAFE_WEIGHTS)
    elif PICKLE_WEIGHTS in names or PICKLE_INDEX in names:
        if not trust:
            raise _fail(url, f"its weights are only in pickle form ({PICKLE_WEIGHTS}), which can run code when read; "
                             "refused. Pass --trust-model if you trust this folder, or save it with safetensors "
                             "(model.save_pretrained(FOLDER))")
        wanted |= ({PICKLE_INDEX} | _shards(url, PICKLE_INDEX, names, storage_options)) if PICKLE_INDEX in names \
            else {PICKLE_WEIGHTS}
    else:
        raise _fail(url, f"no weights in it ({SAFE_WEIGHTS}, or shards with {SAFE_INDEX})")
    return [storage.join(url, name) for name in sorted(wanted)]


def _shards(url: str, index: str, names: set[str], storage_options: dict | None) -> set[str]:
    """The weight files a sharded checkpoint's index names: plain names of files in the folder."""
    weight_map = _read_json(url, index, storage_options)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _fail(url, f"{index} has no weight_map")
    shards = set(map(str, weight_map.values()))
    stray = sorted(s for s in shards if s not in names or "/" in s or s.startswith("."))
    if stray:
        raise _fail(url, f"{index} names weight file(s) that are not in the folder: "
                         f"{', '.join(map(repr, stray[:3]))[:200]}")  # repr: a name may hold a line break
    # transformers unpickles any shard not named .safetensors: a safetensors index naming a pickle
    # would read it without --trust-model
    unsafe = sorted(s for s in shards if index == SAFE_INDEX and not s.endswith(".safetensors"))
    if unsafe:
        raise _fail(url, f"{index} names weight file(s) that are not safetensors, which could be read as pickle: "
                         f"{', '.join(map(repr, unsafe[:3]))[:200]}; refused")
    return shards


def _transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded at run time, whatever a config names
    try:
        import transformers
    except ImportError:
        raise ModelLoadError('--model hf:FOLDER needs transformers: pip install "saliency-audit[hf]"') from None
    transformers.utils.logging.disable_progress_bar()  # the run's own progress line is on stderr
    return transformers


def _dtype_argument(transformers) -> str:
    """from_pretrained's dtype argument, given so that the model is float32 whatever config.json's
    dtype says (transformers 5 loads in it by default: a bf16 checkpoint would run the whole audit
    in bf16 while the manifest says fp32); --precision is the one way down. Its name from 4.56 on
    (the old one warns there), ``torch_dtype`` before."""
    from packaging.version import Version
    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


@contextlib.contextmanager
def _quiet(transformers):
    """transformers' own report of the load (a table of missing keys, progress bars) off for the load:
    what matters in it becomes our one line, and a run's log is not the place for the rest."""
    logging, verbosity = transformers.utils.logging, transformers.utils.logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_folder(url: str, storage_options: dict | None = None, trust: bool = False) -> nn.Module:
    """The folder's image classifier, eager attention, as a logits model. Only the files
    ``folder_files`` names are placed (linked, or copied from object storage) in a private
    temporary folder, which `transformers` then reads with local_files_only."""
    files = folder_files(url, storage_options, trust)
    transformers = _transformers()
    with tempfile.TemporaryDirectory(prefix="saliency-audit-hf-") as folder:
        for file_url in files:
            fs, path = storage.filesystem(file_url, storage_options)
            target = os.path.join(folder, posixpath.basename(path))
            try:
                if storage.is_local(fs):
                    os.symlink(os.path.abspath(path), target)
                else:
                    fs.get(path, target)
            except Exception as e:  # noqa: BLE001 - a file gone since the listing, a denied read: one line, not a traceback
                raise _fail(url, f"cannot copy {posixpath.basename(path)}: {type(e).__name__}: "
                                 f"{' '.join(storage.unquoted(e, file_url).split())[:200]}") from None
        try:
            with _quiet(transformers):
                model, info = transformers.AutoModelForImageClassification.from_pretrained(
                    folder, local_files_only=True, trust_remote_code=trust, attn_implementation="eager",
                    output_loading_info=True, **{_dtype_argument(transformers): torch.float32})
        except Exception as e:  # noqa: BLE001 - an unknown model_type, a config that does not fit, bad weights
            raise _fail(url, f"cannot load it: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    # a parameter the weights lack is left at its random initialisation: never audit that
    missing = sorted(info.get("missing_keys") or ()) + [str(m[0]) if isinstance(m, tuple) else str(m)
                                                        for m in info.get("mismatched_keys") or ()]
    if missing:
        raise _fail(url, f"its weights do not fit its config: {len(missing)} parameter(s) missing or of another "
                         f"shape ({', '.join(missing[:3])[:200]})")
    return LogitsOnly(model)


# --- preprocessor_config.json -> Preprocessing --------------------------------------------------------

def folder_preprocessing(url: str, storage_options: dict | None, overridden: set[str]
                         ) -> tuple[dict[str, Any], dict[str, str]]:
    """The folder's preprocessing (``read_processor``) and channels (config.json's num_channels),
    by Preprocessing field, with the file each came from. Without preprocessor_config.json, only
    the channels: the run's flags give the rest."""
    url = url.rstrip("/")
    names = _listing(url, storage_options)
    values, sources = {}, {}
    if "channels" not in overridden and CONFIG in names:
        config = _read_json(url, CONFIG, storage_options)
        channels = config.get("num_channels", 3) if isinstance(config, dict) else 3
        if isinstance(channels, bool) or not isinstance(channels, int) or channels not in (1, 3):
            raise _fail(url, f"{CONFIG}: num_channels {_shown(channels)}: the models audited take 1 or 3 channels")
        values["channels"], sources["channels"] = channels, CONFIG
    if PROCESSOR in names:
        try:
            found = read_processor(_read_json(url, PROCESSOR, storage_options), values.get("channels"), overridden)
        except ValueError as e:
            raise _fail(url, f"{PROCESSOR}: {e}") from None
        values.update(found)
        sources.update(dict.fromkeys(found, PROCESSOR))
    return values, sources


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _switch(processor: dict, key: str, default: bool) -> bool:
    value = processor.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {_shown(value)}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {_shown(value)}")
    return float(value)


def _side(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE:
        raise ValueError(f"{key} must be a whole number of pixels from 1 to {MAX_SIDE}, got {_shown(value)}")
    return value


def _size(value: Any, key: str, square: bool) -> dict[str, int]:
    """A size as image processors store it: {"height", "width"}, {"shortest_edge"}, or an old-style
    number (a square, or the shortest edge for the processors that do not default to squares)."""
    if not isinstance(value, dict):
        side = _side(value, key)
        return {"height": side, "width": side} if square else {"shortest_edge": side}
    if set(value) == {"height", "width"}:
        return {k: _side(value[k], f"{key}.{k}") for k in ("height", "width")}
    if set(value) == {"shortest_edge"}:
        return {"shortest_edge": _side(value["shortest_edge"], f"{key}.shortest_edge")}
    raise ValueError(f"{key} must be {{height, width}} or {{shortest_edge}}, got {_shown(value)} (longest_edge and "
                     "other limits are not supported: give --resize)")


def _channel_values(value: Any, key: str, channels: int | None, positive: bool = False) -> tuple[float, ...]:
    values = value if isinstance(value, list) else [value]
    numbers = tuple(_number(v, key) for v in values)
    if len(numbers) not in {1, channels or 3}:
        raise ValueError(f"{key} has {len(numbers)} values, expected "
                         + ("1" if channels == 1 else f"1 or {channels or 3} (one per channel)"))
    if positive and min(numbers) <= 0:
        raise ValueError(f"{key} values must be positive, got {_shown(value)}")
    return numbers


def read_processor(processor: Any, channels: int | None = None, overridden: set[str] = frozenset()
                   ) -> dict[str, Any]:
    """An image processor's configuration as Preprocessing fields: its resize (``size``: height and
    width, or the shortest edge), its centre crop (``do_center_crop``/``crop_size``, or ConvNeXt's
    ``crop_pct``), its ``resample`` (nearest, bilinear, bicubic), its rescale (which must be to
    [0, 1], as images are decoded) and ``image_mean``/``image_std``. ``overridden`` ("geometry",
    "mean", "std"): left unread, the run's flags give them. ValueError, in one line, for what
    cannot be read or expressed."""
    if not isinstance(processor, dict):
        raise ValueError(f"must be a JSON object, got {_shown(processor)}")
    kind = processor.get("image_processor_type") or processor.get("feature_extractor_type") or ""
    if not isinstance(kind, str):
        raise ValueError(f"image_processor_type must be a name, got {_shown(kind)}")
    convnext = kind.startswith("ConvNext")  # its own resize: crop_pct, and squares from 384 px up
    out: dict[str, Any] = {}
    if "geometry" not in overridden:
        out.update(_geometry(processor, convnext, kind))
    if _switch(processor, "do_pad", False):
        raise ValueError("do_pad: padding is not supported")
    if not _switch(processor, "do_rescale", True):
        raise ValueError("do_rescale is false: the model would take pixel values 0..255, and images are decoded to "
                         "[0, 1]; only rescale_factor 1/255 is supported")
    factor = processor.get("rescale_factor")
    factor = 1 / 255 if factor is None else _number(factor, "rescale_factor")
    if abs(factor * 255 - 1) > 1e-6:
        raise ValueError(f"rescale_factor {_shown(factor)} is not 1/255: images are decoded to [0, 1]")
    if _switch(processor, "do_normalize", True):
        for name, key, positive in (("mean", "image_mean", False), ("std", "image_std", True)):
            if name in overridden:
                continue
            if processor.get(key) is None:
                raise ValueError(f"do_normalize without {key}: give it there, or --{name}")
            out[name] = _channel_values(processor[key], key, channels, positive)
    Preprocessing(channels=channels, **out)  # what it cannot hold together (a crop larger than the resize)
    return out


def _geometry(processor: dict, convnext: bool, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if _switch(processor, "do_resize", True):
        if processor.get("size") is None:
            raise ValueError("do_resize without size: give it there, or --resize")
        size = _size(processor["size"], "size", square=not convnext)
        edge = size.get("shortest_edge")
        if convnext and edge is None:
            raise ValueError(f"size must be {{shortest_edge}} for {kind}, got {_shown(processor['size'])}")
        if convnext and edge < 384:  # ConvNextImageProcessor: shortest edge to edge / crop_pct, then a square crop
            crop_pct = processor.get("crop_pct")
            crop_pct = 224 / 256 if crop_pct is None else _number(crop_pct, "crop_pct")
            if not 0 < crop_pct <= 1:
                raise ValueError(f"crop_pct must be in (0, 1], got {_shown(processor.get('crop_pct'))}")
            if edge / crop_pct > MAX_SIDE:
                raise ValueError(f"size.shortest_edge / crop_pct is {edge / crop_pct:.4g} pixels, over {MAX_SIDE}")
            out["resize_shortest"] = int(edge / crop_pct)
            out["crop"] = (edge, edge)
        elif convnext or edge is None:  # ConvNeXt from 384 px up: warped to a square
            out["resize"] = (edge, edge) if edge is not None else (size["height"], size["width"])
        else:
            out["resize_shortest"] = edge
        resample = processor.get("resample")
        if resample is None:  # the class default: ConvNeXt's bicubic, ViT's (and the base class's) bilinear
            resample = 3 if convnext else 2
        whole = isinstance(resample, int) and not isinstance(resample, bool)
        if not whole or resample not in RESAMPLE:
            name = RESAMPLE_NAMES.get(resample) if whole else None
            raise ValueError(f"resample {_shown(resample)}{f' ({name})' if name else ''} is not supported: 0 "
                             "(nearest), 2 (bilinear) or 3 (bicubic)")
        out["interpolation"] = RESAMPLE[resample]
    if processor.get("crop_pct") is not None and not convnext:
        raise ValueError(f"crop_pct is read as ConvNextImageProcessor reads it, and this is {_shown(kind or 'no')} "
                         "image processor: give --resize")
    if _switch(processor, "do_center_crop", False):
        if "crop" in out:
            raise ValueError("do_center_crop after ConvNeXt's crop_pct crop: two crops are not supported")
        if processor.get("crop_size") is None:
            raise ValueError("do_center_crop without crop_size")
        crop = _size(processor["crop_size"], "crop_size", square=True)
        if "shortest_edge" in crop:
            raise ValueError(f"crop_size must be {{height, width}}, got {_shown(processor['crop_size'])}")
        out["crop"] = (crop["height"], crop["width"])
    return out
