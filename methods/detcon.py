"""DetCon (Hénaff, Koppula, Alayrac, van den Oord, Vinyals, Carreira; ICCV 2021, "Efficient
Visual Pretraining with Contrastive Detection", arXiv:2103.10957; official code (JAX)
deepmind/detcon, DetCon_B only: detcon_b.py, configs/detcon_b_config.py, utils/losses.py).

Pseudo-code (paper Sec. 3; official detcon_b.py), recognisable in ``views`` and ``forward``:
    m = FH(x)                                  Felzenszwalb-Huttenlocher ids, once per dataset
                                               (benchmark/data/mask_cache.py, scale 1000, min size 1000)
    v, v' = t(x), t'(x);  m, m' = t(m), t'(m)  the masks cropped, flipped, resized (nearest) with their pixels
    y = f(v)                                   C5 feature map, 7x7 at 224 px
    a = argmax_id avgpool(onehot(m))           each grid cell owned by one id
    k_1..k_16 ~ U(ids present in a)            per view, with replacement
    h_k = mean of y over the cells of id k     mask pooling
    DetCon_B: p = q(g(h)), online; z = g'(f'(v)) target (EMA, no gradient)      (BYOL's networks)
    DetCon_S: p = z = g(h), one network for both views, gradients through both (SimCLR's)
    L = CE(p_1 . [z_2 ++ z_1] / 0.1, positives: z_2 of the same image and id)   + the 2 -> 1 term
    theta <- LARS(grad L);  DetCon_B: xi <- tau xi + (1 - tau) theta

Mask pooling, sampling and the loss run on the training device without host syncs.
Choices and official-vs-paper decisions: docs/methods/detcon.md
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from methods.augment import BYOL_AUG_1, BYOL_AUG_2, JITTER_STYLES, Photometric, as_image, decode_for, render_view
from methods.backbones import backbone_state, build_resnet, resnet_stages
from methods.base import MethodConfig, PretrainMethod
from methods.byol import BYOL, CROPS, TARGET_INITS, byol_head, official_crop, target_network
from methods.dist import distributed, gather, rank_and_world
from methods.ema import cosine_schedule, update_momentum
from methods.geometry import ViewGeometry, apply_mask, random_resized_crop
from methods.registry import register_method

VARIANTS = ("b", "s")
# DetCon_S uses SimCLR's augmentations (paper Sec. 3.2): colour jitter strength 1.0
# (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale p 0.2, Gaussian blur p 0.5 on both views
# (SimCLR Appendix A), no solarisation
SIMCLR_AUG = Photometric(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.0)
_LARGE = 1e9   # official utils/losses.py LARGE_NUM: removes the same-view same-mask logits


# -- masks on the device ----------------------------------------------------------------
def grid_assignment(masks: torch.Tensor, grid: tuple[int, int], num_ids: int) -> torch.Tensor:
    """The id owning each cell of a (gh, gw) feature grid laid over (B, H, W) id maps (ids
    < ``num_ids``): each id's pixel share in the cell's window (official detcon_b.py: one-hot
    over 256 ids, 32x32 average pool, stride 32), then the arg-max over ids, ties to the lowest
    id (jnp.argmax; torch.argmax returns the first maximum too). Window edges at
    floor(i * gh / H): the 32-px windows when H is a multiple of gh. Returns (B, gh * gw) long,
    cells in row-major order (as ``feature.flatten(2)``)."""
    B, H, W = masks.shape
    gh, gw = grid
    dev = masks.device
    rows = torch.arange(H, device=dev) * gh // H
    cols = torch.arange(W, device=dev) * gw // W
    cell = rows[:, None] * gw + cols[None, :]                           # (H, W)
    index = (cell[None] * num_ids + masks.long()).flatten(1)            # (B, H*W)
    counts = torch.zeros(B, gh * gw * num_ids, device=dev).scatter_add_(
        1, index, torch.ones(index.shape, device=dev))
    return counts.view(B, gh * gw, num_ids).argmax(-1)


def present_ids(assign: torch.Tensor, num_ids: int) -> torch.Tensor:
    """(B, num_ids) bool: the ids that own at least one cell (official ``mask_exists``)."""
    return torch.zeros(assign.shape[0], num_ids, dtype=torch.bool, device=assign.device).scatter_(
        1, assign, True)


def sample_mask_ids(assign: torch.Tensor, num_ids: int, n: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` ids per image drawn uniformly among the present ones, with replacement (official
    detcon_b.py: ``jax.random.categorical`` over log(mask_exists), 16 draws): the Gumbel-max
    trick on equal logits. ``noise``: (B, n, num_ids) uniforms in (0, 1), else drawn here.
    Returns (B, n) long."""
    if noise is None:
        noise = torch.rand(assign.shape[0], n, num_ids, device=assign.device)
    gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-7)))
    return gumbel.masked_fill(~present_ids(assign, num_ids)[:, None, :], float("-inf")).argmax(-1)


def mask_pool(feat: torch.Tensor, assign: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of the (B, C, gh, gw) features over the cells owned by each sampled id: the binary
    mask over the cells divided by max(its area, 1), times the features (official
    detcon_b.py). ``assign`` (B, L), ``ids`` (B, n). Returns (B, n, C)."""
    sel = (assign[:, None, :] == ids[:, :, None]).to(feat.dtype)       # (B, n, L)
    sel = sel / sel.sum(-1, keepdim=True).clamp(min=1)
    return sel @ feat.flatten(2).transpose(1, 2)


# -- the loss ---------------------------------------------------------------------------
def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / sqrt(max(|x|^2, eps)) (official utils/helpers.py ``l2_normalize``)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True).clamp(min=eps))


def contrastive_detection(pred: torch.Tensor, ids: torch.Tensor, other: torch.Tensor, other_ids: torch.Tensor,
                          same: torch.Tensor, same_ids: torch.Tensor, temperature: float = 0.1,
                          offset: int = 0) -> torch.Tensor:
    """One direction of DetCon's loss (official utils/losses.py ``manual_cross_entropy`` /
    ``byol_nce_detcon``). ``pred`` (B, n, D) this view's local predictions with their ``ids``
    (B, n); ``other`` / ``same``: the other view's and this view's targets over the global
    batch (G, n, D) with their ids (G, n); local image b is global image ``offset + b``.

    For row (b, k) the logits are its cosine similarity / ``temperature`` with every entry of
    [other ++ same]. Labels: uniform over the ``other`` entries of the same image with the same
    id (duplicates share it); the ``same`` entries of the same image and id (itself included)
    are removed (-1e9); every other entry is a negative. Row weight: 1 / (times the row's id
    was drawn in this view of its image), 0 without a positive. Mean over all B * n rows."""
    B, n, _ = pred.shape
    G = other.shape[0]
    p = l2_normalize(pred.float()).flatten(0, 1)                          # (B n, D)
    lo = (p @ l2_normalize(other.float()).flatten(0, 1).T).view(B, n, G, n) / temperature
    ls = (p @ l2_normalize(same.float()).flatten(0, 1).T).view(B, n, G, n) / temperature
    img = torch.arange(B, device=pred.device) + offset
    same_img = (img[:, None] == torch.arange(G, device=pred.device)[None])[:, None, :, None]   # (B, 1, G, 1)
    pos = same_img & (ids[:, :, None, None] == other_ids[None, None])
    drop = same_img & (ids[:, :, None, None] == same_ids[None, None])
    ls = ls - _LARGE * drop
    n_pos = pos.sum((2, 3))                                               # (B, n)
    labels = pos / n_pos.clamp(min=1)[..., None, None]
    logp = torch.cat([lo.flatten(2), ls.flatten(2)], -1).log_softmax(-1)
    ce = -(labels.flatten(2) * logp[..., :G * n]).sum(-1)                 # (B, n)
    draws = (ids[:, :, None] == ids[:, None, :]).sum(-1)                  # (B, n)
    weight = (n_pos > 0) / draws
    return (ce * weight).mean()


class _GatherWithGrad(torch.autograd.Function):
    """All processes' ``x`` in rank order; the backward sums the gradient over processes and
    returns this process's slice (DetCon_S: gradients reach the targets of other processes'
    rows, as in one process)."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.n = rank_and_world()[0], x.shape[0]
        return gather(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _GatherWithGrad.apply(x) if distributed() else x


def relabel_pair(m1: np.ndarray, m2: np.ndarray, num_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids of an image's two view masks renumbered 0..u-1 in their order (the same map for
    both views, so an id means the same segment in each), wrapped modulo ``num_ids`` past it
    (the official uint8 cast wraps the image's ids the same way)."""
    u, inv = np.unique(np.concatenate([m1.ravel(), m2.ravel()]), return_inverse=True)
    inv = inv % num_ids if len(u) > num_ids else inv
    dtype = np.uint8 if num_ids <= 256 else np.int32
    return inv[:m1.size].reshape(m1.shape).astype(dtype), inv[m1.size:].reshape(m2.shape).astype(dtype)


@register_method("detcon")
class DetCon(PretrainMethod):
    # DetCon_B, official detcon_b_config.py / pretrain_common.py at 1000 epochs: LARS (eta 1e-3,
    # momentum 0.9; biases and BN out of weight decay and adaptation), base lr 0.2 x B/256, wd
    # 1.5e-6, batch 4096, warm-up num_epochs // 100 = 10 epochs from 0, then cosine to 0.
    # DetCon_S (not in the official code): SimCLR's LARS settings, a table row's
    # recipe_overrides {base_lr: 0.3, weight_decay: 1.0e-6} (docs/methods/detcon.md).
    recipe = BYOL.recipe   # the same LARS recipe as BYOL's 1000 epochs (the values above)
    # tiny and small as BYOL's: ResNet-18 at 64 px (a 2x2 C5 grid), heads 512-128, batch 32,
    # tau_base 0.9 (the target forgets its independent init within the run)
    scales = BYOL.scales
    loaders = ("cpu", "cpu_draft", "device")
    sync_bn = True   # official bn_config cross_replica_axis: BN over the global batch

    @dataclass
    class Config(MethodConfig):
        variant: str = "b"               # "b": DetCon_B (BYOL's networks, official) | "s": DetCon_S (SimCLR's)
        backbone: str = "resnet50"
        zero_init_residual: bool = True  # haiku BlockV1: the last BN of each bottleneck starts at 0
        proj_hidden_dim: int = 4096      # projector 2048-4096-256 (official networks.MLP, config:37-38)
        proj_dim: int = 256
        pred_hidden_dim: int = 4096      # DetCon_B's predictor 256-4096-256 (detcon_b.py:187-188)
        momentum: float = 0.996          # DetCon_B tau_base, to 1 on a cosine (config:76)
        temperature: float = 0.1         # config:79
        num_masks: int = 16              # ids drawn per view, with replacement (n_random_vectors)
        max_mask_id: int = 256           # ids per image (official one-hot depth)
        view_size: int = 224
        crop_scale: tuple[float, ...] = (0.08, 1.0)
        crop: str = "official"           # one draw clipped to the image (tf_image_ops.py) | "torchvision"
        jitter_style: str = "tf"         # BYOL's official colour ops | "torchvision"
        target_init: str = "independent"  # DetCon_B: the target's own random init (detcon_b.py:374-390) | "copy"
        # Felzenszwalb-Huttenlocher masks (generate_fh_masks_for_imagenet.py): scale 1000,
        # min_size 1000 px, sigma scikit-image's default 0.8, at the image's full resolution
        fh_scale: float = 1000.0
        fh_min_size: int = 1000
        fh_sigma: float = 0.8
        fh_max_side: int = 0             # 0: full resolution; else segment a copy this long

        def ranges(self):
            return [("variant", self.variant in VARIANTS, " | ".join(VARIANTS)),
                    ("crop", self.crop in CROPS, " | ".join(CROPS)),
                    ("jitter_style", self.jitter_style in JITTER_STYLES, " | ".join(JITTER_STYLES)),
                    ("target_init", self.target_init in TARGET_INITS, " | ".join(TARGET_INITS)),
                    ("temperature", self.temperature > 0, "> 0"),
                    ("num_masks", self.num_masks >= 1, ">= 1"),
                    ("max_mask_id", 1 <= self.max_mask_id <= 65536, "in [1, 65536]"),
                    ("momentum", 0 <= self.momentum <= 1, "in [0, 1]"),
                    ("fh_scale", self.fh_scale > 0, "> 0"), ("fh_min_size", self.fh_min_size >= 1, ">= 1"),
                    ("fh_sigma", self.fh_sigma >= 0, ">= 0"), ("fh_max_side", self.fh_max_side >= 0, ">= 0")]

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.encoder = build_resnet(cfg.backbone, zero_init_residual=cfg.zero_init_residual)
        feat = self.encoder.feature_dim
        self.projector = byol_head(feat, cfg.proj_hidden_dim, cfg.proj_dim)
        if cfg.variant == "b":   # BYOL's predictor q and EMA target (encoder + projector)
            self.predictor = byol_head(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
            self.target_encoder, self.target_projector = target_network(cfg, self.encoder, self.projector)
            self.aug = (replace(BYOL_AUG_1, jitter_style=cfg.jitter_style),
                        replace(BYOL_AUG_2, jitter_style=cfg.jitter_style))
        else:
            self.aug = (replace(SIMCLR_AUG, jitter_style=cfg.jitter_style),) * 2
        self.current_momentum = cfg.momentum

    # -- masks (computed once per dataset by the harness, cached) ---------------------------
    def mask_params(self) -> dict | None:
        c = self.cfg
        return {"scale": c.fh_scale, "sigma": c.fh_sigma, "min_size": c.fh_min_size, "max_side": c.fh_max_side or None}

    # -- views (DataLoader worker): v = t(x), m_v = t(m) ------------------------------------
    def geometry(self, width: int, height: int, rng: np.random.Generator) -> ViewGeometry:
        scale = tuple(self.cfg.crop_scale)
        crop = (official_crop(width, height, rng, scale) if self.cfg.crop == "official"
                else random_resized_crop(width, height, rng, scale))
        size = self.cfg.view_size
        return ViewGeometry(crop, (size, size), bool(rng.random() < 0.5))   # flip p 0.5, before the resize

    def views(self, record: dict, rng: np.random.Generator, source=None) -> dict:
        if "masks" not in record:
            raise KeyError("detcon: the record has no 'masks' (the pretraining stage reads them from the mask "
                           "cache named by mask_params())")
        img = as_image(record["image"])
        W, H = img.size
        mask = np.asarray(record["masks"])
        if mask.size == 0:   # an image the cache could not decode: one segment
            mask = np.zeros((1, 1), np.uint8)
        geoms = [self.geometry(W, H, rng) for _ in range(2)]
        decode_for(img, geoms)
        out = {name: render_view(img, g, aug, rng) for name, g, aug in zip(("view1", "view2"), geoms, self.aug)}
        m1, m2 = relabel_pair(*(apply_mask(mask, g, (W, H)) for g in geoms), self.cfg.max_mask_id)
        out["mask1"], out["mask2"] = torch.from_numpy(m1), torch.from_numpy(m2)
        return out

    # -- model ----------------------------------------------------------------------------
    def param_groups(self):
        heads = [*self.projector.parameters()]
        if self.cfg.variant == "b":
            heads += [*self.predictor.parameters()]
        return [{"params": [*self.encoder.parameters(), *heads]}]

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        """DetCon_B: xi <- tau xi + (1 - tau) theta, tau = 1 - (1 - tau_base)(cos(pi k/K) + 1)/2
        (detcon_b.py:334-340); BN statistics are not averaged. DetCon_S: nothing."""
        if self.cfg.variant != "b":
            return
        self.current_momentum = cosine_schedule(progress, self.cfg.momentum)
        update_momentum(self.encoder, self.target_encoder, self.current_momentum)
        update_momentum(self.projector, self.target_projector, self.current_momentum)

    def sample_ids(self, assign: torch.Tensor) -> torch.Tensor:
        """The view's 16 ids per image; the uniforms are drawn for the global batch and sliced,
        so the draws do not depend on the process count."""
        rank, world = rank_and_world()
        B, K, n = assign.shape[0], self.cfg.max_mask_id, self.cfg.num_masks
        noise = torch.rand(world * B, n, K, device=assign.device)[rank * B:(rank + 1) * B]
        return sample_mask_ids(assign, K, n, noise)

    def forward(self, batch: dict) -> dict:
        c, K = self.cfg, self.cfg.max_mask_id
        views, masks = (batch["view1"], batch["view2"]), (batch["mask1"], batch["mask2"])
        # each view through each network on its own (BN statistics per view, as BYOL's _forward)
        feats = [resnet_stages(self.encoder, v)[-1] for v in views]     # C5, (B, C, gh, gw)
        assign = [grid_assignment(m, f.shape[-2:], K) for m, f in zip(masks, feats)]
        ids = [self.sample_ids(a) for a in assign]               # views sampled independently
        B, n = ids[0].shape

        def head(h: torch.Tensor, *mlps) -> torch.Tensor:        # BN over all B * n vectors
            h = h.flatten(0, 1)
            for mlp in mlps:
                h = mlp(h)
            return h.view(B, n, -1)

        if c.variant == "b":
            preds = [head(mask_pool(f, a, k), self.projector, self.predictor) for f, a, k in zip(feats, assign, ids)]
            with torch.no_grad():   # the target sees the same masks and ids as the online network
                targets = [head(mask_pool(resnet_stages(self.target_encoder, v)[-1], a, k), self.target_projector)
                           for v, a, k in zip(views, assign, ids)]
            all_targets = [gather(t) for t in targets]
        else:                        # DetCon_S: one network, gradients through both sides
            preds = targets = [head(mask_pool(f, a, k), self.projector) for f, a, k in zip(feats, assign, ids)]
            all_targets = [gather_with_grad(t) for t in targets]
        all_ids = [gather(k) for k in ids]
        offset = rank_and_world()[0] * B
        loss_12 = contrastive_detection(preds[0], ids[0], all_targets[1], all_ids[1], all_targets[0], all_ids[0],
                                        c.temperature, offset)
        loss_21 = contrastive_detection(preds[1], ids[1], all_targets[0], all_ids[0], all_targets[1], all_ids[1],
                                        c.temperature, offset)
        masks_per_view = sum(present_ids(a, K).sum(1).float().mean() for a in assign) / 2
        return {"loss": loss_12 + loss_21,                       # summed, not averaged (losses.py:151)
                "loss_12": loss_12.detach(), "loss_21": loss_21.detach(), "masks_per_view": masks_per_view.detach()}

    def export(self) -> dict[str, torch.Tensor]:
        return backbone_state(self.encoder)
