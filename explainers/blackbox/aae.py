"""Adversarial autoencoders (Makhzani et al. 2015) for ABELE's latent neighbourhoods.

An encoder maps an image to a latent code, a decoder maps codes back to images, and a
discriminator on the codes is trained to tell them from draws of the Gaussian prior N(0, I),
which pushes the codes towards the prior: decoded prior draws then look like real images.

Unlike ABELE's released Keras models, the encoder is deterministic (no sampling layer), so an
image always gets the same code and explanations reproduce.

The checkpoint is a plain dict (loads with ``torch.load(weights_only=True)``)::

    {"format": "saliency-audit-aae", "version": 1, "config": {...AAEConfig...},
     "encoder": state_dict, "decoder": state_dict, "discriminator": state_dict,
     "training": {"epoch": n, "history": [...], optimiser states while training runs}}

``config`` records the image shape, the latent size, the architecture, and the value range
and preprocessing of the images it was trained on: the AAE works in the model-input space,
so the explainer can refuse images that were prepared differently.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch
from torch import nn

FORMAT = "saliency-audit-aae"
VERSION = 1
ARCHITECTURES = ("conv", "mlp")


@dataclasses.dataclass(frozen=True)
class AAEConfig:
    """What an AAE is and what it expects.

    image_shape: (C, H, W) of the images; latent_dim: size of the code;
    architecture: "conv" (stride-2 conv blocks, one per entry of ``hidden``: H and W must
    be divisible by 2**len(hidden)) or "mlp" (dense layers of ``hidden`` widths);
    disc_hidden: widths of the discriminator's dense layers; value_range: (lo, hi) of the
    training images (the decoder's output range); preprocessing: how the training images
    were prepared (the pipeline's --channels/--resize/--mean/--std), for error messages.
    """

    image_shape: tuple[int, int, int]
    latent_dim: int
    architecture: str = "conv"
    hidden: tuple[int, ...] = (32, 64)
    disc_hidden: tuple[int, ...] = (128, 128)
    value_range: tuple[float, float] = (0.0, 1.0)
    preprocessing: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        shape = tuple(int(s) for s in self.image_shape)
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "disc_hidden", tuple(int(h) for h in self.disc_hidden))
        object.__setattr__(self, "value_range", tuple(float(v) for v in self.value_range))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; use one of {', '.join(ARCHITECTURES)}")
        if not self.hidden or min(self.hidden) < 1 or not self.disc_hidden or min(self.disc_hidden) < 1:
            raise ValueError(f"hidden and disc_hidden need positive widths, got {self.hidden}, {self.disc_hidden}")
        lo, hi = self.value_range
        if not hi > lo:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {self.value_range}")
        if self.architecture == "conv":
            step = 2 ** len(self.hidden)
            if shape[1] % step or shape[2] % step:
                raise ValueError(f"the conv architecture with {len(self.hidden)} blocks needs H and W divisible "
                                 f"by {step}, got {shape[1]}x{shape[2]}; use fewer blocks or architecture 'mlp'")

    def describe(self) -> str:
        c, h, w = self.image_shape
        return f"{c}x{h}x{w} images (C x H x W) in [{self.value_range[0]:g}, {self.value_range[1]:g}]"


def default_config(image_shape: tuple[int, int, int], **overrides) -> AAEConfig:
    """ABELE's latent sizes: 4 for grey images (MNIST; use 8 for Fashion-MNIST-like data), 16 for
    colour (CIFAR-10). Conv blocks where the size allows, wider for colour."""
    c, h, w = (int(s) for s in image_shape)
    options: dict[str, Any] = {"latent_dim": 4 if c == 1 else 16, "hidden": (32, 64) if c == 1 else (64, 128)}
    if h % 4 or w % 4:
        options.update(architecture="mlp", hidden=(512, 256))
    options.update({k: v for k, v in overrides.items() if v is not None})
    return AAEConfig(image_shape=(c, h, w), **options)


def _dense(widths: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
    return layers


class AdversarialAutoencoder(nn.Module):
    """Encoder, decoder and latent discriminator of one :class:`AAEConfig`.

    encode: images [N,C,H,W] -> codes [N,k]; decode: codes -> images in value_range;
    discriminate: codes -> logits [N] of "drawn from the prior"."""

    def __init__(self, config: AAEConfig):
        super().__init__()
        self.config = config
        c, h, w = config.image_shape
        k = config.latent_dim
        if config.architecture == "conv":
            widths = (c, *config.hidden)
            down = 2 ** len(config.hidden)
            inner = (widths[-1], h // down, w // down)
            flat = inner[0] * inner[1] * inner[2]
            encoder: list[nn.Module] = []
            for a, b in zip(widths[:-1], widths[1:]):
                encoder += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            encoder += [nn.Flatten(), nn.Linear(flat, k)]
            decoder: list[nn.Module] = [nn.Linear(k, flat), nn.LeakyReLU(0.2), nn.Unflatten(1, inner)]
            back = widths[::-1]
            for i, (a, b) in enumerate(zip(back[:-1], back[1:])):
                decoder.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1))
                if i < len(back) - 2:
                    decoder.append(nn.LeakyReLU(0.2))
        else:
            widths = [c * h * w, *config.hidden]
            encoder = [nn.Flatten(), *_dense(widths), nn.Linear(widths[-1], k)]
            decoder = [*_dense([k, *widths[::-1][:-1]]), nn.Linear(widths[1], c * h * w), nn.Unflatten(1, (c, h, w))]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)
        self.discriminator = nn.Sequential(*_dense([k, *config.disc_hidden]), nn.Linear(config.disc_hidden[-1], 1))
        lo, hi = config.value_range
        self.register_buffer("_low", torch.tensor(lo), persistent=False)
        self.register_buffer("_span", torch.tensor(hi - lo), persistent=False)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self._low + self._span * torch.sigmoid(self.decoder(codes))

    def discriminate(self, codes: torch.Tensor) -> torch.Tensor:
        return self.discriminator(codes)[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def check_images(self, images: torch.Tensor, tolerance: float = 1e-3) -> None:
        """ValueError unless images [B,C,H,W] have the shape and value range the AAE was trained on."""
        config = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != config.image_shape:
            c, h, w = config.image_shape
            got = "x".join(str(s) for s in images.shape[1:]) if images.dim() == 4 else str(tuple(images.shape))
            raise ValueError(f"the AAE was trained on {c}x{h}x{w} images (C x H x W) but the images are {got}; "
                             f"train one on images preprocessed like these (saliency-audit train-aae with the "
                             f"same --channels/--resize/--mean/--std){_trained_with(config)}")
        lo, hi = config.value_range
        margin = tolerance * (hi - lo)
        low, high = float(images.min()), float(images.max())
        if low < lo - margin or high > hi + margin:
            raise ValueError(f"image values {low:.3g}..{high:.3g} lie outside the AAE's range {lo:g}..{hi:g}: "
                             f"the images are preprocessed differently from its training images"
                             f"{_trained_with(config)}")

    def checkpoint(self, training: dict[str, Any] | None = None) -> dict[str, Any]:
        state = {"format": FORMAT, "version": VERSION, "config": _config_dict(self.config),
                 "encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(),
                 "discriminator": self.discriminator.state_dict()}
        if training is not None:
            state["training"] = training
        return state


def _trained_with(config: AAEConfig) -> str:
    prep = {k: v for k, v in config.preprocessing.items() if v not in (None, False)}
    return f" (it was trained with {prep})" if prep else ""


def _config_dict(config: AAEConfig) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    for key in ("image_shape", "hidden", "disc_hidden", "value_range"):
        out[key] = list(out[key])
    return out


def save_aae(aae: AdversarialAutoencoder, path: str, training: dict[str, Any] | None = None) -> None:
    """Write the checkpoint atomically (a crash mid-write leaves the previous one)."""
    import os
    tmp = f"{path}.tmp"
    torch.save(aae.checkpoint(training), tmp)
    os.replace(tmp, path)


def read_checkpoint(path_or_file, storage_options: dict | None = None) -> dict[str, Any]:
    """The checkpoint dict, loaded with weights_only=True; ValueError if it is not an AAE checkpoint.
    A path with a scheme (s3://, gs://, ...) is read through fsspec with ``storage_options``."""
    from saliency_audit.explainers.core.paths import shown, unquoted
    name = shown(path_or_file) if isinstance(path_or_file, str) else getattr(path_or_file, "name", "the AAE file")
    try:
        if isinstance(path_or_file, str) and "://" in path_or_file:
            import fsspec
            with fsspec.open(path_or_file, "rb", **(storage_options or {})) as f:
                path_or_file = io.BytesIO(f.read())
        state = torch.load(path_or_file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"AAE file not found: {name} (train one with saliency-audit train-aae)") from None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot load AAE {name}: {type(e).__name__}: "
                         f"{unquoted(first, path_or_file) if isinstance(path_or_file, str) else first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{name} is not a saliency-audit AAE checkpoint (train one with saliency-audit train-aae)")
    if state.get("version") != VERSION:
        raise ValueError(f"{name} is an AAE checkpoint of version {state.get('version')}; this code reads {VERSION}")
    return state


def from_checkpoint(state: dict[str, Any]) -> AdversarialAutoencoder:
    aae = AdversarialAutoencoder(AAEConfig(**state["config"]))
    aae.encoder.load_state_dict(state["encoder"])
    aae.decoder.load_state_dict(state["decoder"])
    aae.discriminator.load_state_dict(state["discriminator"])
    return aae.eval()


def load_aae(path_or_file, device: str | torch.device = "cpu",
             storage_options: dict | None = None) -> AdversarialAutoencoder:
    """The AAE of a checkpoint written by ``saliency-audit train-aae``, in eval mode."""
    state = read_checkpoint(path_or_file, storage_options)
    try:
        aae = from_checkpoint(state)
    except (TypeError, KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"broken AAE checkpoint: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return aae.to(device)
