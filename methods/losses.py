"""Pure loss functions, testable on tensors alone (no model, no state)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.dist import gather, mean_over_processes


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's InfoNCE (He et al. 2020, Eq. 1): for each query, the positive is its key and
    the negatives are the queue's entries. ``q``, ``k``: (N, D); ``queue``: (K, D) or None
    (then the other keys of the batch are the negatives). Inputs are L2-normalised here.
    Returns (mean loss, logits) with the positive in column 0."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1).detach()
    pos = (q * k).sum(1, keepdim=True)
    if queue is not None:
        neg = q @ F.normalize(queue, dim=1).detach().t()
    else:
        sim = q @ k.t()
        mask = ~torch.eye(len(q), dtype=torch.bool, device=q.device)
        neg = sim[mask].view(len(q), len(q) - 1)
    logits = torch.cat([pos, neg], 1) / temperature
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels), logits


def byol_regression(p: torch.Tensor, z: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """BYOL's normalised regression (Grill et al. 2020, Eq. 2): 2 - 2 cos(p, z), with no
    gradient through the target ``z``; mean over rows, or over the rows where ``weight`` (0/1,
    one per row) is 1 (0 when none is: no host sync, no data-dependent shape), counted over
    the global batch when distributed (``methods.dist.mean_over_processes``). SoCo (Eq. 3)
    sums it over views."""
    d = 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)
    if weight is None:
        return d.mean()
    w = weight.to(d.dtype)
    return (d * w).sum() / mean_over_processes(w.sum()).clamp(min=1)   # the global batch's rows


def grouped_info_nce(q: torch.Tensor, k: torch.Tensor, group: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """In-batch InfoNCE where rows with the same ``group`` id (an instance) are positives of
    each other (supervised-contrastive form): loss_i = -mean_{j in P(i)} log softmax_j."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1).detach()
    logits = q @ k.t() / temperature
    pos = (group[:, None] == group[None, :]).float()
    logp = logits.log_softmax(1)
    return -((logp * pos).sum(1) / pos.sum(1).clamp(min=1)).mean()


def masked_cosine_regression(p: torch.Tensor, z: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """PixPro's pixel-to-propagation consistency (Xie et al. 2021, Eq. 6): -cos between
    every matched pair (i, j) of pixels, no gradient through the target ``z``. ``p``:
    (N, C, Li), ``z``: (N, C, Lj), ``match``: (N, Li, Lj) 0/1. Mean over the matched pairs of
    each image, then over the images; an image whose two views share no pixel counts 0
    (official zdaxie/PixPro ``regression_loss``)."""
    p = F.normalize(p, dim=1)
    z = F.normalize(z, dim=1).detach()
    cos = torch.einsum("nci,ncj->nij", p, z)
    m = match.to(cos.dtype)
    per_image = (cos * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1)
    return -per_image.mean()


def pixel_info_nce(q: torch.Tensor, k: torch.Tensor, match: torch.Tensor,
                   temperature: float = 0.3) -> torch.Tensor:
    """PixContrast's pixel InfoNCE (Xie et al. 2021, Sec. 3.1): for pixel i of one view, the
    matched pixels P(i) of the other view are its positives and all its other pixels the
    negatives: loss_i = -log(sum_{j in P(i)} e^{cos(q_i, k_j)/tau} / sum_j e^{cos(q_i, k_j)/tau}).
    ``q``: (N, C, Li), ``k``: (N, C, Lj) (no gradient), ``match``: (N, Li, Lj) 0/1. Mean over
    the pixels with a positive (those in both views) of each image, then over the images; an
    image without one counts 0, as in ``masked_cosine_regression``."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1).detach()
    logits = torch.einsum("nci,ncj->nij", q, k) / temperature
    m = match.to(torch.bool)
    has = m.any(-1)                                         # (N, Li): pixel i has a positive
    pos = logits.masked_fill(~(m | ~has[..., None]), float("-inf")).logsumexp(-1)
    loss = (logits.logsumexp(-1) - pos) * has
    return (loss.sum(1) / has.sum(1).clamp(min=1)).mean()


def level_info_nce(q: torch.Tensor, k: torch.Tensor, queues: torch.Tensor, temperature: float,
                   weights=None) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """InsLoc's loss (Yang et al. 2021, Sec. 3.3; official ``insloc_fpn.py``): one InfoNCE per
    pyramid level, each against that level's queue, summed with ``weights`` (default 1).
    ``q``, ``k``: (N, L, D); ``queues``: (K, L, D). Returns (total, per-level losses,
    per-level logits with the positive in column 0)."""
    L = q.shape[1]
    weights = (1.0,) * L if weights is None else tuple(weights)
    if len(weights) != L:
        raise ValueError(f"level_info_nce: {len(weights)} weights for {L} levels")
    losses, logits = [], []
    for level in range(L):
        loss, lg = info_nce(q[:, level], k[:, level], queues[:, level], temperature)
        losses.append(loss)
        logits.append(lg)
    total = sum(w * l for w, l in zip(weights, losses))
    return total, losses, logits


@torch.no_grad()
def dense_correspondence(f_q: torch.Tensor, f_k: torch.Tensor) -> torch.Tensor:
    """For each query position, the key position of the most similar backbone feature:
    ``argmax_j cos(f_q[:, :, i], f_k[:, :, j])`` per image, one way (query -> key), no mutual
    check, no threshold (official densecl.py:196-197). ``f_q``: (N, C, Lq), ``f_k``: (N, C, Lk);
    returns (N, Lq) long indices into Lk."""
    sim = torch.einsum("nci,ncj->nij", F.normalize(f_q, dim=1), F.normalize(f_k, dim=1))
    return sim.argmax(2)


def dense_info_nce(q_grid: torch.Tensor, k_grid: torch.Tensor, match: torch.Tensor, queue: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DenseCL's dense loss (paper Eq. 2; official densecl.py:199-210): one InfoNCE row per query
    position i of every image, positive q_grid[i] . k_grid[match[i]], negatives the queue's
    (pooled dense) keys, shared by all positions; mean over the N x Lq rows. ``q_grid``,
    ``k_grid``: (N, D, L); ``match``: (N, Lq); ``queue``: (K, D). Inputs L2-normalised here,
    no gradient through the keys. Returns (loss, logits with the positive in column 0)."""
    q = F.normalize(q_grid, dim=1)
    k = F.normalize(k_grid, dim=1).detach()
    k_pos = k.gather(2, match.unsqueeze(1).expand(-1, k.shape[1], -1))      # (N, D, Lq)
    pos = (q * k_pos).sum(1).reshape(-1, 1)                                  # rows (n, i), row-major
    rows = q.permute(0, 2, 1).reshape(-1, q.shape[1])
    neg = rows @ F.normalize(queue, dim=1).detach().t()
    logits = torch.cat([pos, neg], 1) / temperature
    labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels), logits


# AlignDet marks samples that belong to no pseudo box with a negative id, never with a number
# that an instance id can take (the official code's background label 256 collides with the
# 257th instance of a batch).
BACKGROUND = -1


def instance_contrastive(online: torch.Tensor, online_ids: torch.Tensor, target: torch.Tensor,
                         target_ids: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """AlignDet's box-level contrastive loss (Li et al. 2023, Eq. 3; official
    ``ContrastiveLoss`` and ``SelfSupConvFCBBoxHead.loss``), shared by every detector.

    ``online`` (M, D) / ``target`` (N, D): embeddings of the samples (RoIs, anchors, points,
    queries) of view 1 and view 2; ``*_ids`` their instance ids (>= 0) or ``BACKGROUND`` (< 0).
    For each instance id c present in the online samples:
        queries Q = online samples of c, keys K = target samples of c (none: K = Q),
        negatives = every other sample of both views (other ids and background, stop-gradient);
        loss_c = mean over (k, q) in K x Q of -log( e^{q.k/t} / (e^{q.k/t} + sum_n e^{q.n/t}) )
    on L2-normalised vectors; the loss is the mean of loss_c over the ids (0 with none).
    Computed for all ids at once (one similarity matrix, queries x all samples) instead of
    the official loop over ids, which copies every negative once per id; same values and
    gradients (tests/test_aligndet.py)."""
    q_all = F.normalize(online, dim=1)
    t_all = F.normalize(target, dim=1)
    is_query = online_ids >= 0
    if not is_query.any():
        return online.sum() * 0.0
    q, qid = q_all[is_query], online_ids[is_query]
    cols = torch.cat([q_all, t_all])                    # every sample of both views
    col_ids = torch.cat([online_ids, target_ids])
    same = qid[:, None] == col_ids[None]                # (Q, M + N)
    # negatives: one pass over all columns (stop-gradient on them), same-id columns masked
    neg = (q @ cols.detach().t() / temperature).masked_fill(same, float("-inf")).logsumexp(1)
    # keys: the target samples of the id, or (none there) the online samples of the id
    from_target = torch.cat([torch.zeros_like(online_ids, dtype=torch.bool),
                             torch.ones_like(target_ids, dtype=torch.bool)])
    has_key = (same & from_target).any(1)
    r, c = torch.nonzero(same & (from_target[None] == has_key[:, None]), as_tuple=True)
    pos = (q[r] * cols[c]).sum(1) / temperature         # (pairs,): -log e^pos / (e^pos + sum e^neg)
    pair_loss = torch.logaddexp(pos, neg[r]) - pos
    # mean over each id's (key, query) pairs, then over ids
    _, group = torch.unique(qid, return_inverse=True)
    g = group[r]
    n_groups = int(group.max()) + 1
    per_id = pair_loss.new_zeros(n_groups).index_add(0, g, pair_loss)
    return (per_id / torch.bincount(g, minlength=n_groups).to(per_id.dtype)).mean()


def _sum_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over processes, in rank order (``x`` in one process)."""
    return gather(x.unsqueeze(0)).sum(0)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """SwAV's codes (Caron et al. 2020, Sec. 3.1, Eq. 3 and the Appendix A.1 pseudo-code;
    official facebookresearch/swav ``main_swav.py: distributed_sinkhorn``): Q = exp(scores /
    eps)^T (K prototypes x B samples) scaled to sum to 1, then ``iterations`` times each
    prototype's row to 1/K and each sample's column to 1/B; returned x B, (N, K), so that each
    sample's code sums to 1 and (at convergence) each prototype takes B/K of the batch.

    ``scores``: (N, K) this process's samples; the sums run over the global batch (the
    official all-reduces them): W processes holding a split compute what one process holding
    all computes. ``weight``: optional 0/1 per sample (N,), 0 leaves it out of the problem
    (its code is 0): SwAV's queue before it is full, without a data-dependent shape or a host
    sync. In float32, shifted by the global maximum score first (exp(20) = exp(1 / 0.05)
    overflows half precision; the shift cancels in the first normalisation)."""
    s = scores.float()
    top = gather(s.max().reshape(1)).max()
    Q = torch.exp((s - top) / epsilon).t()                           # K x N
    w = torch.ones(s.shape[0], dtype=Q.dtype, device=Q.device) if weight is None else weight.to(Q.dtype)
    Q = Q * w
    B = _sum_over_processes(w.sum())                                 # samples in the problem
    K = Q.shape[0]
    tiny = torch.finfo(Q.dtype).tiny
    Q = Q / _sum_over_processes(Q.sum())
    for _ in range(iterations):
        Q = Q / _sum_over_processes(Q.sum(1, keepdim=True)).clamp(min=tiny) / K   # rows: 1/K each
        Q = Q / Q.sum(0, keepdim=True).clamp(min=tiny) / B                     # columns: 1/B each
    return (Q * B).t()


def swapped_prediction(scores, codes, temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction loss (Caron et al. 2020, Eq. 1-2; official ``main_swav.py``):
    the code of each assigned crop c is predicted from every other crop v by the softmax of
    its prototype scores at ``temperature``: mean over (c, v != c) of
    -mean_b sum_k q_c[b, k] log softmax(s_v[b] / t)_k, first over v (divided by the crop count
    - 1), then over c. ``scores``: per crop (B, K); ``codes``: [(c, q_c (B, K))], no gradient."""
    n = len(scores)
    if n < 2:
        raise ValueError(f"swapped_prediction: {n} crop(s); it needs two or more")
    logp = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    total = 0.0
    for c, q in codes:
        q = q.detach().float()
        total = total + sum(-(q * logp[v]).sum(1).mean() for v in range(n) if v != c) / (n - 1)
    return total / len(codes)
