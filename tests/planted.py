"""The planted-feature protocol, shared by tests/explainers/test_planted_feature.py (the CNN),
tests/explainers/test_transformer_quality.py and benchmarks/transformer_quality.py (the ViT and
the ConvNeXt): noise images whose class is only the presence of a small bright patch at a random
position, and the scores that say whether a map found it."""
import numpy as np
import torch

PATCH = 4
MARGIN = 2  # pixels of slack around the patch


def planted(n, seed):
    """[n,1,28,28] uniform noise in [0,0.5]; class 1 images carry a 4x4 patch of 1.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g) * 0.5
    y = torch.randint(0, 2, (n,), generator=g)
    corners = torch.randint(0, 28 - PATCH + 1, (n, 2), generator=g)
    for i in torch.nonzero(y).flatten().tolist():
        r, c = corners[i].tolist()
        x[i, 0, r:r + PATCH, c:c + PATCH] = 1.0
    return x, y, corners


def patch_region(m, r, c):
    return m[max(r - MARGIN, 0):r + PATCH + MARGIN, max(c - MARGIN, 0):c + PATCH + MARGIN]


def mass_on_patch(maps, corners):
    """Per image: the share of the map's positive mass on the patch (with margin); 0 for a
    map with no positive value, which points nowhere."""
    shares = []
    for m, (r, c) in zip(maps, corners.tolist()):
        positive = m.clamp(min=0).sum()
        shares.append((patch_region(m, r, c).clamp(min=0).sum() / positive).item() if positive > 0 else 0.0)
    return np.array(shares)


def on_patch(maps, corners):
    """Per image: the map's maximum lies on the patch (with margin; ties count, since a
    mask's maximum is a plateau) or at least half of its positive mass does. A constant map
    points nowhere: a miss (its maximum is everywhere, the patch included)."""
    hits = []
    for m, (r, c), mass in zip(maps, corners.tolist(), mass_on_patch(maps, corners)):
        top = patch_region(m, r, c).max() >= m.max() - 1e-6 * m.abs().max()
        hits.append(bool(m.max() > m.min()) and (bool(top) or mass >= 0.5))
    return sum(hits) / len(hits)
