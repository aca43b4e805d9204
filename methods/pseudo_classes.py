"""AlignDet's pseudo-classes for DETR (Li et al. 2023, Sec. 3.3): the selective-search
proposals of the pretraining set are clustered into 256 classes by k-means over their
RoIAlign features (PCA to 256 dimensions first), and DETR learns to classify its matched
queries into these classes. The official clustering code was not released; this is ours:

    f_i   = mean over the 7x7 RoIAlign cells of proposal i on the backbone's last map
    g_i   = PCA(f)_i  (256 components, signs fixed so the result does not depend on the SVD)
    c     = k-means++ seeds from a seeded generator, then Lloyd iterations to a fixed point
    y_i   = argmin_j |g_i - c_j|  (exactly one class per proposal)

Deterministic for a seed on a given device (ties go to the lowest index).
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align


@torch.no_grad()
def roi_features(feature_map: torch.Tensor, boxes: list[torch.Tensor], stride: float,
                 output_size: int = 7) -> torch.Tensor:
    """(P, C): RoIAlign (aligned, ``output_size``^2 cells) of each image's xyxy ``boxes`` (pixels)
    on ``feature_map`` (N, C, H, W) of the given stride, averaged over the cells; images in order."""
    rois = [b.to(feature_map.dtype) for b in boxes]
    pooled = roi_align(feature_map, rois, output_size, spatial_scale=1.0 / stride, sampling_ratio=2, aligned=True)
    return pooled.mean((2, 3))


def pca(x: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Project centred rows of ``x`` (P, D) on their first ``min(dim, D, P)`` principal axes;
    each axis is signed so that its largest-magnitude loading is positive."""
    x = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    vh = vh[:dim]
    sign = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
    return x @ (vh * sign).t()


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (Lloyd) with k-means++ seeding (Arthur & Vassilvitskii 2007) drawn from
    ``torch.Generator().manual_seed(seed)``. Returns (labels (P,), centres (k, D)). An emptied
    cluster is re-seeded with the point farthest from its centre."""
    x = x.double()
    n = len(x)
    if n < k:
        raise ValueError(f"kmeans: {n} points for {k} clusters (need at least as many points as clusters)")
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=g)]
    d2 = torch.cdist(x, centres).squeeze(1) ** 2
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        nxt = x[torch.multinomial(p.float().cpu(), 1, generator=g).to(x.device)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, (torch.cdist(x, nxt).squeeze(1)) ** 2)
    labels = torch.cdist(x, centres).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = labels == j
            if members.any():
                centres[j] = x[members].mean(0)
            else:
                centres[j] = x[torch.cdist(x, centres).min(1).values.argmax()]
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, centres


def pseudo_classes(features: torch.Tensor, k: int = 256, pca_dim: int = 256, seed: int = 0,
                   iters: int = 100) -> torch.Tensor:
    """One pseudo-class in [0, k) per row of ``features`` (P, D): PCA to ``pca_dim``, then k-means."""
    labels, _ = kmeans(pca(features, pca_dim), k, seed, iters)
    return labels
