"""ONNX models (``--model model.onnx``): the exported graph run by onnxruntime, as a forward-only
``torch.nn.Module``, so the methods that need only the model's answers (lime, anchor, lore, abele,
occlusion) and the metrics audit the very file that is deployed, not a torch copy of it.

Nothing in the file is executed as Python: onnxruntime interprets the graph. The input's layout,
dtype and batch dimension are read from the graph (``InputSpec``) and checked in preflight.

A graph may keep its weights in files beside it (``model.onnx.data``: torch.onnx.export's default),
named by each tensor's external data ``location`` relative to the graph's folder; a location that
leaves that folder is refused (``external_data_locations``), so a graph can only read its own files.
"""
from __future__ import annotations

import dataclasses
import ntpath
import posixpath

import numpy as np
import torch

DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The graph's first input: its name, dtype and shape ([N,C,H,W]; a str or None where the
    dimension is symbolic)."""

    name: str
    dtype: str
    shape: tuple

    @property
    def batch(self) -> int | None:
        """A fixed batch size the graph demands, or None when any batch size goes."""
        first = self.shape[0] if self.shape else None
        return first if isinstance(first, int) and first > 0 else None

    def problem(self, shape: tuple[int, ...]) -> str | None:
        """Why a model input of ``shape`` [B,C,H,W] does not fit this graph, or None."""
        if self.dtype not in DTYPES:
            return f"its input {self.name!r} is {self.dtype}; only float inputs can be explained"
        if len(self.shape) != len(shape):
            return f"its input {self.name!r} has {len(self.shape)} dimensions {list(self.shape)}, the images {len(shape)}"
        names = ("batch", "channels", "height", "width")
        for k, (want, have) in enumerate(zip(self.shape[1:], shape[1:]), start=1):
            if isinstance(want, int) and want > 0 and want != have:
                return (f"its input {self.name!r} takes {names[k] if k < 4 else f'dimension {k}'} {want}, the "
                        f"preprocessed images have {have} (shape {list(self.shape)} vs {list(shape)}); check "
                        f"--channels/--resize")
        return None


def external_data_locations(graph: bytes) -> list[str]:
    """The external data files the graph's tensors name, each once, in order: paths relative to
    the graph's folder. ValueError, in one line, for one that is absolute or climbs out with '..'
    (a symlink out is for the caller, who knows the folder)."""
    import onnx
    locations = {}  # in order, each once
    for tensor in _tensors(onnx.ModelProto.FromString(graph)):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        if not location:
            raise ValueError(f"tensor {tensor.name[:80]!r} is marked as external data but names no file")
        climbs = ".." in location.replace("\\", "/").split("/")
        if "\0" in location or posixpath.isabs(location) or ntpath.isabs(location) \
                or ntpath.splitdrive(location)[0] or climbs:
            raise ValueError(f"tensor {tensor.name[:80]!r} has its data at {location[:200]!r}, which leaves the "
                             f"model's folder (absolute, or through '..'); refused")
        locations[location] = None
    return list(locations)


def _tensors(message):
    """Every TensorProto in an ONNX message, wherever it sits: initializers, sparse tensors, node
    attributes, subgraphs, functions (onnxruntime loads external data for each of them)."""
    if message.DESCRIPTOR.full_name == "onnx.TensorProto":
        yield message
        return
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        for item in ([value] if hasattr(value, "ListFields") else value):
            yield from _tensors(item)


class OnnxModel(torch.nn.Module):
    """A forward-only module around an onnxruntime session: no parameters, no gradients."""

    differentiable = False

    def __init__(self, path: str, device: str = "cpu", threads: int | None = None):
        """``path``: the graph's file, whose folder holds its external data (checked by the caller)."""
        super().__init__()
        import onnxruntime as ort
        options = ort.SessionOptions()
        if threads:  # one pool per worker process, sized like torch's (--torch-threads)
            options.intra_op_num_threads = options.inter_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        required = [i.name for i in self.session.get_inputs()[1:]]
        if required:
            raise ValueError(f"the graph takes {len(required) + 1} inputs ({', '.join(required)} besides the "
                             f"images); export it with the images as its only input")
        graph_input = self.session.get_inputs()[0]
        self.input = InputSpec(graph_input.name, graph_input.type,
                               tuple(d if isinstance(d, int) else None for d in graph_input.shape))
        self.output = self.session.get_outputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu").numpy().astype(DTYPES.get(self.input.dtype, np.float32), copy=False)
        step = self.input.batch or len(array) or 1
        parts = []
        for i in range(0, len(array), step):
            chunk = array[i:i + step]
            if self.input.batch and len(chunk) < step:  # a fixed batch size: pad, then drop the padding
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            parts.append(self.session.run([self.output], {self.input.name: np.ascontiguousarray(chunk)})[0]
                         [:len(array[i:i + step])])
        out = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(images.device)
