"""Training and evaluating the reference MNIST classifiers (the CNN, a ViT, a ConvNeXt) on CPU, reproducibly."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from saliency_audit.pipelines.training.reference_model import ARCHITECTURES, IMAGE_SIZE, NUM_CLASSES, Standardised

DEFAULT_EPOCHS = 12
DEFAULT_BATCH_SIZE = 64
MAX_SHIFT = 2  # pixels; MNIST digits are centred by mass, so small shifts stay realistic


@dataclass(frozen=True)
class Recipe:
    """How an architecture learns: the peak learning rate, the share of the steps that warm up to
    it linearly before the cosine decay, and the largest gradient norm (None: not clipped)."""

    lr: float
    warmup: float = 0.0
    clip: float | None = None


# The transformers need the warm-up and the clip: without them the ViT's first steps at a rate
# that suits the CNN threw it off (10% after two epochs, where it reaches 91% with them).
RECIPES = {"cnn": Recipe(2e-3), "vit": Recipe(3e-3, warmup=0.3, clip=1.0),
           "convnext": Recipe(3e-3, warmup=0.3, clip=1.0)}
DEFAULT_LR = RECIPES["cnn"].lr


def train_classifier(images: np.ndarray, labels: np.ndarray, *, epochs: int = DEFAULT_EPOCHS,
                     batch_size: int = DEFAULT_BATCH_SIZE, lr: float | None = None, seed: int = 0,
                     progress: bool = True, architecture: str = "cnn", max_shift: int = MAX_SHIFT) -> nn.Module:
    """Train a fresh reference classifier (``architecture``: "cnn", the MnistCNN; "vit" or
    "convnext", see reference_model) with Adam and random-shift augmentation.

    The learning rate follows its architecture's recipe (RECIPES): a linear warm-up where it has
    one, then a cosine decay from ``lr`` (default: the recipe's) to zero over the other steps. All
    randomness (initialisation, shuffling, shifts, dropout) comes from ``seed``; the
    caller's global torch RNG state is left untouched. With the same seed and the
    same number of torch threads the result is bit-identical.

    Parameters
    ----------
    images
        float32 array [N, 1, 28, 28] with values in [0, 1].
    labels
        Integer array [N] with values in 0..9.
    epochs, batch_size, lr
        Training length, mini-batch size and peak Adam learning rate (None: the recipe's).
    seed
        Seed for every random choice in training.
    progress
        Show a tqdm bar per epoch with the running loss.

    architecture
        "cnn" (default), "vit" or "convnext".
    max_shift
        Largest random shift in pixels (0: no augmentation, which suits runs of a few epochs).

    Returns
    -------
    nn.Module
        The trained model, in eval mode.
    """
    x, y = _check_data(images, labels)
    if architecture not in RECIPES:
        raise ValueError(f"architecture must be one of {', '.join(RECIPES)}, got {architecture!r}")
    recipe = RECIPES[architecture]
    lr = recipe.lr if lr is None else lr
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs and batch_size must be at least 1 and lr positive, "
                         f"got epochs={epochs}, batch_size={batch_size}, lr={lr}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ARCHITECTURES[architecture]()
        if isinstance(model, Standardised):
            model.fit(x)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scheduler = _schedule(optimizer, epochs * math.ceil(len(x) / batch_size), recipe.warmup)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            bar = tqdm(range(0, len(x), batch_size), desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not progress, leave=False)
            running = 0.0
            for step, start in enumerate(bar, 1):
                batch = order[start:start + batch_size]
                inputs = random_shift(x[batch], max_shift, generator)
                loss = loss_fn(model(inputs), y[batch])
                optimizer.zero_grad()
                loss.backward()
                if recipe.clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
                optimizer.step()
                scheduler.step()
                running += (loss.item() - running) / min(step, 50)  # smoothed over ~50 steps
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            bar.close()
    return model.eval()


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float):
    """Cosine decay to zero over the steps after a linear warm-up from lr / 25 over the first
    ``warmup`` share of them (none: the plain cosine over every step)."""
    warm = int(warmup * steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps - warm)
    if not warm:
        return cosine
    rise = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / 25, total_iters=warm)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [rise, cosine], milestones=[warm])


def random_shift(batch: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with zeros.

    Parameters
    ----------
    batch
        Tensor [B, C, H, W].
    max_shift
        Largest shift in pixels, in either direction.
    generator
        Source of the random offsets.
    """
    if max_shift == 0:
        return batch
    b, _, h, w = batch.shape
    padded = nn.functional.pad(batch, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [B, 1, 1, W]
    index = torch.arange(b)[:, None, None, None]
    channels = torch.arange(batch.shape[1])[None, :, None, None]
    return padded[index, channels, rows, cols]


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on images [N, 1, 28, 28] in [0, 1] and labels [N].

    The model is put in eval mode (and left there).
    """
    x, y = _check_data(images, labels)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start:start + batch_size]).sum())
    return correct / len(x)


def _check_data(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must have shape [N, 1, 28, 28], got {list(images.shape)}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floats in [0, 1] (divide uint8 pixels by 255), got {images.dtype}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array of shape [{len(images)}], "
                         f"got {labels.dtype} {list(labels.shape)}")
    if len(images) == 0:
        raise ValueError("no images given")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must be in [0, 1] (divide uint8 pixels by 255), "
                         f"got range {images.min()}..{images.max()}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}, got range {labels.min()}..{labels.max()}")
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))
