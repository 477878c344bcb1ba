"""Training an adversarial autoencoder for ``abele`` (``saliency-audit train-aae``).

Each step (Makhzani et al. 2015, as ABELE trains it): the discriminator learns to tell prior
draws N(0, I) from the encoder's codes, then the encoder-decoder learns
(1 - adv_weight) * reconstruction + adv_weight * (fool the discriminator). The reconstruction
is the MSE on images scaled to [-1, 1], as in ABELE (tanh outputs), so its weights carry over.
Adam with beta1 = 0.5 as in ABELE (its lr is 2e-4 over 10,000 steps of 256; the default here is
higher, for fewer steps on a CPU).

``saliency-audit train-aae`` streams the shards (:func:`scan_shards`, :func:`train_aae_stream`):
each epoch reads them in a seeded random order through a bounded shuffle buffer, so memory does
not grow with the dataset; :func:`train_aae` trains on an array.

A checkpoint is written after every epoch, optimiser states included, and training resumes from
it. Each epoch's shuffling and prior draws come from a generator seeded by (seed, epoch), so a
resumed run continues exactly as an uninterrupted one would (shard order and shuffle buffer
included).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from saliency_audit.explainers.blackbox.aae import (
    AAEConfig,
    AdversarialAutoencoder,
    from_checkpoint,
    read_checkpoint,
    save_aae,
)
from saliency_audit.pipelines.training.dataset import images_within_budget, iter_images, shuffle_buffer
from saliency_audit.transforms.io import storage
from saliency_audit.transforms.io.preprocess import Preprocessing

DEFAULT_EPOCHS = 20
DEFAULT_BATCH_SIZE = 256
DEFAULT_LR = 1e-3
DEFAULT_ADV_WEIGHT = 0.001  # ABELE's 0.999 / 0.001 split
DEFAULT_SHUFFLE_BUFFER = 4096  # images; capped by saliency_audit.pipelines.training.dataset.MEMORY_BUDGET_BYTES
MAX_HELD_OUT = 1000  # images kept for the report, likewise capped
_ARCHITECTURE = ("image_shape", "latent_dim", "architecture", "hidden", "disc_hidden", "value_range")


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def split_holdout(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): a seeded random ``holdout`` share, at least one image, held out."""
    order = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(holdout * n))) if holdout > 0 and n > 1 else 0
    return np.sort(order[k:]), np.sort(order[:k])


def _check_training(epochs: int, batch_size: int, lr: float, adv_weight: float) -> None:
    if epochs < 0 or batch_size < 1 or not lr > 0 or not 0 <= adv_weight < 1:
        raise ValueError(f"need epochs >= 0, batch_size >= 1, lr > 0 and 0 <= adv_weight < 1; got "
                         f"{epochs}, {batch_size}, {lr}, {adv_weight}")


def train_aae(images: np.ndarray, config: AAEConfig, *, output: str | None = None, epochs: int = DEFAULT_EPOCHS,
              batch_size: int = DEFAULT_BATCH_SIZE, lr: float = DEFAULT_LR,
              adv_weight: float = DEFAULT_ADV_WEIGHT, seed: int = 0, device: str = "cpu",
              holdout: float = 0.05, resume: bool = True, progress: bool = True
              ) -> tuple[AdversarialAutoencoder, dict[str, Any]]:
    """Train (or resume training) an AAE on images float32 [N,C,H,W]; returns (aae, report).

    output: the checkpoint path, written after every epoch; with resume and an existing
    checkpoint there, training continues from its last epoch (same config required).
    holdout: share of the images kept out of training for the report. The report holds the
    per-epoch loss history and :func:`evaluate_aae` on the held-out images.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or tuple(images.shape[1:]) != config.image_shape:
        raise ValueError(f"images must be [N, {', '.join(map(str, config.image_shape))}], got {list(images.shape)}")
    _check_training(epochs, batch_size, lr, adv_weight)
    train_idx, held_idx = split_holdout(len(images), holdout, seed)
    x = torch.from_numpy(images[train_idx])

    def batches(generator: torch.Generator) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            yield x[order[start:start + batch_size]]

    aae, history = _fit(batches, math.ceil(len(x) / batch_size), config, output=output, epochs=epochs, lr=lr,
                        adv_weight=adv_weight, seed=seed, device=device, resume=resume, progress=progress)
    held = images[held_idx] if len(held_idx) else images[train_idx[:MAX_HELD_OUT]]
    report = {"history": history, "trained_images": len(train_idx), "held_out_images": len(held_idx),
              **evaluate_aae(aae, held, seed=seed)}
    return aae, report


@dataclasses.dataclass
class ShardStream:
    """The images of some shards, streamed for training (see :func:`scan_shards`).

    Training holds only ``buffer_size`` images and the ``held`` ones (the held-out images, or
    the first training images when none are held out, for the report), never the dataset."""

    urls: list[str]
    prep: Preprocessing
    storage_options: dict | None
    image_shape: tuple[int, int, int]
    train_count: int
    held_keys: frozenset[tuple[str, str]]  # (shard url, image id) of the held-out images
    held: np.ndarray
    skipped: list[str]
    buffer_size: int

    def batches(self, generator: torch.Generator, batch_size: int) -> Iterator[torch.Tensor]:
        """One epoch: the shards in a random order, their images through a shuffle buffer."""
        order = torch.randperm(len(self.urls), generator=generator).tolist()
        records = iter_images([self.urls[i] for i in order], self.prep, self.storage_options, require_labels=False)
        images = (image for url, image_id, image, _ in records
                  if (url, image_id) not in self.held_keys and image.shape == self.image_shape)
        batch: list[np.ndarray] = []
        for image in shuffle_buffer(images, self.buffer_size, generator):
            batch.append(image)
            if len(batch) == batch_size:
                yield torch.from_numpy(np.stack(batch))
                batch = []
        if batch:
            yield torch.from_numpy(np.stack(batch))


def _unit_hash(seed: int, image_id: str) -> float:
    """A value in [0, 1) fixed by (seed, image id): which images are held out, whatever the order."""
    digest = hashlib.blake2b(f"{seed}\0{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def scan_shards(pattern: str, prep: Preprocessing, storage_options: dict | None = None, *,
                holdout: float = 0.05, seed: int = 0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> ShardStream:
    """One pass over the shards: count the usable images, check they share one shape, and keep
    the held-out ones: those whose id hashes below ``holdout`` (at least one when holdout > 0),
    at most MAX_HELD_OUT and at most a memory budget's worth."""
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle buffer must be >= 1 image, got {shuffle_buffer}")
    urls = storage.expand_glob(pattern, storage_options)
    skipped: list[str] = []
    shape, count, cap = None, 0, MAX_HELD_OUT
    held: dict[tuple[str, str], np.ndarray] = {}
    first: list[np.ndarray] = []  # the report's images when none are held out
    lowest: tuple[float, tuple[str, str] | None, np.ndarray | None] = (math.inf, None, None)
    for url, image_id, image, _ in iter_images(urls, prep, storage_options, False, skipped.append):
        if shape is None:
            shape, cap = image.shape, images_within_budget(MAX_HELD_OUT, image.shape)
        elif image.shape != shape:
            raise ValueError(f"images in {pattern} have different shapes {sorted({shape, image.shape})}; "
                             "pass --resize")
        count += 1
        key, u = (url, image_id), _unit_hash(seed, image_id)
        if u < holdout and len(held) < cap and key not in held:
            held[key] = image
        elif len(first) < cap:
            first.append(image)
        if u < lowest[0] and key not in held:
            lowest = (u, key, image)
    if not count:
        raise ValueError(f"no usable images in {pattern}" + (f" ({skipped[0]})" if skipped else ""))
    if holdout > 0 and count > 1 and not held:  # a tiny set: hold out the image that hashes lowest
        held[lowest[1]] = lowest[2]
    return ShardStream(urls=urls, prep=prep, storage_options=storage_options, image_shape=tuple(shape),
                       train_count=count - len(held), held_keys=frozenset(held),
                       held=np.stack(list(held.values()) or first), skipped=skipped,
                       buffer_size=images_within_budget(shuffle_buffer, shape))


def train_aae_stream(stream: ShardStream, config: AAEConfig, *, output: str | None = None,
                     epochs: int = DEFAULT_EPOCHS, batch_size: int = DEFAULT_BATCH_SIZE, lr: float = DEFAULT_LR,
                     adv_weight: float = DEFAULT_ADV_WEIGHT, seed: int = 0, device: str = "cpu",
                     resume: bool = True, progress: bool = True) -> tuple[AdversarialAutoencoder, dict[str, Any]]:
    """:func:`train_aae` on a :class:`ShardStream`: memory follows the shuffle buffer and the
    held-out images, not the number of images. Resuming is exact as with arrays."""
    if tuple(stream.image_shape) != tuple(config.image_shape):
        raise ValueError(f"the shards hold images of shape {list(stream.image_shape)}, "
                         f"the config expects {list(config.image_shape)}")
    _check_training(epochs, batch_size, lr, adv_weight)
    aae, history = _fit(lambda generator: stream.batches(generator, batch_size),
                        math.ceil(stream.train_count / batch_size), config, output=output, epochs=epochs, lr=lr,
                        adv_weight=adv_weight, seed=seed, device=device, resume=resume, progress=progress)
    report = {"history": history, "trained_images": stream.train_count, "held_out_images": len(stream.held_keys),
              **evaluate_aae(aae, stream.held, seed=seed)}
    return aae, report


def _fit(batches: Callable[[torch.Generator], Iterator[torch.Tensor]], steps: int, config: AAEConfig, *,
         output: str | None, epochs: int, lr: float, adv_weight: float, seed: int, device: str, resume: bool,
         progress: bool) -> tuple[AdversarialAutoencoder, list[dict[str, float]]]:
    """The training loop. ``batches(generator)`` yields one epoch's batches, shuffled with
    ``generator`` (seeded by (seed, epoch), which also draws the prior samples); ``steps``
    is the expected number of batches, for the progress bar."""
    lo, hi = config.value_range
    mid, half = (lo + hi) / 2, (hi - lo) / 2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        aae = AdversarialAutoencoder(config)
    aae.to(device)
    opt_ae = torch.optim.Adam([*aae.encoder.parameters(), *aae.decoder.parameters()], lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(aae.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    start, history = 0, []
    if resume and output and os.path.exists(output):
        state = read_checkpoint(output)
        saved = AAEConfig(**state["config"])
        if [getattr(saved, f) for f in _ARCHITECTURE] != [getattr(config, f) for f in _ARCHITECTURE]:
            raise ValueError(f"{output} holds an AAE of another configuration; remove it or pass another --output")
        aae = from_checkpoint(state).to(device)
        opt_ae = torch.optim.Adam([*aae.encoder.parameters(), *aae.decoder.parameters()], lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(aae.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
        training = state.get("training", {})
        start, history = int(training.get("epoch", 0)), list(training.get("history", []))
        if "opt_ae" in training:
            opt_ae.load_state_dict(training["opt_ae"])
            opt_d.load_state_dict(training["opt_d"])
    bce = nn.BCEWithLogitsLoss()
    k = config.latent_dim
    for epoch in range(start, epochs):
        aae.train()
        generator = _generator(seed, epoch)
        sums, step = np.zeros(3), 0
        bar = tqdm(batches(generator), total=steps, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        for step, batch in enumerate(bar, 1):
            batch = batch.to(device)
            prior = torch.randn(len(batch), k, generator=generator).to(device)
            # 1. the discriminator: prior draws are "real", codes "fake"
            with torch.no_grad():
                codes = aae.encode(batch)
            d_real, d_fake = aae.discriminate(prior), aae.discriminate(codes)
            d_loss = (bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))) / 2
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            # 2. the autoencoder: reconstruct, and make the codes pass for prior draws
            codes = aae.encode(batch)
            rec_loss = nn.functional.mse_loss((aae.decode(codes) - mid) / half, (batch - mid) / half)
            fooled = aae.discriminate(codes)
            adv_loss = bce(fooled, torch.ones_like(fooled))
            loss = (1 - adv_weight) * rec_loss + adv_weight * adv_loss
            opt_ae.zero_grad()
            loss.backward()
            opt_ae.step()
            sums += (rec_loss.item(), d_loss.item(), adv_loss.item())
            bar.set_postfix(rec=f"{sums[0] / step:.4f}", disc=f"{sums[1] / step:.3f}", refresh=False)
        bar.close()
        history.append({"epoch": epoch + 1, **{name: float(v / max(step, 1)) for name, v in  # plain floats
                                               zip(("reconstruction", "discriminator", "adversarial"), sums)}})
        if output:
            save_aae(aae, output, {"epoch": epoch + 1, "history": history, "seed": seed,
                                   "opt_ae": opt_ae.state_dict(), "opt_d": opt_d.state_dict()})
    aae.eval()
    if output:  # the finished file drops the optimiser states (3x the weights); resuming restarts Adam
        save_aae(aae, output, {"epoch": max(start, epochs), "history": history, "seed": seed})
    return aae, history


def input_range(prep, channels: int) -> tuple[float, float]:
    """(lo, hi) of images after ``prep`` (a saliency_audit.transforms.io.preprocess.Preprocessing): [0, 1] scaled by
    --mean/--std, the widest over the channels."""
    mean = np.broadcast_to(np.asarray(prep.mean if prep.mean is not None else (0.0,), np.float64), (channels,))
    std = np.broadcast_to(np.asarray(prep.std if prep.std is not None else (1.0,), np.float64), (channels,))
    return float(((0 - mean) / std).min()), float(((1 - mean) / std).max())


@torch.inference_mode()
def evaluate_aae(aae: AdversarialAutoencoder, images: np.ndarray, seed: int = 0,
                 batch_size: int = 1000) -> dict[str, Any]:
    """Reconstruction error and how well the codes match the prior N(0, I), on images [N,C,H,W].

    reconstruction_mse / _rmse_255: per pixel, in model-input units and in 0-255 units of the
    value range (ABELE's RMSE); latent_mean / latent_std per dimension (0 and 1 for a perfect
    match); mmd: squared maximum mean discrepancy between codes and prior draws (Gaussian
    kernel, bandwidth sqrt(2k); about 0 when they match); discriminator_accuracy: share of
    codes and prior draws it tells apart (0.5: it cannot); prior_pass_rate: share of prior
    draws it scores as prior-like (> 0.5), the acceptance rate of abele's random half.
    """
    device = next(aae.parameters()).device
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    codes, errors = [], []
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size].to(device)
        z = aae.encode(batch)
        codes.append(z.cpu())
        errors.append(((aae.decode(z) - batch) ** 2).flatten(1).mean(1).cpu())
    z = torch.cat(codes).double()
    mse = float(torch.cat(errors).mean())
    lo, hi = aae.config.value_range
    prior = torch.randn(len(z), z.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    real = torch.sigmoid(aae.discriminate(prior.float().to(device))).cpu()
    fake = torch.sigmoid(aae.discriminate(z.float().to(device))).cpu()
    return {"reconstruction_mse": mse, "reconstruction_rmse_255": math.sqrt(mse) * 255 / (hi - lo),
            "latent_mean": z.mean(0).tolist(), "latent_std": z.std(0, correction=0).tolist(),
            "mmd": mmd(z[:2000], prior[:2000]),
            "discriminator_accuracy": float(((real > 0.5).double().mean() + (fake <= 0.5).double().mean()) / 2),
            "prior_pass_rate": float((real > 0.5).double().mean())}


def mmd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased squared MMD between samples a [n,k] and b [m,k], Gaussian kernel exp(-d^2 / (2k))."""
    bandwidth = 2.0 * a.shape[1]

    def mean_kernel(p, q, same):
        k = torch.exp(-torch.cdist(p, q) ** 2 / bandwidth)
        if same:
            n = len(p)
            return float((k.sum() - k.diagonal().sum()) / max(n * (n - 1), 1))
        return float(k.mean())

    return mean_kernel(a, a, True) + mean_kernel(b, b, True) - 2 * mean_kernel(a, b, False)


@torch.inference_mode()
def label_agreement(aae: AdversarialAutoencoder, model: nn.Module, images: np.ndarray, labels: np.ndarray,
                    batch_size: int = 1000) -> float:
    """Share of reconstructions that ``model`` labels as the originals' labels (the AAE's usefulness
    for abele: a neighbour must be recognisable to the black box)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    device = next(aae.parameters()).device
    hits = 0
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size].to(device)
        predicted = model(aae.decode(aae.encode(batch))).argmax(1).cpu().numpy()
        hits += int((predicted == np.asarray(labels)[start:start + batch_size]).sum())
    return hits / len(x)


def format_report(report: dict[str, Any]) -> str:
    last = report["history"][-1] if report["history"] else None
    lines = []
    if last:
        first = report["history"][0]
        lines.append(f"epochs {last['epoch']}: reconstruction loss {first['reconstruction']:.4f} -> "
                     f"{last['reconstruction']:.4f}, discriminator loss {last['discriminator']:.3f}")
    lines += [
        f"held-out images: {report['held_out_images']}, reconstruction MSE {report['reconstruction_mse']:.5f} "
        f"(RMSE {report['reconstruction_rmse_255']:.1f} in 0-255 units)",
        "latent mean " + ", ".join(f"{v:+.2f}" for v in report["latent_mean"]) +
        "; std " + ", ".join(f"{v:.2f}" for v in report["latent_std"]) + " (prior: 0 and 1)",
        f"prior match: MMD^2 {report['mmd']:.4f} (0: indistinguishable), discriminator accuracy "
        f"{report['discriminator_accuracy']:.3f} (0.5: cannot tell), prior draws passing it "
        f"{report['prior_pass_rate']:.3f}",
    ]
    return "\n".join(lines)
