"""Shared fixtures: the bundled demo data, the real MNIST files, and small helpers."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image
from torch import nn

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "pipelines" / "demo_data"
MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def demo_shard() -> Path:
    return DEMO_DATA / "mnist-test-sample.tar"


@pytest.fixture(scope="session")
def demo_model_args() -> list[str]:
    return ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights", str(DEMO_DATA / "mnist_cnn.pt")]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST data not found at {MNIST}")
    return MNIST


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def read_output(directory: Path | str) -> list[dict]:
    """All rows of one output directory (saliency/, summary/ or errors/)."""
    return ds.dataset(str(directory), format="parquet").to_table().to_pylist()


@pytest.fixture(scope="session")
def demo_model():
    from saliency_audit.transforms.model.load import ModelSpec, load_model
    return load_model(ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(DEMO_DATA / "mnist_cnn.pt")))


@pytest.fixture(scope="session")
def demo_images(demo_shard):
    """The first 64 bundled digits as model input [64,1,28,28] and their labels."""
    from saliency_audit.transforms.io.preprocess import Preprocessing, decode, preprocess
    from saliency_audit.transforms.io.readers import read_shard
    prep = Preprocessing(channels=1)
    records = [r for _, r in zip(range(64), read_shard(str(demo_shard)))]
    images = np.stack([preprocess(decode(r, prep.max_pixels), prep) for r in records])
    return torch.from_numpy(images), torch.tensor([r.label for r in records])


# A scene for the superpixel methods: a model that reads only one square region.
REGION = (slice(4, 10), slice(4, 10))


class RegionModel(torch.nn.Module):
    """Class 1's logit grows with the mean brightness of a fixed 6x6 square; class 0's is 0."""

    def forward(self, x):
        m = x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), 40 * (m - 0.5)], 1)


def scene(seed=0):
    """28x28 grey image: a bright square on the region, darker textured shapes elsewhere."""
    rng = np.random.default_rng(seed)
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 15:25, 2:12] = 0.4 + 0.05 * float(rng.random())
    image[0, 0, 13:26, 15:26] = 0.25
    image[0, 0, 2:8, 16:24] = 0.15
    image[0, 0, REGION[0], REGION[1]] = 1.0
    return image


def region_superpixels(segments):
    labels = segments.reshape(28, 28)[REGION[0], REGION[1]]
    return set(np.unique(labels.numpy()).tolist())


@contextlib.contextmanager
def moto_s3(monkeypatch, bucket: str):
    """A real S3-compatible server (moto) on 127.0.0.1 holding one empty bucket, with test
    credentials in the environment: yields (an s3fs filesystem on it, its endpoint URL)."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
        fs.mkdir(bucket)
        yield fs, endpoint
    finally:
        server.stop()


ZENNIT_INSTALL = "pip install --no-deps zennit==0.5.1"


TORCHVISION_NAMES = ("torchvision", "torchvision.models", "torchvision.models.resnet", "torchvision.transforms",
                     "torchvision.transforms.functional",
                     # what timm imports (its models' norm layers, its data transforms and datasets)
                     "torchvision.ops", "torchvision.ops.misc", "torchvision.models.feature_extraction",
                     "torchvision.datasets")


class _StandInType(type):
    """A stand-in class's own attributes (timm reads InterpolationMode.BICUBIC at import) are names."""

    def __getattr__(cls, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return f"{cls.__name__}.{attr}"


def _stand_in_module(name: str) -> types.ModuleType:
    """A module whose every public attribute is an empty nn.Module subclass: the references import
    names from torchvision (ResNet blocks, transforms) that the comparisons here never call."""
    module = types.ModuleType(name)

    def attribute(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StandInType(attr, (nn.Module,), {})
    module.__getattr__ = attribute
    return module


def _stand_in_modules() -> dict[str, types.ModuleType]:
    """The stand-in modules, each also an attribute of its parent (``import torchvision.ops.misc``
    walks from the top)."""
    modules = {n: _stand_in_module(n) for n in TORCHVISION_NAMES}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return modules


@contextlib.contextmanager
def torchvision_stand_in():
    """Stand-in torchvision modules in sys.modules while a reference imports (torchvision has no
    usable CPU wheel here: it would pull a CUDA build of torch), removed again after so no other
    code sees them; nothing where torchvision is installed."""
    stand_in = {} if importlib.util.find_spec("torchvision") else _stand_in_modules()
    sys.modules.update(stand_in)
    try:
        yield
    finally:
        for name, module in stand_in.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


@pytest.fixture(scope="session")
def zennit():
    """Zennit's modules (its package __init__ imports torchvision.models.resnet for its ResNet
    canonizer)."""
    if importlib.util.find_spec("zennit") is None:
        pytest.skip(f"zennit is not installed ({ZENNIT_INSTALL})")
    with torchvision_stand_in():
        import zennit.attribution
        import zennit.canonizers
        import zennit.composites
        import zennit.layer
        import zennit.rules
        import zennit.torchvision
        import zennit.types
    return zennit


TIMM_INSTALL = "pip install --no-deps timm==1.0.31"


@pytest.fixture(scope="session")
def timm():
    """timm, imported once under the torchvision stand-in (its layers and data transforms import
    torchvision names at import time; the tests never call them)."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip(f"timm is not installed ({TIMM_INSTALL})")
    with torchvision_stand_in():
        import timm
        import timm.data
        import timm.layers
    return timm


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, and put back after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test: small models and batches gain nothing from a second, and on two
    shared cores a busy second thread made them tens of times slower."""
    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def fresh_s3_clients():
    """fsspec reuses a filesystem made with the same arguments, and the S3 endpoint a test puts in the
    environment (AWS_ENDPOINT_URL) is no argument: without this, a later test would get a client
    for an earlier test's endpoint."""
    yield
    s3fs = sys.modules.get("s3fs")
    if s3fs is not None:
        s3fs.S3FileSystem.clear_instance_cache()
