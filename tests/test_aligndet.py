"""AlignDet (methods/aligndet.py): the shared contrastive loss against a hand computation,
views whose pseudo boxes follow the pixels, instance ids, the frozen backbone, the EMA target,
and each detector's export (neck and heads in, final classifiers out). Detectors are built
here with torchvision directly at micro size (ResNet-18, tiny images)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from methods import build_method
from methods.augment import IMAGENET_MEAN, IMAGENET_STD
from methods.base import ConfigError
from methods.losses import BACKGROUND, instance_contrastive
from methods.randaug import SOFT_TEACHER_OPS, one_of

FPN = 32


@pytest.fixture(autouse=True)
def _plain_cpu_kernels():
    """Micro models see many conv shapes once: plain kernels, one thread, are faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.backends.mkldnn.flags(enabled=False):
            yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- builders
def rcnn(kind: str = "mask_rcnn"):
    torch.manual_seed(0)
    bb = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    bb.fpn = type(bb.fpn)([64, 128, 256, 512], FPN, extra_blocks=bb.fpn.extra_blocks)
    bb.out_channels = FPN
    kw = dict(num_classes=5, box_head=FastRCNNConvFCHead((FPN, 7, 7), [16] * 4, [32]),
              box_predictor=None, representation_size=32, min_size=64, max_size=96,
              rpn_anchor_generator=AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5))
    if kind == "mask_rcnn":
        return MaskRCNN(bb, **kw)
    return FasterRCNN(bb, **{k: v for k, v in kw.items() if k != "representation_size"})


def fix_predictor(det):
    """torchvision builds FastRCNNPredictor(1024) when box_predictor is None: size it to the head."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    det.roi_heads.box_predictor = FastRCNNPredictor(32, 5)
    return det


def method(detector: str = "mask_rcnn", **kw):
    torch.manual_seed(0)
    cfg = dict(detector=detector, short_sides=[64, 80], max_size=112, max_proposals=4)
    return build_method("aligndet", **{**cfg, **kw})


def attached(detector: str = "mask_rcnn", **kw):
    m = method(detector, **kw)
    m.attach_detector(fix_predictor(rcnn(detector)))
    return m


def scene(seed: int, w: int = 80, h: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def batch(m, n: int = 2):
    boxes = np.array([[4, 4, 40, 36], [30, 10, 76, 60], [10, 20, 50, 62]], dtype=np.float64)
    recs = [{"index": i, "image_id": i, "image": scene(i), "proposals": boxes} for i in range(n)]
    return m.collate([m.views(r, np.random.default_rng([7, i])) for i, r in enumerate(recs)])


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


def test_collate_pads_and_gives_batch_unique_ids_shared_by_both_views():
    m = method()
    b = batch(m, 3)
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
def test_backbone_is_bit_identical_and_target_is_the_ema_of_the_online_heads():
    m = attached()
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
        assert 0.996 < mom < 1
        for n, p in m.online.named_parameters():
            assert torch.allclose(m.target.get_parameter(n), mom * old[n] + (1 - mom) * p.detach(), atol=1e-7), n
    after = m.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)       # BN running stats included
    assert any("running_mean" in k for k in before)
    changed = [n for n, p in m.online.named_parameters() if not torch.equal(p, m.target.get_parameter(n))]
    assert any(n.startswith("fpn.") for n in changed) and any(n.startswith("rpn.") for n in changed)


def test_rcnn_samples_are_rois_matched_to_pseudo_boxes():
    m = attached("faster_rcnn")
    m.train()
    b = batch(m)
    feats = m.backbone(b["v1"])
    from torchvision.models.detection.image_list import ImageList
    images = ImageList(b["v1"], [tuple(s) for s in b["sizes_v1"].tolist()])
    fpn = m.online.fpn(feats)
    props, _ = m.online.rpn(images, fpn, [{"boxes": x} for x in b["boxes_v1"]])
    rois, ids, targets = m.online.sample_rois(props, b["boxes_v1"], b["ids"])
    from torchvision.ops import box_iou
    for r, gt, gid in zip(rois, b["boxes_v1"], b["ids"]):
        iou = box_iou(r, gt)
        assert (iou.max(1).values >= 0.5).all()             # every RoI is a positive of a pseudo box
        assert len(r) >= len(gt)                             # the pseudo boxes themselves are RoIs
    assert set(ids.tolist()) == set(torch.cat(b["ids"]).tolist()) and len(targets) == len(ids)


@pytest.mark.parametrize("kind", ["mask_rcnn", "faster_rcnn"])
def test_rcnn_export_has_neck_rpn_box_head_and_no_classifier(kind):
    m = attached(kind)
    state = m.export()
    det = fix_predictor(rcnn(kind))
    own = det.state_dict()
    assert "conv1.weight" in state and "layer4.1.bn2.running_var" in state
    assert any(k.startswith("fpn.") for k in state) and any(k.startswith("rpn.head.") for k in state)
    assert any(k.startswith("box_head.") for k in state)
    assert not any(("predictor" in k) or k.startswith(("embed", "bbox_pred", "mask")) for k in state)
    # every exported key has its place (and shape) in the fine-tuning detector
    to_det = {("backbone.body." + k if not k.startswith(("fpn.", "rpn.", "box_head.")) else
               "backbone." + k if k.startswith("fpn.") else
               "roi_heads." + k if k.startswith("box_head.") else k): v for k, v in state.items()}
    assert all(k in own and own[k].shape == v.shape for k, v in to_det.items())
    left = {k for k in own if k not in to_det and not k.endswith("num_batches_tracked")}
    assert left and all(k.startswith(("roi_heads.box_predictor.", "roi_heads.mask_")) for k in left), left


def test_attach_is_required_once_and_config_errors_name_the_field():
    m = method()
    assert m.detector_spec() == {"name": "mask_rcnn", "box_head": "4conv1fc"}
    with pytest.raises(RuntimeError, match="attach_detector"):
        m(batch(m))
    m.attach_detector(fix_predictor(rcnn()))
    with pytest.raises(RuntimeError, match="attached already"):
        m.attach_detector(fix_predictor(rcnn()))
    for bad, field in [({"detector": "yolo"}, "method.detector"), ({"rand_ops": ["blur"]}, "method.rand_ops"),
                       ({"short_sides": [640], "max_size": 320}, "method.max_size"),
                       ({"momentum": 1.5}, "method.momentum")]:
        with pytest.raises(ConfigError, match=field):
            build_method("aligndet", **bad)
