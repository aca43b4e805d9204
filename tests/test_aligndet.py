"""AlignDet (methods/aligndet.py): the shared contrastive loss against a hand computation,
views whose pseudo boxes follow the pixels, instance ids, the frozen backbone, the EMA target,
and each detector's export (neck and heads in, final classifiers out). Detectors are built
here with torchvision directly at micro size (ResNet-18, tiny images)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from methods.config import ConfigError
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from methods import build_method
from methods.augment import IMAGENET_MEAN, IMAGENET_STD
from methods.config import ConfigError
from methods.losses import BACKGROUND, instance_contrastive
from methods.randaug import SOFT_TEACHER_OPS, one_of

FPN = 32


pytestmark = pytest.mark.usefixtures("plain_cpu_kernels")   # tests/conftest.py


# --------------------------------------------------------------------------- builders
def _backbone(one_stage: bool):
    """ResNet-18 with trainable BatchNorm (so a moving statistic would show) + a 32-channel FPN:
    P2-P5 + max-pooled P6 (R-CNN), or P3-P5 + P6/P7 convs (RetinaNet, FCOS)."""
    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    if one_stage:
        return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], FPN,
                               extra_blocks=LastLevelP6P7(FPN, FPN))
    return BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, [64, 128, 256, 512], FPN)


def build(kind: str = "mask_rcnn"):
    """The detector as the fine-tuning builder would hand it over, at micro size."""
    torch.manual_seed(0)
    if kind == "retinanet":
        ag = AnchorGenerator(tuple((s, s * 1.26, s * 1.59) for s in (8, 16, 32, 64, 128)), ((0.5, 1.0, 2.0),) * 5)
        return RetinaNet(_backbone(True), 5, anchor_generator=ag, head=RetinaNetHead(FPN, 9, 5))
    if kind == "fcos":
        ag = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
        return FCOS(_backbone(True), 5, anchor_generator=ag, head=FCOSHead(FPN, 1, 5))
    kw = dict(box_head=FastRCNNConvFCHead((FPN, 7, 7), [16] * 4, [32]), box_predictor=FastRCNNPredictor(32, 5),
              rpn_anchor_generator=AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5))
    if kind == "mask_rcnn":
        kw.update(mask_head=MaskRCNNHeads(FPN, [16], 1), mask_predictor=MaskRCNNPredictor(16, 16, 5))
    return (MaskRCNN if kind == "mask_rcnn" else FasterRCNN)(_backbone(False), None, **kw)


def method(detector: str = "mask_rcnn", **kw):
    torch.manual_seed(0)
    cfg = dict(detector=detector, short_sides=[64, 80], max_size=112, max_proposals=4, fcos_points=64)
    return build_method("aligndet", **{**cfg, **kw})


def attached(detector: str = "mask_rcnn", **kw):
    m = method(detector, **kw)
    m.attach_detector(build(detector))
    return m


def scene(seed: int, w: int = 80, h: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def samples(m, n: int = 2):
    boxes = np.array([[4, 4, 40, 36], [30, 10, 76, 60], [10, 20, 50, 62]], dtype=np.float64)
    recs = [{"index": i, "image_id": i, "image": scene(i), "proposals": boxes} for i in range(n)]
    return [m.views(r, np.random.default_rng([7, i])) for i, r in enumerate(recs)]


def batch(m, n: int = 2):
    return m.collate(samples(m, n))


def pool(m, n: int = 2):
    return m.collate_pool(samples(m, n))


# --------------------------------------------------------------------------- the loss
def _hand_loss(online, oids, target, tids, tau):
    """The loss written out one query-key pair at a time, in plain Python."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]
    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))
    on, tg = [unit(v) for v in online], [unit(v) for v in target]
    per_id = []
    for c in sorted({i for i in oids if i >= 0}):
        queries = [q for q, i in zip(on, oids) if i == c]
        keys = [k for k, i in zip(tg, tids) if i == c] or queries
        negs = [v for v, i in zip(on, oids) if i != c] + [v for v, i in zip(tg, tids) if i != c]
        terms = []
        for k in keys:
            for q in queries:
                pos = math.exp(dot(q, k) / tau)
                terms.append(-math.log(pos / (pos + sum(math.exp(dot(q, n) / tau) for n in negs))))
        per_id.append(sum(terms) / len(terms))
    return sum(per_id) / len(per_id)


def test_contrastive_loss_equals_hand_computation():
    # three ids: 0 (two queries, one key), 1 (one query, two keys), 2 (one query, no key:
    # the query is its own key); plus background samples in both views
    online = [[1.0, 0.2, 0.0], [0.8, 0.1, 0.3], [0.0, 1.0, 0.5], [0.3, -0.2, 1.0], [-1.0, 0.4, 0.2]]
    oids = [0, 0, 1, 2, BACKGROUND]
    target = [[0.9, 0.0, 0.1], [0.1, 0.9, 0.4], [-0.2, 1.0, 0.6], [0.5, 0.5, -0.5]]
    tids = [0, 1, 1, BACKGROUND]
    got = instance_contrastive(torch.tensor(online), torch.tensor(oids), torch.tensor(target),
                               torch.tensor(tids), temperature=0.5)
    assert got.item() == pytest.approx(_hand_loss(online, oids, target, tids, 0.5), rel=1e-5)


def _loop_loss(online, oids, target, tids, tau):
    """The official per-id loop (SelfSupConvFCBBoxHead.loss + ContrastiveLoss), in torch."""
    q_all, t_all = torch.nn.functional.normalize(online, dim=1), torch.nn.functional.normalize(target, dim=1)
    out = []
    for c in torch.unique(oids[oids >= 0]):
        q = q_all[oids == c]
        k = t_all[tids == c] if (tids == c).any() else q
        n = torch.cat([q_all[oids != c], t_all[tids != c]]).detach()
        logits = torch.cat([(k @ q.t())[..., None], (q @ n.t())[None].expand(len(k), -1, -1)], -1) / tau
        logits = logits.reshape(-1, logits.shape[-1])
        out.append(torch.nn.functional.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long)))
    return torch.stack(out).mean()


def test_contrastive_loss_gradients_equal_the_official_per_id_loop():
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        M, N, k = 5 + trial % 7, 3 + trial % 5, 1 + trial % 4
        oids = torch.randint(-1, k, (M,), generator=g)
        oids[0] = 0                                     # at least one instance
        tids = torch.randint(-1, k, (N,), generator=g)
        a = torch.randn(M, 6, generator=g, dtype=torch.float64, requires_grad=True)
        b = torch.randn(N, 6, generator=g, dtype=torch.float64)
        ours = instance_contrastive(a, oids, b, tids, 0.5)
        ref = _loop_loss(a, oids, b, tids, 0.5)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
        assert torch.allclose(torch.autograd.grad(ours, a)[0], torch.autograd.grad(ref, a)[0], atol=1e-12)


def test_contrastive_loss_ids_never_collide_with_background():
    """Ids past 256 (the official background label) are instances like any other; only
    negative ids are background, which forms no query."""
    g = torch.Generator().manual_seed(0)
    online, target = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g)
    oids, tids = torch.tensor([0, 0, 1, 2, 3, BACKGROUND]), torch.tensor([0, 1, 2, 3, BACKGROUND])
    base = instance_contrastive(online, oids, target, tids)
    shift = lambda ids: torch.where(ids >= 0, ids + 255, ids)   # ids 255..258: 256 among them
    assert instance_contrastive(online, shift(oids), target, shift(tids)).item() == pytest.approx(base.item(), rel=1e-6)
    # marking id 3 as background changes the loss (so id 258 above did count as an instance)
    bg3 = lambda ids: torch.where(ids == 3, BACKGROUND, ids)
    assert instance_contrastive(online, bg3(oids), target, bg3(tids)).item() != pytest.approx(base.item(), rel=1e-4)
    assert BACKGROUND < 0


def test_contrastive_loss_without_instances_is_zero_with_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    loss = instance_contrastive(x, torch.full((3,), BACKGROUND), torch.randn(2, 4), torch.tensor([BACKGROUND] * 2))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None
    # one instance and nothing else in the batch: no negatives, loss 0, finite gradients
    y = torch.randn(3, 4, requires_grad=True)
    lone = instance_contrastive(y, torch.zeros(3, dtype=torch.long), torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    lone.backward()
    assert lone.item() == 0.0 and torch.isfinite(y.grad).all()


# --------------------------------------------------------------------------- views
def bright_bbox(t: torch.Tensor):
    img = t * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    ys, xs = torch.nonzero(img.mean(0) > 0.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_views_pseudo_boxes_follow_pixels_through_resize_and_flip():
    m = method(short_sides=[64, 96, 128], max_size=240, rand_ops=["identity"], flip_prob=0.5)
    img = np.zeros((60, 100, 3), np.uint8)
    img[12:36, 20:50] = 255
    rec = {"index": 0, "image": img, "proposals": np.array([[20, 12, 50, 36], [0, 0, 100, 60]])}
    seen_flip, sizes = set(), set()
    for seed in range(12):
        s = m.views(rec, np.random.default_rng(seed))
        for v in ("v1", "v2"):
            t, b = s[v], s[f"boxes_{v}"]
            H, W = t.shape[1:]
            sizes.add(H)
            assert H in (64, 96, 128) and W == round(100 * H / 60)            # short side, ratio kept
            assert b[1].tolist() == [0, 0, W, H]                              # whole image stays whole
            assert np.allclose(b[0].tolist(), bright_bbox(t), atol=1.01)      # box on its pixels
            seen_flip.add((b[0, 0] + b[0, 2]).item() / 2 > W / 2)   # the box sits left of centre unflipped
    assert len(sizes) > 1 and len(seen_flip) == 2


def test_views_cap_the_proposals_per_detector_and_max_size_bounds_the_long_side():
    rec = {"index": 0, "image": scene(0, 400, 100), "proposals": np.tile([[0, 0, 50, 50]], (70, 1))}
    assert len(method("retinanet", max_proposals=-1).views(rec, np.random.default_rng(0))["boxes_v1"]) == 50
    assert len(method("mask_rcnn", max_proposals=-1).views(rec, np.random.default_rng(0))["boxes_v1"]) == 70
    s = method(short_sides=[80], max_size=160, max_proposals=3).views(rec, np.random.default_rng(0))
    assert tuple(s["v1"].shape[1:]) == (40, 160) and len(s["boxes_v1"]) == 3
    with pytest.raises(ValueError, match="no 'proposals'"):
        method().views({"index": 3, "image": scene(0)}, np.random.default_rng(0))


def test_collate_makes_pools_of_pool_images_and_refuses_a_batch_that_does_not_divide():
    m = method(pool_images=2)
    b = batch(m, 4)
    assert len(b["pools"]) == 2 and [len(p["boxes_v1"]) for p in b["pools"]] == [2, 2]
    assert torch.cat(b["pools"][1]["ids"]).tolist() == list(range(6))     # ids are the pool's own
    with pytest.raises(ConfigError, match="method.pool_images: 3 images per process do not form pools of 2"):
        batch(m, 3)


def test_pool_losses_are_averaged_and_each_pool_draws_from_its_own_seed():
    m = attached("retinanet")
    m.train()
    b = batch(m, 4)
    torch.manual_seed(0)
    whole = m(b)
    torch.manual_seed(123)                                  # the global RNG does not matter
    again = m(b)
    alone = [m({"pools": [p]}) for p in b["pools"]]
    assert torch.equal(whole["loss"], again["loss"])
    assert torch.allclose(whole["loss"], (alone[0]["loss"] + alone[1]["loss"]) / 2, atol=1e-6)


def test_collate_pads_and_gives_batch_unique_ids_shared_by_both_views():
    m = method()
    b = pool(m, 3)
    assert b["v1"].shape[-1] % 32 == 0 and b["v1"].shape[-2] % 32 == 0
    ids = torch.cat(b["ids"])
    assert ids.tolist() == list(range(9))                       # 3 boxes x 3 images, unique
    assert [len(x) for x in b["boxes_v1"]] == [len(x) for x in b["boxes_v2"]] == [3, 3, 3]
    for i, (h, w) in enumerate(b["sizes_v1"].tolist()):
        assert b["v1"][i, :, h:].abs().sum() == 0 and b["v1"][i, :, :, w:].abs().sum() == 0


def test_soft_teacher_ops_keep_the_size_and_are_reproducible():
    from PIL import Image
    img = Image.fromarray(scene(1))
    for name in SOFT_TEACHER_OPS:
        a, n = one_of(img, np.random.default_rng(3), (name,))
        b, _ = one_of(img, np.random.default_rng(3), (name,))
        assert n == name and a.size == img.size and np.array_equal(np.asarray(a), np.asarray(b))
    picked = {one_of(img, np.random.default_rng(s))[1] for s in range(60)}
    assert picked == set(SOFT_TEACHER_OPS)


# --------------------------------------------------------------------------- model
@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet", "fcos"])
def test_backbone_is_bit_identical_and_target_is_the_ema_of_the_online_heads(kind):
    m = attached(kind)
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.backbone.modules())   # statistics that could move
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    assert not any(p.requires_grad for p in m.backbone.parameters())
    trained = {id(p) for g in m.param_groups() for p in g["params"]}
    assert not trained & {id(p) for p in m.backbone.parameters()}
    assert not trained & {id(p) for p in m.target.parameters()}
    opt = torch.optim.SGD([p for g in m.param_groups() for p in g["params"]], lr=0.05, momentum=0.9,
                          weight_decay=1e-4)
    m.train()
    assert not m.backbone.training and m.online.training
    b = batch(m)
    for step in range(3):
        out = m(b)
        assert torch.isfinite(out["loss"]) and out["loss_contrastive"] > 0
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        old = {n: p.clone() for n, p in m.target.named_parameters()}
        m.momentum_update((step + 1) / 10)
        mom = m.current_momentum
        assert 0.996 <= mom < 1
        for n, p in m.online.named_parameters():
            assert torch.allclose(m.target.get_parameter(n), mom * old[n] + (1 - mom) * p.detach(), atol=1e-7), n
    after = m.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)       # BN running stats included
    assert any("running_mean" in k for k in before)
    changed = [n for n, p in m.online.named_parameters() if not torch.equal(p, m.target.get_parameter(n))]
    assert any(n.startswith("fpn.") for n in changed) and any(n.startswith(("rpn.", "cls_convs.")) for n in changed)


def test_ema_momentum_is_the_official_hooks_one_per_iteration_and_survives_resume():
    """Official MomentumUpdateHook: iteration k of K sets m = 1 - (1 - m0)(cos(pi k / K) + 1)/2
    before its step (runner.iter = k) and updates the target after it. The harness calls
    ``momentum_update((k + 1) / K)`` after step k. K = 3: m = 0.996, 0.997, 0.999 (the step
    before the fix used k + 1: 0.997, 0.999, 1.0, the last update a no-op)."""
    K, m0 = 3, 0.996
    want = [1 - (1 - m0) * (math.cos(math.pi * k / K) + 1) / 2 for k in range(K)]
    assert want == pytest.approx([0.996, 0.997, 0.999])
    m = attached("fcos")
    resumed = None
    t = {n: p.clone() for n, p in m.target.named_parameters()}
    assert all(torch.equal(t[n], p) for n, p in m.online.named_parameters())   # the target starts as a copy
    for k in range(K):
        with torch.no_grad():
            for p in m.online.parameters():      # an optimizer step: online moves by a known amount
                p.add_(1.0 + k)
        if k == 2:                               # resume before the last step from a checkpoint
            resumed = attached("fcos")
            resumed.load_state_dict(m.state_dict())
            m = resumed
        m.momentum_update((k + 1) / K)
        assert m.current_momentum == pytest.approx(want[k], abs=1e-12)
        for n, p in m.online.named_parameters():
            t[n] = want[k] * t[n] + (1 - want[k]) * p.detach()
            assert torch.allclose(m.target.get_parameter(n), t[n], atol=1e-6), (k, n)
    assert resumed is m and float(m.ema_progress) == 1.0


def test_rcnn_samples_are_rois_matched_to_pseudo_boxes():
    m = attached("faster_rcnn")
    m.train()
    b = pool(m)
    feats = m.backbone(b["v1"])
    images = ImageList(b["v1"], [tuple(s) for s in b["sizes_v1"].tolist()])
    fpn = m.online.fpn(feats)
    props, _ = m.online.rpn(images, fpn, [{"boxes": x} for x in b["boxes_v1"]])
    rois, ids, targets = m.online.sample_rois(props, b["boxes_v1"], b["ids"])
    for r, gt, gid in zip(rois, b["boxes_v1"], b["ids"]):
        iou = box_iou(r, gt)
        assert (iou.max(1).values >= 0.5).all()             # every RoI is a positive of a pseudo box
        assert len(r) >= len(gt)                             # the pseudo boxes themselves are RoIs
    assert set(ids.tolist()) == set(torch.cat(b["ids"]).tolist()) and len(targets) == len(ids)


DROPPED = {"mask_rcnn": ("roi_heads.box_predictor.", "roi_heads.mask_"), "faster_rcnn": ("roi_heads.box_predictor.",),
           "retinanet": ("head.classification_head.cls_logits.", "head.regression_head.bbox_reg."),
           "fcos": ("head.classification_head.cls_logits.", "head.regression_head.bbox_reg.",
                    "head.regression_head.bbox_ctrness.")}


@pytest.mark.parametrize("kind", sorted(DROPPED))
def test_export_has_neck_and_heads_and_no_final_layers(kind):
    m = attached(kind)
    state = m.export()
    own = build(kind).state_dict()
    assert "conv1.weight" in state and "layer4.1.bn2.running_var" in state
    heads = ("rpn.head.", "box_head.") if "rcnn" in kind else ("head.classification_head.conv.", "head.regression_head.conv.")
    fpn = "fpn." if "rcnn" in kind else "backbone.fpn."     # one-stage: the C3-C5 FPN in its own keys
    assert any(k.startswith(fpn) for k in state) and all(any(k.startswith(h) for k in state) for h in heads)
    assert not any(k.startswith(("embed", "bbox_pred", "bbox_reg", "bbox_ctrness")) for k in state)
    # every exported key has its place (and shape) in the fine-tuning detector; what is left
    # there is exactly the final layers (and Mask R-CNN's mask head): re-initialised
    def to_det(k):
        if k.startswith("fpn."):
            return "backbone." + k
        if k.startswith("box_head."):
            return "roi_heads." + k
        return k if k.startswith(("rpn.", "head.", "backbone.fpn.")) else "backbone.body." + k
    mapped = {to_det(k): v for k, v in state.items()}
    assert all(k in own and own[k].shape == v.shape for k, v in mapped.items())
    left = {k for k in own if k not in mapped and not k.endswith("num_batches_tracked")}
    assert left and all(k.startswith(DROPPED[kind]) for k in left), left


def _retina_labels(anchors, boxes, ids):
    """Per image, each anchor's label by hand: its box's id (IoU >= 0.5, or a box's best
    anchors), -1 background (< 0.4), -2 ignored."""
    labels = []
    for a, gt, gid in zip(anchors, boxes, ids):
        iou = box_iou(a, gt)
        best, j = iou.max(1)
        lab = torch.where(best >= 0.5, gid[j], torch.where(best < 0.4, -1, -2))
        # low-quality matches: each box's best anchors are samples (of their best box) even below 0.5
        for k in range(len(gt)):
            top = iou[:, k] == iou[:, k].max()
            lab[top] = gid[j[top]]
        labels.append(lab)
    return labels


def _retina_samples(m, b):
    images = ImageList(b["v1"], [tuple(s) for s in b["sizes_v1"].tolist()])
    z, y, losses = m.online(images, m.backbone(b["v1"]), b["boxes_v1"], b["ids"])
    anchors = m.online.dense(images, m.backbone(b["v1"]))[0]
    return z, y, losses, _retina_labels(anchors, b["boxes_v1"], b["ids"])


def test_retinanet_without_sampling_takes_every_anchor_but_the_ignored_band():
    m = attached("retinanet", retina_samples=0)
    m.train()
    z, y, _, labels = _retina_samples(m, pool(m))
    labels = torch.cat(labels)
    assert torch.equal(y, labels[labels != -2]) and len(z) == len(y)
    assert (y == BACKGROUND).any() and (y >= 0).any()


def test_random_sample_is_mmdets_random_sampler():
    from methods.aligndet import random_sample
    torch.manual_seed(0)
    many, few, bg = torch.arange(3000), torch.arange(100), torch.arange(3000, 180_000)
    p, n = random_sample(many, bg, 2048)                  # more positives than the budget: positives only
    assert len(p) == 2048 and len(set(p.tolist())) == 2048 and set(p.tolist()) <= set(many.tolist()) and len(n) == 0
    p, n = random_sample(few, bg, 2048)                   # every positive, background fills the rest
    assert torch.equal(p, few) and len(n) == 1948 and len(set(n.tolist())) == 1948
    assert set(n.tolist()) <= set(bg.tolist())
    p, n = random_sample(many, bg, 2048, pos_fraction=0.25)
    assert (len(p), len(n)) == (512, 1536)
    p, n = random_sample(few, torch.arange(100, 105), 2048)   # fewer than the budget: all of them
    assert torch.equal(p, few) and torch.equal(n, torch.arange(100, 105))
    torch.manual_seed(1)
    a = random_sample(few, bg, 2048)[1]
    torch.manual_seed(1)
    assert torch.equal(a, random_sample(few, bg, 2048)[1])     # the pool's seed fixes the draws


@pytest.mark.parametrize("budget", [64, 8])
def test_retinanet_samples_at_most_retina_samples_anchors_per_image(budget):
    """Official RandomSampler(num=2048, pos_fraction=1.0) per image, here at ``budget``: every
    positive up to the budget, background to fill it, the ignored band never."""
    m = attached("retinanet", retina_samples=budget)
    m.train()
    b = pool(m)
    z, y, _, labels = _retina_samples(m, b)
    every = sum(int((lab != -2).sum()) for lab in labels)
    pos = [int((lab >= 0).sum()) for lab in labels]
    neg = [int((lab == -1).sum()) for lab in labels]
    want_pos = [min(p, budget) for p in pos]
    want = sum(p + min(n, budget - p) for p, n in zip(want_pos, neg))
    assert every > len(b["ids"]) * budget                   # the budget binds: fewer samples than anchors
    assert len(z) == len(y) == want <= len(b["ids"]) * budget
    assert int((y >= 0).sum()) == sum(want_pos) and not (y == -2).any()
    hand = torch.cat(labels)
    for i in set(y[y >= 0].tolist()):                       # each sampled id is an anchor's of that id
        assert (y == i).sum() <= (hand == i).sum()
    torch.manual_seed(3)
    again = m.online(ImageList(b["v1"], [tuple(s) for s in b["sizes_v1"].tolist()]), m.backbone(b["v1"]),
                     b["boxes_v1"], b["ids"])[1]
    torch.manual_seed(3)
    assert torch.equal(again, m.online(ImageList(b["v1"], [tuple(s) for s in b["sizes_v1"].tolist()]),
                                       m.backbone(b["v1"]), b["boxes_v1"], b["ids"])[1])


def test_fcos_assignment():
    m = attached("fcos")
    # points of stride 8 (size-8 anchors) on one level: a box holds the points near its centre
    pts = torch.tensor([[0, 0, 8, 8], [8, 8, 16, 16], [16, 16, 24, 24], [40, 40, 48, 48]], dtype=torch.float)
    gt = torch.tensor([[0, 0, 30, 30], [6, 6, 22, 22]], dtype=torch.float)
    idx = m.online.assign(pts, gt, [4])
    # (4,4) lies in box 0 only; (12,12) and (20,20) in both: the smaller box 1 wins; (44,44) in none
    assert idx.tolist() == [0, 1, 1, -1]


@pytest.mark.parametrize("per", ["pool", "image"])
@pytest.mark.parametrize("budget", [10, 100, 100_000])
def test_fcos_point_budget_over_the_pool_or_per_image(per, budget):
    """Official SelfSupFCOSHead.loss: sampler.num points over the GPU's images (our pool),
    positives first (pos_fraction 1.0), background filling the rest; or per image."""
    m = attached("fcos", fcos_points=budget, fcos_points_per=per)
    heads = m.online
    b = pool(m)
    images = ImageList(b["v1"], [tuple(s) for s in b["sizes_v1"].tolist()])
    feats = m.backbone(b["v1"])
    anchors, _, _, per_level = heads.dense(images, feats)
    fg = [int((heads.assign(a, gt, per_level) >= 0).sum()) for a, gt in zip(anchors, b["boxes_v1"])]
    R = len(anchors[0])
    z, y, losses = heads(images, feats, b["boxes_v1"], b["ids"])
    units = [(sum(fg), len(fg) * R)] if per == "pool" else [(f, R) for f in fg]
    sizes = [min(budget, points) for _, points in units]
    assert len(z) == len(y) == sum(sizes)
    start = 0
    for (f, _), size in zip(units, sizes):
        part = y[start:start + size]
        start += size
        assert int((part >= 0).sum()) == min(f, size)            # every positive up to the budget
        assert torch.equal(part >= 0, (part >= 0).sort(descending=True).values)   # positives first
    assert set(losses) == {"loss_box_iou", "loss_centerness"}
    if budget == 10:
        assert min(fg) > 10                                   # the budget binds on each image here


def test_fcos_box_losses_by_hand():
    from methods.aligndet import fcos_box_losses
    target = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    centre = torch.tensor([[5.0, 5.0]])                 # l=5, r=5, t=5, b=15: centerness sqrt(1 * 1/3)
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0]])       # IoU 0.5
    out = fcos_box_losses(pred, target, centre, torch.tensor([0.0]))
    c = math.sqrt(1 / 3)
    assert out["loss_box_iou"].item() == pytest.approx(-math.log(0.5))       # weight c / sum c = 1
    assert out["loss_centerness"].item() == pytest.approx(-(c * math.log(0.5) + (1 - c) * math.log(0.5)))
    empty = fcos_box_losses(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 2), torch.zeros(0))
    assert empty["loss_box_iou"].item() == 0 and empty["loss_centerness"].item() == 0


def test_attach_is_required_once_and_config_errors_name_the_field():
    m = method()
    assert m.detector_spec() == {"name": "mask_rcnn", "box_head": "4conv1fc"}
    with pytest.raises(RuntimeError, match="attach_detector"):
        m(batch(m))
    m.attach_detector(build())
    with pytest.raises(RuntimeError, match="attached already"):
        m.attach_detector(build())
    for bad, field in [({"detector": "yolo"}, "method.detector"), ({"rand_ops": ["blur"]}, "method.rand_ops"),
                       ({"short_sides": [640], "max_size": 320}, "method.max_size"),
                       ({"momentum": 1.5}, "method.momentum"), ({"detr_cost": [1, 5]}, "method.detr_cost"),
                       ({"fcos_points": 0}, "method.fcos_points"), ({"temperature": 0}, "method.temperature"),
                       ({"nope": 1}, "method.nope")]:
        with pytest.raises(ConfigError, match=field):
            build_method("aligndet", **bad)


# --------------------------------------------------------------------------- DETR
def detr():
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    torch.manual_seed(0)
    cfg = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, num_labels=5, num_queries=10,
                     backbone_config=ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                                                  embedding_size=16, layer_type="basic", out_features=["stage4"]),
                     d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
    return DetrForObjectDetection(cfg)


def detr_batch(m, n: int = 2):
    boxes = np.array([[4, 4, 40, 36], [30, 10, 76, 60], [10, 20, 50, 62]], dtype=np.float64)
    recs = [{"index": i, "image": scene(i), "proposals": boxes, "pseudo_classes": np.array([1, 3, 1])}
            for i in range(n)]
    return m.collate([m.views(r, np.random.default_rng([7, i])) for i, r in enumerate(recs)])


def test_detr_trains_heads_copies_queries_and_keeps_the_backbone():
    m = method("detr", detr_classes=4)
    m.attach_detector(detr())
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    params = [p for g in m.param_groups() for p in g["params"]]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    m.train()
    b = detr_batch(m)
    assert [c.tolist() for c in b["pools"][0]["classes"]] == [[1, 3, 1], [1, 3, 1]]
    for step in range(2):
        out = m(b)
        assert set(out) >= {"loss_contrastive", "loss_detr_cls", "loss_detr_l1", "loss_detr_giou"}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        old = {n: p.clone() for n, p in m.target.named_parameters()}
        m.momentum_update(0.3)
        mom = m.current_momentum
        for n, p in m.online.named_parameters():
            want = p.detach() if n.startswith("query_position_embeddings.") else mom * old[n] + (1 - mom) * p.detach()
            assert torch.allclose(m.target.get_parameter(n), want, atol=1e-7), n
    assert all(torch.equal(before[k], v) for k, v in m.backbone.state_dict().items())
    assert not torch.equal(old["query_position_embeddings.weight"], m.target.query_position_embeddings.weight)


def test_detr_export_has_transformer_and_queries_and_no_heads():
    m = method("detr", detr_classes=4)
    m.attach_detector(detr())
    state = m.export()
    own = detr().state_dict()
    for part in ("model.backbone.", "model.input_projection.", "model.encoder.", "model.decoder.",
                 "model.query_position_embeddings."):
        assert any(k.startswith(part) for k in state), part
    assert all(k in own and own[k].shape == v.shape for k, v in state.items())
    left = {k for k in own if k not in state}
    assert left and all(k.startswith(("class_labels_classifier.", "bbox_predictor.")) for k in left), left


def test_detr_views_need_one_pseudo_class_per_proposal():
    m = method("detr", detr_classes=4)
    rec = {"index": 5, "image": scene(0), "proposals": np.array([[0, 0, 20, 20], [5, 5, 30, 30]])}
    with pytest.raises(ValueError, match="pseudo_classes"):
        m.views(rec, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1 entries for 2 proposals"):
        m.views({**rec, "pseudo_classes": [0]}, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        m.views({**rec, "pseudo_classes": [0, 4]}, np.random.default_rng(0))


def test_hungarian_match_and_set_loss_by_hand():
    from methods.aligndet import detr_set_loss, hungarian_match
    # query 0 sits on box 1, query 2 on box 0, query 1 nowhere: the matching pairs them so
    gt = torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]])
    pred = torch.tensor([[0.74, 0.75, 0.2, 0.2], [0.5, 0.1, 0.05, 0.05], [0.25, 0.26, 0.2, 0.2]])
    logits = torch.zeros(3, 4)
    q, g = hungarian_match(logits, pred, torch.tensor([0, 1]), gt)
    assert sorted(zip(q.tolist(), g.tolist())) == [(0, 1), (2, 0)]
    # set loss: uniform logits over K+1 = 4 classes; CE = log 4 for every row (weighted mean)
    out = detr_set_loss(logits, pred, q, torch.tensor([1, 0]), gt[g], num_boxes=2.0, no_object_weight=0.1)
    assert out["cls"].item() == pytest.approx(math.log(4))
    assert out["l1"].item() == pytest.approx(5 * (0.01 + 0.01) / 2)
    assert 0 < out["giou"].item() < 2 * 0.2


def test_pseudo_classes_are_deterministic_and_one_per_proposal():
    from methods.pseudo_classes import kmeans, pca, pseudo_classes, roi_features
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 40, generator=g) * 10
    truth = torch.arange(60) % 4
    feats = centres[truth] + torch.randn(60, 40, generator=g) * 0.1
    a = pseudo_classes(feats, k=4, pca_dim=8, seed=1)
    assert a.shape == (60,) and a.dtype == torch.long and ((0 <= a) & (a < 4)).all()
    assert torch.equal(a, pseudo_classes(feats, k=4, pca_dim=8, seed=1))
    # well-separated blobs: the clusters are the blobs (up to naming)
    assert len({(int(t), int(c)) for t, c in zip(truth, a)}) == 4
    # the seed matters where the data leave a choice: uniform noise, many clusters
    noise = torch.rand(200, 5, generator=g)
    runs = [kmeans(noise, 12, seed=s)[0] for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert pca(feats, 8).shape == (60, 8)
    with pytest.raises(ValueError, match="3 points for 4 clusters"):
        kmeans(feats[:3], 4)
    # RoI features: the mean of the map under each box (a map that is its x coordinate)
    fmap = torch.arange(16.0).repeat(16, 1)[None, None]     # value = x on a 16x16 map, stride 4
    # (pixel j has value j at its centre j + 0.5: the mean over map columns [a, b] is (a + b) / 2 - 0.5)
    f = roi_features(fmap, [torch.tensor([[8.0, 0.0, 40.0, 32.0], [32.0, 8.0, 56.0, 64.0]])], stride=4)
    assert f.squeeze(1).tolist() == pytest.approx([5.5, 10.5], abs=1e-4)


def test_recipes_are_the_papers():
    from methods.aligndet import AlignDet
    r = AlignDet.recipe_for("mask_rcnn")
    assert (r.recipe.optimizer, r.recipe.base_lr, r.recipe.lr_batch, r.recipe.weight_decay) == ("sgd", 0.02, 16, 1e-4)
    assert r.recipe.epochs == 12 and r.milestones == (8 / 12, 11 / 12) and r.clip_grad is None
    assert round(r.recipe.warmup_epochs * 7393) == 500                    # 500 iterations at batch 16 on COCO
    assert AlignDet.recipe_for("retinanet").recipe.base_lr == AlignDet.recipe_for("fcos").recipe.base_lr == 0.01
    d = AlignDet.recipe_for("detr")
    assert (d.recipe.optimizer, d.recipe.base_lr, d.recipe.epochs, d.milestones, d.clip_grad) == ("adamw", 2e-4, 50, (0.8,), 0.1)
    # official detr.py: lr 2e-4 with auto_scale_lr(base_batch_size=64) on 8 GPUs x 2 images; mmdet
    # 2.25 trains at 2e-4 * 16 / 64 = 5e-5. Ours: base_lr per lr_batch images (the linear rule the
    # pretraining stage applies), at the recipe's batch of 16
    dr = d.recipe
    assert (dr.lr_batch, dr.batch_size) == (64, 16)
    assert dr.base_lr * dr.batch_size / dr.lr_batch == pytest.approx(5e-5)
    for det in ("mask_rcnn", "retinanet", "fcos"):     # the SGD recipes: their lr at batch 16 as given
        sr = AlignDet.recipe_for(det).recipe
        assert sr.base_lr * sr.batch_size / sr.lr_batch == sr.base_lr
    assert AlignDet.recipe is r.recipe
    assert AlignDet.finetune_factors == {"lr": 1.5, "weight_decay": 0.5} and not AlignDet.finetune_overrides
    with pytest.raises(ConfigError, match="method.detector"):
        AlignDet.recipe_for("yolo")


@pytest.mark.parametrize("kind", ["detr", "mask_rcnn"])
def test_proposal_features_pool_the_last_backbone_map(kind):
    from methods.pseudo_classes import roi_features
    m = method(kind, detr_classes=4)
    m.attach_detector(detr() if kind == "detr" else build(kind))
    img = torch.randn(3, 64, 96)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 8.0, 96.0, 64.0], [40.0, 20.0, 72.0, 52.0]])
    f = m.proposal_features(img, boxes)
    c5 = m.backbone(img[None], torch.ones(1, 64, 96, dtype=torch.long))[-1][0] if kind == "detr" else m.backbone(img[None])["3"]
    assert c5.shape[-1] == 3 and f.shape == (3, c5.shape[1])          # stride 32
    assert torch.allclose(f, roi_features(c5, [boxes], stride=32))
    assert not torch.allclose(f[0], f[1])
