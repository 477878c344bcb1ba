"""Sanity checks for saliency maps, pure PyTorch.

Cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018) re-initialises a trained
model's layers from the logits downwards, cumulatively; the maps of a method that explains the
*model* must drift away from the trained model's maps as more layers are randomised. The random
logit test (Sixt et al., ICML 2020) explains another class, drawn at random per image: a method
that explains the *decision* must give another map. Similarity is measured per image with
Spearman rank correlation (with and without absolute values) and SSIM.
"""
from __future__ import annotations

import copy
import zlib
from typing import Iterator

import torch

from saliency_audit.explainers.metrics._utils import (
    STREAM_RANDOM_LOGIT,
    STREAM_RANDOMIZATION,
    as_seed_list,
    check_maps,
    gaussian_kernel1d,
    generator,
    minmax_scale,
    separable_filter,
    stream_seed,
)

ROOT_NAME = "(root)"

# SSIM constants of Wang et al. (2004) for data range 1: C1 = (0.01)^2, C2 = (0.03)^2, a
# Gaussian window with sigma 1.5 truncated at 3.5 sigma (11x11), as scikit-image's
# structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False).
_SSIM_K1, _SSIM_K2, _SSIM_SIGMA, _SSIM_TRUNCATE = 0.01, 0.03, 1.5, 3.5


def parameterised_layers(model: torch.nn.Module,
                         example_input: torch.Tensor | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The modules that own parameters directly, top (logits) first.

    Without ``example_input`` the order is the reverse of registration order, which is the
    reverse of execution order for Sequential-style models. With it, one forward pass
    records the order in which the layers actually run, and that order is reversed
    (layers the pass never reaches come last). The root module is named "(root)" if it
    owns parameters itself.
    """
    layers = [(name or ROOT_NAME, module) for name, module in model.named_modules()
              if any(True for _ in module.parameters(recurse=False))]
    if example_input is None:
        return layers[::-1]
    seen: dict[int, int] = {}

    def record(module, inputs, output) -> None:       # returns None: the output is left alone
        seen.setdefault(id(module), len(seen))

    hooks = [module.register_forward_hook(record) for _, module in layers]
    try:
        with torch.inference_mode():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    run = sorted((layer for layer in layers if id(layer[1]) in seen), key=lambda layer: seen[id(layer[1])])
    never = [layer for layer in layers if id(layer[1]) not in seen]
    return run[::-1] + never[::-1]


def _has_parameterised_children(module: torch.nn.Module) -> bool:
    return any(True for child in module.children() for _ in child.parameters())


@torch.no_grad()
def reinitialise_(module: torch.nn.Module, seed: int) -> None:
    """Re-initialise the parameters ``module`` owns directly, in place, from ``seed``.

    Standard layers use their own ``reset_parameters`` (PyTorch's default initialisation;
    BatchNorm also resets its running statistics), run on a CPU copy under a forked,
    seeded RNG, so the result is the same on every device and the global RNG is untouched.
    Other modules get every direct parameter redrawn from a normal distribution truncated
    at 2 standard deviations, with the trained parameter's standard deviation (its absolute
    value for a single element), in the spirit of Adebayo et al.'s truncated-normal
    re-initialisation.
    """
    if hasattr(module, "reset_parameters") and not _has_parameterised_children(module):
        fresh = copy.deepcopy(module).to("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh.reset_parameters()
        owned = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in owned:
            tensor.copy_(getattr(fresh, name))
        return
    g = generator(seed, STREAM_RANDOMIZATION)
    for _, param in module.named_parameters(recurse=False):
        values = param.detach().double().cpu()
        scale = values.std() if values.numel() > 1 else values.abs().reshape(())
        draw = torch.empty(param.shape, dtype=torch.float64)
        torch.nn.init.trunc_normal_(draw, std=1.0, a=-2.0, b=2.0, generator=g)
        param.copy_((draw * scale).to(param.dtype))


def cascading_randomization(model: torch.nn.Module, seed: int = 0, *,
                            example_input: torch.Tensor | None = None
                            ) -> Iterator[tuple[str, torch.nn.Module]]:
    """Adebayo et al.'s cascading randomisation: yields (layer_name, randomised_model).

    Step i re-initialises the i-th parameterised layer from the top (see
    parameterised_layers) on top of all layers randomised before it, so the last model is
    entirely random. Every yielded model is its own deep copy (keeping one does not keep
    it changing), and ``model`` itself is never modified; its train/eval mode is kept.
    Each layer's draw depends only on ``seed`` and the layer's name.

    Args:
        model: the trained model.
        seed: int (default 0).
        example_input: optional [N,C,H,W] batch; if given, layers are ordered by one
            forward pass instead of by registration order.

    Yields:
        one (name, model) per parameterised layer, top (logits) first. Costs one model
        copy per step; drop the models you no longer need.
    """
    names = [name for name, _ in parameterised_layers(model, example_input)]
    current = model
    for name in names:
        current = copy.deepcopy(current)
        # named_modules, not get_submodule: TorchScript modules do not support the latter.
        module = current if name == ROOT_NAME else dict(current.named_modules())[name]
        reinitialise_(module, stream_seed(seed, STREAM_RANDOMIZATION, zlib.crc32(name.encode())))
        yield name, current


def random_other_classes(targets: torch.Tensor, num_classes: int, seeds=None) -> torch.Tensor:
    """Per image a class other than its target, uniform among the other num_classes - 1 and drawn
    from the image's seed (the random logit test's class). Needs num_classes >= 2."""
    if num_classes < 2:
        raise ValueError(f"the random logit test needs at least 2 classes, got {num_classes}")
    seeds = as_seed_list(seeds, len(targets))
    offsets = [1 + int(torch.randint(0, num_classes - 1, (1,), generator=generator(seed, STREAM_RANDOM_LOGIT)))
               for seed in seeds]
    return (targets.cpu().long() + torch.tensor(offsets, dtype=torch.long)) % num_classes


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    check_maps(a, "a")
    check_maps(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape [B,H,W], "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension of x [B,N], ties sharing their average rank, float64.

    0-based (scipy's rankdata minus one); the offset does not matter for correlations.
    """
    batch, n = x.shape
    values, order = torch.sort(x, dim=1, stable=True)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    # Give each run of equal values an id unique across the batch, then average positions per id.
    group = starts.long().cumsum(dim=1) - 1 + torch.arange(batch, device=x.device).view(-1, 1) * n
    positions = torch.arange(n, device=x.device, dtype=torch.float64).expand(batch, n)
    zeros = torch.zeros(batch * n, device=x.device, dtype=torch.float64)
    sums = zeros.index_add(0, group.flatten(), positions.flatten())
    counts = zeros.index_add(0, group.flatten(), torch.ones_like(positions).flatten())
    averaged = (sums / counts.clamp(min=1))[group]
    return torch.empty_like(averaged).scatter_(1, order, averaged)


def spearman_rank_correlation(a: torch.Tensor, b: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Spearman rank correlation between maps a and b [B,H,W], per image -> [B] float32.

    absolute: rank |a| and |b| instead of the signed values (Adebayo et al. report both;
        the absolute form ignores sign flips, which randomised layers often cause).
    Ties get their average rank, as scipy.stats.spearmanr. A constant map has no ranking,
    so its correlation is NaN.
    """
    _check_pair(a, b)
    b = b.to(a.device)
    batch = a.shape[0]
    a, b = a.detach().double(), b.detach().double()
    if absolute:
        a, b = a.abs(), b.abs()
    ra = average_ranks(a.reshape(batch, -1))
    rb = average_ranks(b.reshape(batch, -1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denominator = ra.norm(dim=1) * rb.norm(dim=1)
    rho = (ra * rb).sum(dim=1) / denominator
    return torch.where(denominator > 0, rho, torch.nan).clamp(-1, 1).float()


def sanity_rank_correlation(trained: torch.Tensor, other: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """The sanity checks' similarity of the trained model's maps and the maps of a randomised model (or
    for another class), per image -> [B] float32: spearman_rank_correlation, but 0 where ``other`` is
    constant and ``trained`` is not. Such a map has lost every ranking the trained one had (a mask map
    left empty because the random model's score does not drop), the opposite of a map that ignores
    the model. Left NaN, the image dropped out of the mean and the few images whose maps still ranked
    decided the verdict: mask on the reference CNN was flagged at 0.52 from one image of eight whose
    other seven randomised maps were empty (0.07 with them counted). NaN stays where the trained map
    is constant: there is no ranking to compare."""
    rho = spearman_rank_correlation(trained, other, absolute)
    a, b = (m.detach().to(trained.device).flatten(1) for m in (trained, other))
    if absolute:
        a, b = a.abs(), b.abs()
    lost = (b.amax(1) == b.amin(1)) & (a.amax(1) > a.amin(1))
    return torch.where(lost.to(rho.device), 0.0, rho)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity of maps a and b [B,H,W], per image -> [B] float32.

    Each map is first min-max scaled to [0,1] on its own (raw maps of a trained and a
    randomised model differ in scale by orders of magnitude, and SSIM is not scale
    invariant), so the data range is 1. Then the SSIM of Wang et al. (2004): Gaussian window
    sigma 1.5 truncated at 3.5 sigma (11x11; smaller for images under 11 px),
    K1 = 0.01, K2 = 0.03, population (co)variances, averaged over the positions where the
    window fits inside the image. Matches scikit-image's
    ``structural_similarity(x, y, data_range=1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``. 1 for identical maps.
    """
    _check_pair(a, b)
    b = b.to(a.device)
    height, width = a.shape[1:]
    x = minmax_scale(a.detach().double(), 1).unsqueeze(1)
    y = minmax_scale(b.detach().double(), 1).unsqueeze(1)
    radius = min(int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5), (min(height, width) - 1) // 2)
    kernel = gaussian_kernel1d(_SSIM_SIGMA, radius, device=a.device, dtype=torch.float64)

    def blur(t):
        return separable_filter(t, kernel, padding_mode=None)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = _SSIM_K1 ** 2, _SSIM_K2 ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1).float()
