"""Loading the classifier under audit: TorchScript, torch.export archives, module:Callable with a
state dict, a Hugging Face model folder (hf:DIR), a timm architecture (timm:NAME), an ONNX file or
a prediction endpoint."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import pickle
import posixpath
import re
import shutil
import tempfile
import urllib.parse
import warnings
import zipfile
from typing import Any

import fsspec
import torch

from saliency_audit.transforms.io import storage

_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
HF, TIMM = "hf:", "timm:"  # --model prefixes; before the module:Callable reading (timm:NAME, hf:x would fit it)


PROBABILITIES = "probabilities"  # ModelSpec.outputs of a model that answers probabilities, not logits
BINARY_LOGIT = "binary_logit"  # ... of a sigmoid head's single logit


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message says why in one line."""


EAGER_WHY = "eager attention materialises the attention weights the explanations read; fused kernels do not"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from. ``model`` is a TorchScript file, a ``.pt2`` torch.export
    archive, ``package.module:Callable`` returning an nn.Module, ``hf:FOLDER`` (a Hugging Face
    model folder), ``timm:NAME`` (a timm architecture; ``model_options`` its keyword arguments),
    an ONNX file or an http(s):// endpoint; ``weights`` a state dict (torch or safetensors) for
    the callable and timm forms. Files and folders may be on any fsspec URL."""

    model: str
    weights: str | None = None
    trust_model: bool = False
    storage_options: dict[str, Any] | None = None
    endpoint: dict[str, Any] | None = None  # --endpoint-options, for an http(s):// model
    num_classes: int | None = None  # fixed at preflight: an endpoint's every answer must have it
    model_options: dict[str, Any] | None = None  # --model-options: timm.create_model's keyword arguments
    outputs: str = "logits"  # what preflight found the model answers (PROBABILITIES, BINARY_LOGIT): see READINGS

    def is_hf(self) -> bool:
        return self.model.startswith(HF)

    def is_timm(self) -> bool:
        return self.model.startswith(TIMM)

    def is_callable(self) -> bool:
        return not (self.is_hf() or self.is_timm()) and bool(_CALLABLE.match(self.model))

    def is_onnx(self) -> bool:
        return not (self.is_callable() or self.is_hf() or self.is_timm()) and self.model.lower().endswith(".onnx")

    def is_endpoint(self) -> bool:
        return self.model.lower().startswith(("http://", "https://"))

    def is_black_box(self) -> bool:
        """Answers forward passes only: no gradients, no layers."""
        return self.is_onnx() or self.is_endpoint()

    def kind(self) -> str:
        """The form, for the manifest: callable, hf, timm, onnx, endpoint, export (.pt2) or file
        (TorchScript, or a pickled module with --trust-model)."""
        for kind, test in (("endpoint", self.is_endpoint), ("hf", self.is_hf), ("timm", self.is_timm),
                           ("callable", self.is_callable), ("onnx", self.is_onnx)):
            if test():
                return kind
        return "export" if self.model.endswith(".pt2") else "file"

    def files(self) -> list[str]:
        """The files the model is read from (an hf: folder's: the ones loading reads)."""
        if self.is_hf():
            from saliency_audit.transforms.model import hf
            return hf.folder_files(self.model[len(HF):], self.storage_options, self.trust_model)
        own = [] if self.is_callable() or self.is_endpoint() or self.is_timm() else [self.model]
        return [f for f in own + [self.weights] if f]


_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def check_device_name(device: str) -> None:
    """A spelling error fails everywhere, whether or not this machine has the device."""
    if not _DEVICE.match(device):
        raise ModelLoadError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")


def device_available(device: str) -> bool:
    """Whether ``device`` (a valid name) can be used on this machine; auto always can."""
    check_device_name(device)
    if not device.startswith("cuda"):
        return True
    index = int(device.partition(":")[2] or 0)
    return torch.cuda.is_available() and index < torch.cuda.device_count()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not device_available(device):
        found = (f"this machine has {torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available()
                 else "no CUDA device is available")
        raise ModelLoadError(f"--device {device} was requested but {found}")
    return torch.device(device)


def file_sha256(url: str, storage_options: dict | None = None) -> str:
    digest = hashlib.sha256()
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_hashes(spec: ModelSpec) -> dict[str, str]:
    """sha256 of every file the model is made of, keyed by URL (for the manifest): an ONNX graph's
    external data too, or two weight files behind one graph would be one model."""
    data = list(onnx_external_data(spec.model, spec.storage_options).values()) if spec.is_onnx() else []
    return {f: file_sha256(f, spec.storage_options) for f in spec.files() + data}


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 of the loaded model's parameters and buffers (names, dtypes, shapes, bytes): the
    part of its identity that no file may hold (a module:Callable without --weights)."""
    digest = hashlib.sha256()
    if callable(getattr(model, "identity", None)):  # an endpoint: its URL and the version it reports
        digest.update(f"endpoint:{model.identity()};".encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        try:
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        except (RuntimeError, TypeError):  # a tensor kind without a byte view (quantized, sparse)
            digest.update(repr(t.tolist() if t.numel() < 1 << 20 else t.sum().item()).encode())
    return digest.hexdigest()


def model_identity(spec: ModelSpec, state: str) -> str:
    """The model's sha256 for an audit history: its files' contents (not their names or places),
    the callable's name, and ``state`` (state_sha256 of the loaded model)."""
    body = {"callable": spec.model if spec.is_callable() else None,
            "files": sorted(model_hashes(spec).values()), "state": state}
    if spec.is_timm():  # its name and options decide its code (the state, its parameters)
        body["timm"] = {"name": spec.model, "options": spec.model_options or {}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_model_files(spec: ModelSpec) -> None:
    """Fail fast, before any work, if a model file is missing, or named by a URL with a query (a
    presigned signature, a SAS token: a credential the manifest would record with the URL)."""
    for url in spec.files():
        if storage.has_query(url):
            raise ModelLoadError(f"{storage.shown(url)}: a model file URL with a query (a presigned signature, a SAS "
                                 f"token) is refused: it would reach the manifest; give credentials in "
                                 f"--storage-options or the environment")
        try:
            fs, path = fsspec.core.url_to_fs(url, **(spec.storage_options or {}))
            found = fs.isfile(path)
        except Exception as e:  # noqa: BLE001 - storage clients raise errors of their own types
            raise ModelLoadError(f"cannot read model file {storage.shown(url)}: {type(e).__name__}: "
                                 f"{' '.join(storage.unquoted(e, url).split())[:200]}") from None
        if not found:
            raise ModelLoadError(f"model file not found: {storage.shown(url)}")
    if spec.weights and not (spec.is_callable() or spec.is_timm()):
        raise ModelLoadError("--weights needs --model in the module:Callable or timm:NAME form"
                             + (" (an hf: folder holds its own weights)" if spec.is_hf() else ""))
    if spec.model_options and not spec.is_timm():
        raise ModelLoadError("--model-options needs --model timm:NAME (they are timm.create_model's arguments)")
    if spec.endpoint and not spec.is_endpoint():
        raise ModelLoadError("--endpoint-options needs --model http(s)://... (a prediction endpoint)")


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model in eval mode on ``device``, parameters frozen (explainers need input
    gradients only)."""
    check_model_files(spec)
    if spec.is_endpoint():
        from saliency_audit.transforms.model.endpoint import EndpointModel, EndpointOptions
        try:
            model = EndpointModel(spec.model, EndpointOptions.parse(spec.endpoint), spec.num_classes)
        except Exception as e:  # noqa: BLE001 - bad options, a bad URL, the endpoint down (ModelCallError)
            from saliency_audit.transforms.model.endpoint import _shown
            raise ModelLoadError(f"model endpoint {_shown(spec.model)}: {' '.join(str(e).split())[:300]}") from None
    elif spec.is_hf():
        from saliency_audit.transforms.model import hf
        model = hf.load_folder(spec.model[len(HF):], spec.storage_options, spec.trust_model)
    elif spec.is_timm():
        from saliency_audit.transforms.model import timm_models
        state = read_state_dict(spec.weights, spec) if spec.weights else None
        model = timm_models.create(spec.model[len(TIMM):], spec.model_options or {}, state, spec.weights)
    elif spec.is_callable():
        model = _from_callable(spec)
    elif spec.is_onnx():
        model = _from_onnx(spec, device)
    else:
        with _local_copy(spec.model, spec.storage_options) as path:
            model = _from_file(path, spec)
    model = model.to(device)
    try:
        model.eval()
    except NotImplementedError:
        pass  # torch.export graphs keep the mode they were exported in and refuse eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # once: a factory may hand back the same module on every call (functools.cache), loaded again per worker
    if not isinstance(model, torch.jit.ScriptModule) and _own_input not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_own_input)  # (TorchScript takes no hooks: its code is fixed anyway)
    return read_outputs(model, spec.outputs)


def read_as_log_probabilities(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """A forward hook: the logs of a model's probabilities, logits whose softmax gives them back (a
    softmax over the probabilities themselves would flatten every score). Zeros become the log of the
    smallest normal number, finite, so no gradient is NaN."""
    return output.clamp_min(torch.finfo(output.dtype).tiny).log()


def read_as_two_classes(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """A forward hook: a sigmoid head's single logit z [B,1] as two classes' logits (-z/2, z/2), whose
    softmax is (1 - sigmoid(z), sigmoid(z)): class 1 the positive side, class 0's map explaining -z (a
    softmax over the one column would be 1 for every image, and its argmax always 0)."""
    return torch.cat([-output, output], 1) / 2


READINGS = {PROBABILITIES: read_as_log_probabilities, BINARY_LOGIT: read_as_two_classes}  # ModelSpec.outputs


def read_outputs(model: torch.nn.Module, outputs: str) -> torch.nn.Module:
    """The model answering logits [B,K>=2]: its outputs read as READINGS says, by a forward hook (module
    names, which the CAMs' layers are, stay as they were), or a wrapper for TorchScript, which takes none."""
    reading = READINGS.get(outputs)
    if reading is None:
        return model
    if isinstance(model, torch.jit.ScriptModule):
        return _Reading(model, reading)
    if reading not in model._forward_hooks.values():  # a cached module read so already: twice would read [B,4]
        model.register_forward_hook(reading)
    return model


class _Reading(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, reading) -> None:
        super().__init__()
        self.model, self.reading = model, reading

    def forward(self, *args):
        return self.reading(self, args, self.model(*args))


def _own_input(module: torch.nn.Module, args: tuple) -> tuple:
    """The model's tensor arguments as copies. A forward that changes its input in place (x.sub_(mean),
    a first ReLU(inplace=True)) would otherwise rewrite the batch every later method and metric reads,
    silently, and fail every gradient method (an in-place op on a leaf that requires grad)."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _from_callable(spec: ModelSpec) -> torch.nn.Module:
    module_name, _, attr = spec.model.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"cannot import {spec.model}: {e}") from None
    try:
        model = factory()
    except Exception as e:
        raise ModelLoadError(f"{spec.model}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"{spec.model} returned {type(model).__name__}, not a torch.nn.Module")
    if spec.weights:
        load_weights(model, read_state_dict(spec.weights, spec), spec.weights, spec.model)
    return model


def read_state_dict(url: str, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """A state dict from ``url``: a ``.safetensors`` file (tensors only: nothing in it can run), else
    a torch file loaded with weights_only=True (arbitrary unpickling only with --trust-model)."""
    with _local_copy(url, spec.storage_options) as path:
        if urllib.parse.urlsplit(url).path.lower().endswith(".safetensors"):
            from safetensors import SafetensorError
            from safetensors.torch import load_file
            try:
                return load_file(path, device="cpu")
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # truncated, corrupt, not one at all
                raise ModelLoadError(f"cannot read safetensors file {storage.shown(url)}: {type(e).__name__}: "
                                     f"{' '.join(str(e).split())[:200]}") from None
        state = _torch_load(path, spec.trust_model, url)
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise ModelLoadError(f"{url} holds {type(state).__name__}, not a state dict")
    return state


def load_weights(model: torch.nn.Module, state: dict, url: str, name: str) -> None:
    """Every parameter and buffer of ``model`` from ``state``, or one line naming what does not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ModelLoadError(f"weights {url} do not fit {name}: "
                             f"{' '.join(line.strip() for line in first[:3])[:300]}") from None


def model_preprocessing(spec: ModelSpec, overridden: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The preprocessing the model itself names, by Preprocessing field, and the file each value
    came from: an hf: folder's preprocessor_config.json (and config.json's channels), a timm
    architecture's pretrained config; nothing for the other forms. ``overridden`` ("geometry",
    "mean", "std", "channels"): what the run's flags give, not read."""
    if spec.is_hf():
        from saliency_audit.transforms.model import hf
        return hf.folder_preprocessing(spec.model[len(HF):], spec.storage_options, overridden)
    if spec.is_timm():
        from saliency_audit.transforms.model import timm_models
        return timm_models.preprocessing(spec.model[len(TIMM):], spec.model_options or {}, overridden)
    return {}, {}


def loading_entry(spec: ModelSpec, model: torch.nn.Module) -> dict[str, Any]:
    """The manifest's record of how the model was loaded: its form, and for a transformer the
    attention it runs with (eager, so attention weights exist as tensors) and what it would
    use otherwise."""
    entry: dict[str, Any] = {"kind": spec.kind()}
    if spec.is_hf():
        from saliency_audit.transforms.model import hf
        entry["attention"] = hf.attention_entry(model)
    elif spec.is_timm():
        from saliency_audit.transforms.model import timm_models
        entry["attention"] = timm_models.attention_entry(model)
    return entry


def _from_onnx(spec: ModelSpec, device) -> torch.nn.Module:
    """An ONNX graph, interpreted by onnxruntime (nothing in it runs as Python, so no --trust-model),
    with its external data from its own folder whatever the current directory."""
    try:
        import onnx  # noqa: F401 - reads the graph's external data locations
        import onnxruntime  # noqa: F401 - runs the graph

        from saliency_audit.transforms.model.onnx import OnnxModel
    except ImportError:
        raise ModelLoadError(f"{spec.model}: ONNX models need onnxruntime and onnx "
                             f"(pip install 'saliency-audit[onnx]')") from None
    try:
        data = onnx_external_data(spec.model, spec.storage_options)
        with _onnx_local_path(spec.model, data, spec.storage_options) as path:
            return OnnxModel(path, str(device), torch.get_num_threads())
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a file that is not a graph, an operator onnxruntime lacks
        raise ModelLoadError(f"cannot load ONNX model {spec.model}: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}") from None


def onnx_external_data(url: str, storage_options: dict | None = None) -> dict[str, str]:
    """The files beside an ONNX graph that hold its weights: {location as the graph names it: URL}.
    ModelLoadError, in one line, for a location that leaves the graph's folder (absolute, '..', a
    symlink out) or a file that is not there."""
    from saliency_audit.transforms.model.onnx import external_data_locations
    fs, path = storage.filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        graph = f.read()
    try:
        locations = external_data_locations(graph)
    except ValueError as e:
        raise ModelLoadError(f"cannot load ONNX model {url}: {e}") from None
    files = {}
    for location in locations:
        data_url = posixpath.join(posixpath.dirname(url), location)
        data_fs, data_path = storage.filesystem(data_url, storage_options)
        if storage.is_local(fs) and not _inside(os.path.dirname(path), data_path):
            raise ModelLoadError(f"cannot load ONNX model {url}: its data file {location[:200]!r} leaves the model's "
                                 f"folder through a symlink; refused")
        if not data_fs.isfile(data_path):
            raise ModelLoadError(f"cannot load ONNX model {url}: its data file {location[:200]!r} is not beside it")
        files[location] = data_url
    return files


def _inside(folder: str, path: str) -> bool:
    """Whether ``path``, symlinks resolved, lies under ``folder``."""
    folder = os.path.realpath(folder)
    return os.path.commonpath([folder, os.path.realpath(path)]) == folder


@contextlib.contextmanager
def _onnx_local_path(url: str, data: dict[str, str], storage_options: dict | None):
    """A local path to the graph with its external data beside it: the graph itself when local,
    else copies of both in a private temporary folder, removed after."""
    fs, path = storage.filesystem(url, storage_options)
    if storage.is_local(fs):
        yield os.path.abspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="saliency-audit-onnx-") as folder:
        graph = os.path.join(folder, posixpath.basename(path))
        fs.get(path, graph)
        for location, data_url in data.items():
            target = os.path.join(folder, location)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            data_fs, data_path = storage.filesystem(data_url, storage_options)
            data_fs.get(data_path, target)
        yield graph


def _from_file(path: str, spec: ModelSpec) -> torch.nn.Module:
    if spec.model.endswith(".pt2"):
        if not spec.trust_model:
            _refuse_unsafe_pt2(path, spec.model)
        try:
            return torch.export.load(path).module()
        except Exception as e:
            raise ModelLoadError(f"cannot load torch.export archive {spec.model}: {type(e).__name__}: {e}") from None
    try:
        return torch.jit.load(path, map_location="cpu")
    except Exception as jit_error:
        # Not TorchScript: perhaps a whole pickled nn.Module, which only runs with trust.
        obj = _torch_load(path, spec.trust_model, spec.model, hint=f" (not TorchScript either: {jit_error})")
        if not isinstance(obj, torch.nn.Module):
            raise ModelLoadError(f"{spec.model} is neither TorchScript, a .pt2 archive nor a pickled "
                                 f"nn.Module (it holds {type(obj).__name__}); for a state dict use "
                                 "--model module:Callable --weights FILE") from None
        return obj


def _torch_load(path: str, trust: bool, name: str, hint: str = ""):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust:
            raise ModelLoadError(f"{name} needs arbitrary unpickling, which can run code; refused. "
                                 f"Pass --trust-model if you trust this file{hint}") from None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ModelLoadError(f"cannot load {name}: {type(e2).__name__}: {e2}") from None
    except Exception as e:
        raise ModelLoadError(f"cannot load {name}: {type(e).__name__}: {e}{hint}") from None


# torch.export.load unpickles with weights_only=False: weights and tensor constants marked
# use_pickle in data/{weights,constants}/*_config.json, opaque_obj_/custom_obj_ constants, and
# (after a failed weights_only=True try) every *.pt entry and the pre-2.8 serialized_*.json.
# It also dlopens compiled code under data/aotinductor/. So the archive is read first.
_PICKLED_CONSTANT_PREFIXES = ("opaque_obj_", "custom_obj_")
_TORCH_LOADED_JSON = ("serialized_state_dict.json", "serialized_constants.json")


def _refuse_unsafe_pt2(path: str, name: str) -> None:
    entry = unsafe_pt2_entry(path, name)
    if entry:
        raise ModelLoadError(f"{name} would unpickle entry {entry}, which can run code; refused. "
                             "Pass --trust-model if you trust this file")


def unsafe_pt2_entry(path: str, name: str | None = None) -> str | None:
    """The first entry of a torch.export archive that loading it would unpickle without
    weights_only=True (or run as native code), in a few words; None if there is none."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():  # every copy of a duplicated name is checked
                found = _unsafe_entry(info.filename, lambda: archive.read(info))
                if found:
                    return found
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read torch.export archive {name or path}: {type(e).__name__}: {e}") from None
    return None


def _unsafe_entry(filename: str, read) -> str | None:
    rooted, base = f"/{filename}", posixpath.basename(filename)  # entries usually sit under a root folder
    if "/data/aotinductor/" in rooted:
        return f"{filename} (compiled AOTInductor code)"
    if base.endswith("_config.json") and ("/data/weights/" in rooted or "/data/constants/" in rooted):
        try:
            config = json.loads(read())["config"]
            items = [(str(fqn), meta.get("path_name", ""), meta.get("use_pickle")) for fqn, meta in config.items()]
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{filename} (unreadable payload config)"
        for fqn, path_name, use_pickle in items:
            if use_pickle or str(path_name).startswith(_PICKLED_CONSTANT_PREFIXES):
                return f"{posixpath.join(posixpath.dirname(filename), str(path_name))} ({fqn} marked use_pickle)"
        return None
    if (base.endswith(".pt") or base in _TORCH_LOADED_JSON) and _needs_full_unpickling(read()):
        return f"{filename} (not loadable with weights_only=True)"
    return None


def _needs_full_unpickling(data: bytes) -> bool:
    if not data:
        return False  # torch reads an empty artifact as {} without unpickling
    try:
        with warnings.catch_warnings():  # a hostile file's pickle protocol is no news to the user
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        return True
    return False


class _local_copy:
    """A local path for a URL: the path itself for local files, else a temporary copy, named by the
    URL's path only (never its query), and removed whatever happens, a failed copy included. The
    copy is streamed from one open file: ``fs.get`` would take a ``?`` (a query) for a glob."""

    def __init__(self, url: str, storage_options: dict | None):
        self.url, self.storage_options, self.tmp = url, storage_options or {}, None

    def __enter__(self) -> str:
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        if storage.is_local(fs):
            return path
        suffix = os.path.splitext(urllib.parse.urlsplit(storage.shown(self.url)).path)[1]
        fd, self.tmp = tempfile.mkstemp(suffix=suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else "")
        try:
            with os.fdopen(fd, "wb") as local, fs.open(path, "rb") as remote:
                shutil.copyfileobj(remote, local, 1 << 20)
        except BaseException as e:
            self.__exit__()
            if isinstance(e, Exception):
                raise ModelLoadError(f"cannot read {storage.shown(self.url)}: {type(e).__name__}: "
                                     f"{' '.join(storage.unquoted(e, self.url).split())[:200]}") from None
            raise
        return self.tmp

    def __exit__(self, *exc):
        if self.tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            self.tmp = None
