"""LIME on superpixels (Ribeiro, Singh, Guestrin 2016), batched across images."""
from __future__ import annotations

import numpy as np
import torch

from saliency_audit.explainers.blackbox.search import SuperpixelExplainer
from saliency_audit.explainers.blackbox.superpixels import paint
from saliency_audit.explainers.core.base import Explanation
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.core.scores import check_score

SLIC_OPTIONS = {"n_segments": 100}  # lime's own default (see Lime): finer than anchor's and lore's


def lime_kernel(masks: np.ndarray, n_features: np.ndarray, kernel_width: float) -> np.ndarray:
    """lime_image's sample weights: sqrt(exp(-d^2 / w^2)), d = cosine distance to all-on.

    masks [B,N,S] in {0,1} (padding columns 0), n_features [B] the true S of each image.
    An all-off row has distance 1, as sklearn's cosine distance gives for a zero vector.
    """
    on = masks.sum(-1)
    similarity = on / np.sqrt(np.maximum(on, 1) * np.asarray(n_features, dtype=np.float64)[:, None])
    return np.sqrt(np.exp(-(1.0 - similarity) ** 2 / kernel_width ** 2))


def weighted_ridge(x: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float):
    """Closed-form weighted ridge with an unpenalised intercept, batched over the first dim.

    Minimises sum_i w_i (y_i - x_i.beta - b)^2 + alpha |beta|^2, i.e. sklearn's
    Ridge(alpha).fit(x, y, sample_weight=w) as lime uses it. x [B,N,S], y [B,N], w [B,N].
    Returns beta [B,S], intercept [B], weighted R^2 [B] (1 when y is constant and fitted exactly).
    Cost: O(B N S^2 + B S^3).
    """
    sw = w / w.sum(-1, keepdims=True)
    x_mean = np.einsum("bn,bns->bs", sw, x)
    y_mean = np.einsum("bn,bn->b", sw, y)
    xc = x - x_mean[:, None, :]
    yc = y - y_mean[:, None]
    xw = xc.transpose(0, 2, 1) * w[:, None, :]
    gram = xw @ xc + alpha * np.eye(x.shape[-1])
    beta = np.linalg.solve(gram, xw @ yc[..., None])[..., 0]
    intercept = y_mean - np.einsum("bs,bs->b", x_mean, beta)
    residual = (w * (yc - np.einsum("bns,bs->bn", xc, beta)) ** 2).sum(-1)
    total = (w * yc ** 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 1e-12 * w.sum(-1), 1.0 - residual / total,
                      np.where(residual <= 1e-12 * w.sum(-1), 1.0, 0.0))
    return beta, intercept, r2


@register
class Lime(SuperpixelExplainer):
    """Weighted ridge on random superpixel on/off masks; each pixel gets its superpixel's weight.

    n_samples: masks per image, row 0 all on (default 1000, lime_image's num_samples);
    kernel_width: of the exponential kernel on cosine distance (0.25, as lime_image);
    alpha: ridge penalty (1.0, lime's Ridge default);
    score: what the ridge regresses: "log_odds" (default) or "probability" (lime_image's);
    plus the superpixel options of :class:`saliency_audit.explainers.blackbox.search.SuperpixelExplainer`, with
    lime's own defaults: segmentation "slic" with ``segmentation_options`` {"n_segments": 100}
    and fill 0.0. Signed.

    Why these defaults (benchmarks/superpixel_methods.py; demo CNN, trained on the 5,000-digit
    subset, first 200 test digits, deletion AUC with a zero substrate over 28 steps as a
    fraction of a random map's; figures of 100 and 50 digits from the exploration in brackets):
    - score "log_odds" = z_t - logsumexp_{j != t} z_j, from the logits: the softmax probability
      of a confident model is exactly 1.0 in float32 for almost every mask, so a regression on
      it is flat (all-zero maps for 3 of 8 demo digits with logits x50); the log-odds keeps the
      model's evidence, is unchanged by a shift of all logits, and ranks masks as the probability
      does. On the demo model it costs little [0.246 against the probability's 0.225, slic ~19].
    - fill 0.0, a constant in model-input space (black for [0,1] images, the dataset mean colour
      for mean/std-normalised ones: the baseline of intg/deeplift and the default substrate
      of the metrics): a superpixel's own mean (lime_image's hide_color=None, the old default)
      leaves a uniform superpixel exactly as it is, so a patch, stroke or object part that is
      its own superpixel can never be switched off and gets no weight; superpixels are made as
      uniform as possible, so this holds on any data. [slic: 0.25 with 0.0, 0.41 with "mean",
      0.27 with "blur" at 2.3x the time.]
    - slic with 100 segments: the map can be no finer than its superpixels. quickshift at
      lime_image's settings gives 1-3 superpixels on 28x28 (lime#386) and ~8 at kernel 1, a
      number set by the content; slic's is set by n_segments, at any image size, and ~100 is
      lime_image's own regime on photographs (quickshift, kernel 4, at 224 px), with 1000
      samples still ~10 per superpixel. [quickshift ~8 superpixels 0.41-0.43, slic ~19: 0.25,
      ~38: 0.19, ~67 (n_segments=100): 0.17.]
    Cost: n_samples forward passes per image (distinct masked images only), all images'
    samples sent together in passes of max_forward_batch; one (S x S) solve per image.

    Extras: ``segments`` (int32[] H*W superpixel labels), ``weights`` (float32[] per
    superpixel), ``r2`` (weighted R^2 of the local model: its fidelity), ``intercept``,
    ``model_calls`` (masked images evaluated).
    """

    name = "lime"
    extras = {"segments": "int32[]", "weights": "float32[]", "r2": "float32",
              "intercept": "float32", "model_calls": "int64"}

    def __init__(self, model, n_samples: int = 1000, kernel_width: float = 0.25, alpha: float = 1.0,
                 score: str = "log_odds", segmentation: str = "slic",
                 segmentation_options: dict | None = None, min_segments: int = 4,
                 fill: float | str = 0.0, max_forward_batch: int | None = None):
        if segmentation == "slic":  # lime's own slic defaults, under whatever options are given
            segmentation_options = {**SLIC_OPTIONS, **(segmentation_options or {})}
        super().__init__(model, segmentation, segmentation_options, min_segments, fill, max_forward_batch)
        check_score(score)
        self.score = score
        if n_samples < 2:
            raise ValueError(f"n_samples must be >= 2, got {n_samples}")
        if kernel_width <= 0 or alpha < 0:
            raise ValueError(f"kernel_width must be > 0 and alpha >= 0, got {kernel_width}, {alpha}")
        self.n_samples = n_samples
        self.kernel_width = kernel_width
        self.alpha = alpha

    def passes(self):
        return {"forward": self.n_samples, "backward": 0}

    def explain(self, images, targets, seeds=None):
        segments, blackbox, seeds = self._prepare(images, targets, seeds, self.score)
        batch = len(segments)
        counts = [int(s.max()) + 1 for s in segments]
        masks = np.zeros((batch, self.n_samples, max(counts)), dtype=bool)
        for i, s in enumerate(counts):
            rng = np.random.default_rng(seeds[i])
            masks[i, :, :s] = rng.integers(0, 2, (self.n_samples, s), dtype=np.int8)
            masks[i, 0, :s] = True  # the first sample is the image itself
        probs, _ = blackbox.query(np.repeat(np.arange(batch), self.n_samples),
                                  masks.reshape(batch * self.n_samples, -1))
        x = masks.astype(np.float64)
        kernel = lime_kernel(x, np.asarray(counts), self.kernel_width)
        beta, intercept, r2 = weighted_ridge(x, probs.reshape(batch, self.n_samples), kernel, self.alpha)
        maps = np.stack([paint(beta[i, :s], segments[i]) for i, s in enumerate(counts)])
        extras = {
            "segments": [torch.from_numpy(s.reshape(-1)) for s in segments],
            "weights": [torch.from_numpy(beta[i, :s].astype(np.float32)) for i, s in enumerate(counts)],
            "r2": torch.from_numpy(r2.astype(np.float32)),
            "intercept": torch.from_numpy(intercept.astype(np.float32)),
            "model_calls": torch.from_numpy(blackbox.calls.copy()),
        }
        return Explanation(torch.from_numpy(maps).to(images.device), extras)
