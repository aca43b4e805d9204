"""DenseCL (Wang, Zhang, Shen, Kong, Li; CVPR 2021, "Dense Contrastive Learning for
Self-Supervised Visual Pre-Training", arXiv:2011.09157; official code WXinlong/DenseCL).

MoCo v2 plus a dense head. Pseudo-code (paper Sec. 3; official ``openselfsup/models/densecl.py``),
recognisable in ``forward``:
    f_q, f_k = C5 maps of x_q (query encoder) and x_k (momentum encoder, Shuffle-BN)
    q, q_grid = g(pool f_q), h(f_q)             global MLP 2048-2048-128; dense 1x1 convs 2048-2048-128
    k, k_grid = g'(pool f_k), h'(f_k)           momentum copies of backbone and both heads
    j*(i) = argmax_j cos(f_q[i], f_k[j])        one-way match on the BACKBONE maps
    L_g = InfoNCE(q, k, queue_g, tau)
    L_d = mean_i InfoNCE(q_grid[i], k_grid[j*(i)], queue_d, tau)     queue_d: pooled dense keys
    L = (1 - lambda) L_g + lambda L_d           lambda 0.5, tau 0.2
    enqueue(k -> queue_g, mean_j k_grid[j] -> queue_d); f' = m f' + (1 - m) f, m 0.999

The match is computed on the device (argmax + gather): no host sync, no data-dependent shape.

Choices and official-vs-paper decisions: docs/methods/densecl.md
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.backbones import backbone_state, build_resnet, resnet_stages
from methods.base import MethodConfig, PretrainMethod, PretrainRecipe
from methods.dist import gather
from methods.ema import momentum_copy, update_momentum
from methods.heads import ConvMLPHead, moco_v2_projector
from methods.losses import dense_correspondence, dense_info_nce, info_nce
from methods.moco import MoCoV2
from methods.queues import MemoryQueue
from methods.registry import register_method
from methods.shuffle_bn import in_bn_groups, shuffle_bn

INITS = ("official", "torchvision")


# -- networks -------------------------------------------------------------------------------
def openselfsup_backbone_init(m: nn.Module) -> None:
    """OpenSelfSup ``ResNet.init_weights`` from scratch (resnet.py:386-394): every Conv2d
    kaiming-normal, mode fan_in, ReLU gain (torchvision: fan_out); BN weight 1, bias 0."""
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


class DenseCLNeck(nn.Module):
    """The official ``DenseCLNeck`` (necks.py:358-397): from the C5 map, (global vector
    MLP(avgpool C5), dense grid 1x1-conv MLP(C5) flattened to (N, D, L), the grid's mean over
    its positions, taken before any normalisation). ``num_grid`` S > 0 adaptive-avg-pools C5
    to S x S first (0: the raw C5 grid, the 200-ep config's ``num_grid=None``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_grid: int = 0, init: str = "official"):
        super().__init__()
        self.global_head = moco_v2_projector(in_dim, hidden_dim, out_dim)     # fc-relu-fc
        self.dense_head = ConvMLPHead(in_dim, hidden_dim, out_dim, batch_norm=False)   # conv-relu-conv
        self.pool = nn.AdaptiveAvgPool2d(num_grid) if num_grid else nn.Identity()
        if init == "official":   # init_linear='kaiming' touches the Linears only (necks.py:10-24)
            for layer in self.global_head:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
                    nn.init.zeros_(layer.bias)

    def forward(self, c5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.global_head(c5.mean((2, 3)))
        grid = self.dense_head(self.pool(c5)).flatten(2)                      # (N, D, L)
        return g, grid, grid.mean(2)


class DenseCLEncoder(nn.Module):
    """Backbone + neck, the part with a momentum twin (official: both are copied, 56-58).
    ``forward`` packs (global (N, D), pooled dense (N, D), dense grid (N, D, L), C5 (N, C, L),
    pooled to the grid's S x S when ``num_grid`` is set)
    into one (N, 2D + L(D + C)) tensor, so Shuffle-BN and BN groups, which concatenate one
    output per group, carry them all; ``unpack`` splits it again."""

    def __init__(self, cfg: "DenseCL.Config"):
        super().__init__()
        self.backbone = build_resnet(cfg.backbone)
        if cfg.init == "official":
            openselfsup_backbone_init(self.backbone)
        feat = self.backbone.feature_dim
        self.neck = DenseCLNeck(feat, cfg.hidden_dim or feat, cfg.dim, cfg.num_grid, cfg.init)
        self.dim, self.feat = cfg.dim, feat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5 = resnet_stages(self.backbone, x)[-1]
        g, grid, pooled = self.neck(c5)
        # the maps the match compares, on the grid's positions (num_grid S: C5 pooled as well;
        # the official code compares the raw C5 and so works only with S = the C5 size)
        return torch.cat([g, pooled, grid.flatten(1), self.neck.pool(c5).flatten(1)], 1)

    def unpack(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        D, C, n = self.dim, self.feat, out.shape[0]
        L = (out.shape[1] - 2 * D) // (D + C)
        g, pooled, grid, c5 = out.split([D, D, D * L, C * L], 1)
        return g, pooled, grid.reshape(n, D, L), c5.reshape(n, C, L)


@register_method("densecl")
class DenseCL(PretrainMethod):
    # cfg densecl_imagenet_200ep.py:60-75: SGD lr 0.03 at batch 256 (8 GPUs x 32; fixed, no
    # scaling rule in the code: base_lr/lr_batch extrapolates linearly), momentum 0.9, wd 1e-4
    # on all parameters, cosine to 0 set once per epoch (mmcv by_epoch=True), no warm-up, 200 ep
    recipe = PretrainRecipe(optimizer="sgd", base_lr=0.03, lr_batch=256, batch_size=256,
                            weight_decay=1e-4, momentum=0.9, schedule="cosine", cosine_per_epoch=True,
                            warmup_epochs=0, epochs=200)
    sync_bn = False   # per-process BN + Shuffle-BN (cfg: plain BN; densecl.py:103-147), as MoCo v2
    group_fields = ("bn_groups", "shuffle_bn_splits")
    # tiny: MoCo v2's tiny (ResNet-18, 512-512-128 heads, 1024-key queues that fill in 16 steps
    # of 64) with 96-px crops: a 3x3 C5 grid, so the argmax chooses among 9 key positions (64 px
    # would leave 2x2), as PixPro's tiny
    scales = {**MoCoV2.scales, "tiny": {"method": {**MoCoV2.scales["tiny"]["method"], "crop_size": 96},
                                        "recipe": MoCoV2.scales["tiny"]["recipe"]}}

    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"
        dim: int = 128                   # both heads' output (cfg:16-21)
        hidden_dim: int = 0              # 0: the backbone's feature dim (2048-2048-128 at R50)
        num_grid: int = 0                # 0: the raw C5 grid (cfg num_grid=None); S > 0: pool to S x S
        queue_size: int = 65536          # K, each of the two queues (densecl.py:22-23)
        temperature: float = 0.2         # tau (cfg:22, ContrastiveHead)
        momentum: float = 0.999          # m (densecl.py:24; cfg:8)
        loss_lambda: float = 0.5         # lambda: (1 - lambda) global + lambda dense (cfg:9)
        init: str = "official"           # official: OpenSelfSup's fan_in convs, kaiming Linears | torchvision
        crop_size: int = 224
        crop_scale: tuple[float, ...] = (0.2, 1.0)   # MoCo v2 aug+ (cfg:31-58)
        # BatchNorm groups of the global batch (methods.shuffle_bn), as MoCo v2
        bn_groups: int = 1               # query encoder (per-process BN)
        shuffle_bn_splits: int = 2       # key encoder (Shuffle-BN)

        def ranges(self):
            return [("momentum", self.momentum < 1, "in [0, 1) (m = 1: the key encoder never moves)"),
                    ("loss_lambda", 0 <= self.loss_lambda <= 1, "in [0, 1]"),
                    ("num_grid", self.num_grid >= 0, ">= 0 (0: the raw C5 grid)"),
                    ("init", self.init in INITS, " | ".join(INITS))]

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.encoder_q = DenseCLEncoder(cfg)
        self.encoder_k = momentum_copy(self.encoder_q)
        self.queue = MemoryQueue(cfg.dim, cfg.queue_size, seed=0)         # global keys
        self.dense_queue = MemoryQueue(cfg.dim, cfg.queue_size, seed=1)   # pooled dense keys

    # -- views (DataLoader worker): MoCo v2's two independent aug+ draws (contrastive.py:22-24)
    loaders = MoCoV2.loaders
    views = MoCoV2.views

    # -- model --------------------------------------------------------------------------
    def param_groups(self):
        return [{"params": list(self.encoder_q.parameters())}]

    def momentum_update(self, progress: float) -> None:
        # constant m over backbone and neck (densecl.py:65-68); the official update at the
        # start of step t+1 is this one after step t
        update_momentum(self.encoder_q, self.encoder_k, self.cfg.momentum)

    def forward(self, batch: dict) -> dict:
        c = self.cfg
        q, _, q_grid, f_q = self.encoder_q.unpack(
            in_bn_groups(self.encoder_q, self.encoder_q, batch["im_q"], groups=c.bn_groups))
        with torch.no_grad():
            k, k_pooled, k_grid, f_k = self.encoder_k.unpack(
                shuffle_bn(self.encoder_k, self.encoder_k, batch["im_k"], groups=c.shuffle_bn_splits))
        loss_global, logits = info_nce(q, k, self.queue.keys.clone(), c.temperature)
        match = dense_correspondence(f_q.detach(), f_k)
        loss_dense, logits_dense = dense_info_nce(q_grid, k_grid, match, self.dense_queue.keys.clone(),
                                                  c.temperature)
        loss = (1 - c.loss_lambda) * loss_global + c.loss_lambda * loss_dense
        self.queue.enqueue(gather(k))
        self.dense_queue.enqueue(gather(k_pooled))
        return {"loss": loss, "loss_global": loss_global.detach(), "loss_dense": loss_dense.detach(),
                "acc1": (logits.argmax(1) == 0).float().mean().detach(),
                "acc1_dense": (logits_dense.argmax(1) == 0).float().mean().detach()}

    def export(self) -> dict[str, torch.Tensor]:
        """The query backbone in bare torchvision names; both heads dropped
        (tools/extract_backbone_weights.py keeps ``backbone.*`` only)."""
        return backbone_state(self.encoder_q.backbone)
