"""InfoMin (Tian, Sun, Poole, Krishnan, Schmid, Isola 2020, "What Makes for Good Views for
Contrastive Learning?", NeurIPS; arXiv:2005.10243), the SoCo Table 1 row of 200 epochs: the
checkpoint ``InfoMin_200.pth`` of HobbitLong/PyContrast, "InfoMin Aug + JigSaw" in the MoCo v2
framework (``--method InfoMin``: ``options/base_options.py`` override_dict
``['RGB', True, 'moco', 'D', 'mlp', 0.15]``).

Pseudo-code (PyContrast ``learning/contrast_trainer.py: _train_moco``), recognisable in ``forward``:
    q = g(f(x_q)); q_jig = g_jig(f(9 patches of x_jig)); k = g_k(f_k(x_k)).detach()
    loss = (1 - beta) InfoNCE(q, k, queue, t) + beta InfoNCE(q_jig, k, queue, t)
    f_k = m f_k + (1 - m) f ; enqueue(k)

Choices and official-vs-paper decisions: docs/methods/infomin.md
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from methods.augment import Photometric, as_image, decode_for, render_view
from methods.backbones import backbone_state, build_resnet
from methods.base import MethodConfig, PretrainMethod, PretrainRecipe
from methods.dist import gather, rank_and_world
from methods.ema import momentum_copy, update_momentum
from methods.geometry import random_view
from methods.heads import MLPHead, moco_v2_projector
from methods.losses import info_nce
from methods.moco import MoCoV2
from methods.queues import MemoryQueue
from methods.randaug import rand_augment
from methods.registry import register_method
from methods.shuffle_bn import in_bn_groups, shuffle_bn


@dataclass(frozen=True)
class InfoMinAug:
    """PyContrast ``datasets/util.py`` ``build_transforms`` aug "D" after the crop and flip:
    colour jitter (0.8, 0.8, 0.8, 0.2) with p 0.8, Gaussian blur sigma U(0.1, 2) with p 0.5,
    RandAugment ``rand-n2-m10-mstd0.5`` (``methods.randaug.rand_augment``), grayscale p 0.2,
    in that order. Called as ``aug(img, rng)`` on a PIL view (loaders ``cpu``, ``cpu_draft``)."""
    jitter_blur: Photometric = Photometric(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.0,
                                           blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.0)
    randaug_layers: int = 2
    randaug_magnitude: float = 10.0
    randaug_std: float = 0.5
    gray_p: float = 0.2

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = self.jitter_blur(img, rng)
        img, _ = rand_augment(img, rng, self.randaug_layers, self.randaug_magnitude, self.randaug_std)
        if rng.random() < self.gray_p:
            img = ImageOps.grayscale(img).convert("RGB")
        return img


NO_PHOTO = Photometric(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def jigsaw_patches(view: torch.Tensor, grid: int, patch: int, rng: np.random.Generator) -> torch.Tensor:
    """PyContrast ``JigsawCrop``: the view (3, S, S) cut into grid x grid cells of S // grid
    pixels, a ``patch``-px square at a uniform offset inside each; returned (grid^2, 3, patch,
    patch) in a random order (the official head's per-image shuffle, ``JigsawHead.
    get_shuffle_ids``, drawn here with the sample's rng: "this step can be moved to data
    processing", its comment)."""
    cell = view.shape[-1] // grid
    side = cell - patch
    off = rng.integers(0, side + 1, size=(grid * grid, 2))
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    out = [view[:, r * cell + oy:r * cell + oy + patch, c * cell + ox:c * cell + ox + patch]
           for (r, c), (oy, ox) in zip(cells, off)]
    return torch.stack([out[i] for i in rng.permutation(len(out))])


class JigsawHead(nn.Module):
    """PyContrast ``networks/util.py: JigsawHead`` with ``head='mlp'``: each patch's feature
    through fc1 (Linear-ReLU-Linear, 2048-2048-128), the patches of an image concatenated in
    their (shuffled) order, fc2 Linear(9 x 128, 128), L2-normalised."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, patches: int = 9):
        super().__init__()
        self.patches = patches
        self.fc1 = MLPHead(in_dim, hidden_dim, out_dim, batch_norm=False)
        self.fc2 = nn.Linear(out_dim * patches, out_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.fc1(feats).reshape(-1, self.fc2.in_features)      # (B, 9 x 128), image-major rows
        return F.normalize(self.fc2(x), dim=1)


@register_method("infomin")
class InfoMin(PretrainMethod):
    # PyContrast options/base_options.py defaults: SGD lr 0.03 at the global batch 256,
    # momentum 0.9, wd 1e-4, 200 epochs, lr x 0.1 at epochs 120 and 160 (--cosine not given in
    # docs/RUN.md's command), no warm-up at batch 256 (train_options.py: warm-up only above 256)
    sync_bn = False   # per-GPU BN (DDP without SyncBN) and Shuffle-BN for the keys
    group_fields = ("bn_groups", "shuffle_bn_splits")
    recipe = PretrainRecipe(optimizer="sgd", base_lr=0.03, lr_batch=256, batch_size=256, weight_decay=1e-4,
                            momentum=0.9, schedule="multistep", milestones=(120 / 200, 160 / 200),
                            warmup_epochs=0, epochs=200)
    # tiny as MoCo v2's (same framework): ResNet-18, 64-px crops, a 1024-key queue, batch 64;
    # the jigsaw view and patches scaled as the crop (255 and 64 at 224 -> 72 and 18 at 64)
    scales = {"tiny": {"method": {"backbone": "resnet18", "queue_size": 1024, "crop_size": 64,
                                  "jigsaw_size": 72, "jigsaw_patch": 18},
                       "recipe": {"batch_size": 64}},
              "small": {"method": {"backbone": "resnet50", "queue_size": 16384, "crop_size": 160,
                                   "jigsaw_size": 182, "jigsaw_patch": 45},
                        "recipe": {"batch_size": 128}},
              "paper": {"method": {"bn_groups": 8, "shuffle_bn_splits": 8}}}   # 8 GPUs x 32, one node
    loaders = ("cpu", "cpu_draft")   # RandAugment runs on PIL images in the workers

    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"
        dim: int = 128                   # feat_dim
        hidden_dim: int = 0              # 0: the backbone's feature dim (head 'mlp': 2048-2048-128)
        queue_size: int = 65536          # nce_k
        temperature: float = 0.15        # nce_t of InfoMin (override_dict)
        momentum: float = 0.999          # alpha
        crop_size: int = 224
        crop_scale: tuple[float, ...] = (0.2, 1.0)   # build_transforms: 0.2 with the MoCo cache
        # the JigSaw branch (PIRL-style; build_transforms jigsaw_transform, JigsawCrop defaults)
        jigsaw_weight: float = 0.5       # beta: loss = (1 - beta) L_inst + beta L_jig
        jigsaw_size: int = 255           # RandomResizedCrop(255, scale=(0.6, 1)) + flip
        jigsaw_scale: tuple[float, ...] = (0.6, 1.0)
        jigsaw_grid: int = 3             # n_grid: 9 patches
        jigsaw_patch: int = 64           # crop_size
        # BatchNorm groups of the global batch (methods.shuffle_bn), as MoCo v2's
        bn_groups: int = 1
        shuffle_bn_splits: int = 2

        def ranges(self):
            cell = self.jigsaw_size // max(self.jigsaw_grid, 1)
            return MoCoV2.Config.ranges(self) + [
                    ("jigsaw_weight", 0 <= self.jigsaw_weight <= 1, "in [0, 1]"),
                    ("jigsaw_grid", self.jigsaw_grid >= 1, ">= 1"),
                    ("jigsaw_scale", len(self.jigsaw_scale) == 2
                     and 0 < self.jigsaw_scale[0] <= self.jigsaw_scale[1] <= 1, "[lo, hi] in (0, 1]"),
                    ("jigsaw_patch", 0 < self.jigsaw_patch <= cell,
                     f"in [1, jigsaw_size // jigsaw_grid = {cell}] (a patch fits in its cell)"),
                    ("bn_groups", self.bn_groups >= 1, ">= 1"),
                    ("shuffle_bn_splits", self.shuffle_bn_splits >= 1, ">= 1")]

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.encoder_q = build_resnet(cfg.backbone)
        feat = self.encoder_q.feature_dim
        hidden = cfg.hidden_dim or feat
        self.proj_q = moco_v2_projector(feat, hidden, cfg.dim)
        self.jigsaw_q = JigsawHead(feat, hidden, cfg.dim, cfg.jigsaw_grid ** 2)
        # the official momentum encoder also carries a JigSaw head, never used: left out
        self.encoder_k = momentum_copy(self.encoder_q)
        self.proj_k = momentum_copy(self.proj_q)
        self.queue = MemoryQueue(cfg.dim, cfg.queue_size)
        self.aug = InfoMinAug()

    # -- views (DataLoader worker) ------------------------------------------------
    def views(self, record: dict, rng: np.random.Generator, source=None) -> dict:
        img = as_image(record["image"])
        c = self.cfg
        geoms = [random_view(img.width, img.height, c.crop_size, rng, scale=tuple(c.crop_scale)) for _ in range(2)]
        jig = random_view(img.width, img.height, c.jigsaw_size, rng, scale=tuple(c.jigsaw_scale))
        decode_for(img, geoms + [jig])
        out = {name: render_view(img, g, self.aug, rng) for name, g in zip(("im_q", "im_k"), geoms)}
        # the jigsaw view has no photometric augmentation (official jigsaw_transform)
        out["jigsaw"] = jigsaw_patches(render_view(img, jig, NO_PHOTO, rng), c.jigsaw_grid, c.jigsaw_patch, rng)
        return out

    # -- model --------------------------------------------------------------------
    def param_groups(self):
        return [{"params": [p for m in (self.encoder_q, self.proj_q, self.jigsaw_q) for p in m.parameters()]}]

    def momentum_update(self, progress: float) -> None:
        update_momentum(self.encoder_q, self.encoder_k, self.cfg.momentum)   # constant alpha
        update_momentum(self.proj_q, self.proj_k, self.cfg.momentum)

    def forward(self, batch: dict) -> dict:
        c = self.cfg
        q = in_bn_groups(self.encoder_q, lambda x: self.proj_q(self.encoder_q(x)), batch["im_q"], groups=c.bn_groups)
        # the patches through the same encoder in a pass of their own (official RGBMultiHeads)
        # in the images' BatchNorm groups: a group's patches are its images' (9 rows each)
        patches = batch["jigsaw"].flatten(0, 1)                       # (9 B, 3, P, P), image-major
        groups = max(1, min(c.bn_groups, len(q) * rank_and_world()[1] // 2))
        q_jig = self.jigsaw_q(in_bn_groups(self.encoder_q, self.encoder_q, patches, groups=groups,
                                           field="bn_groups"))
        with torch.no_grad():
            k = shuffle_bn(self.encoder_k, lambda x: self.proj_k(self.encoder_k(x)), batch["im_k"],
                           groups=c.shuffle_bn_splits)
        queue = self.queue.keys.clone()
        loss_inst, logits = info_nce(q, k, queue, c.temperature)
        loss_jig, logits_jig = info_nce(q_jig, k, queue, c.temperature)   # the same keys and queue
        self.queue.enqueue(gather(k))
        loss = (1 - c.jigsaw_weight) * loss_inst + c.jigsaw_weight * loss_jig
        return {"loss": loss, "loss_inst": loss_inst.detach(), "loss_jig": loss_jig.detach(),
                "acc1": (logits.argmax(1) == 0).float().mean().detach(),
                "acc_jig": (logits_jig.argmax(1) == 0).float().mean().detach()}

    def export(self) -> dict[str, torch.Tensor]:
        return backbone_state(self.encoder_q)
