"""InsLoc: composites whose box is the pasted pixels, anchor box augmentation, one box per
pyramid level, four queues on one pointer, the per-level loss, and the export."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

import methods
from tests.inputs import ListSource
from methods.config import ConfigError
from methods.geometry import whole_view
from methods.insloc import anchor_augment, anchor_grid, rescaled_size
from methods.losses import level_info_nce
from methods.queues import LevelQueues

FG, BG = (220, 30, 40), (10, 60, 200)
SMALL = dict(backbone="resnet18", fpn_channels=16, head_conv_dim=16, head_fc_dim=32, background_size=64,
             fg_size=(32, 64), anchor_stride=4, queue_size=16)


@pytest.fixture(scope="module")
def insloc():
    torch.manual_seed(0)
    return methods.build_method("insloc", **SMALL)


def _flat(colour, w, h):
    return Image.new("RGB", (w, h), colour)


def _check_box_is_the_pasted_pixels(img: Image.Image, box: np.ndarray):
    a = np.asarray(img)
    H, W = a.shape[:2]
    assert np.allclose(box, np.round(box), atol=1e-9), box       # pasted at integer offsets and sizes
    x0, y0, x1, y1 = (int(v) for v in np.round(box))
    assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
    assert (a[y0:y1, x0:x1] == FG).all()                           # every pixel of the box is foreground
    ring = np.zeros((H, W), bool)
    ring[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
    ring[y0:y1, x0:x1] = False
    assert ring.any() and (a[ring] == BG).all()                    # and the ring around it is not


def test_composite_box_is_the_pasted_pixels_before_and_after_flip(insloc):
    fg, bg = _flat(FG, 90, 50), _flat(BG, 40, 70)
    S = insloc.cfg.background_size
    for seed in range(20):
        rng = np.random.default_rng(seed)
        img, box = insloc.composite(fg, bg, rng)
        assert img.size == (S, S)
        _check_box_is_the_pasted_pixels(img, box)
        w, h = box[2] - box[0], box[3] - box[1]
        lo, hi = insloc.cfg.fg_size
        assert lo - 1 <= max(w, h) < hi                             # long side within the sampled bound
        flipped = whole_view(S, S, S, flip=True)
        _check_box_is_the_pasted_pixels(flipped.apply_image(img), flipped.map_boxes(box)[0])


def test_rescaled_size_keeps_the_aspect_within_the_bound():
    assert rescaled_size(100, 50, (200, 150)) == (200, 100)      # long side bound 200
    assert rescaled_size(100, 50, (130, 200)) == (200, 100)      # order of the bound does not matter
    assert rescaled_size(100, 100, (160, 130)) == (130, 130)     # short side bound 130


def test_views_draw_backgrounds_from_the_source_and_are_a_function_of_rng(insloc):
    rng = np.random.default_rng(0)
    recs = [{"image": rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)} for _ in range(3)]
    src = ListSource(recs)
    a = insloc.views(recs[0], np.random.default_rng(5), src)
    b = insloc.views(recs[0], np.random.default_rng(5), src)
    assert a.keys() == {"im_q", "im_k", "box_q", "box_k", "box_q_aug"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    S = insloc.cfg.background_size
    assert a["im_q"].shape == (3, S, S) and a["box_q"].shape == (4,)
    with pytest.raises(ValueError, match="insloc: views need `source`"):
        insloc.views(recs[0], np.random.default_rng(0), None)


def test_anchor_grid_is_mmdets():
    a = anchor_grid(32, 32, stride=16, scales=(2,), ratios=(1.0, 2.0))
    assert a.shape == (2 * 2 * 2, 4)
    assert torch.allclose(a[0], torch.tensor([-16.0, -16.0, 16.0, 16.0]))     # 32 px, centre (0, 0)
    w, h = a[1, 2] - a[1, 0], a[1, 3] - a[1, 1]
    assert torch.isclose(h / w, torch.tensor(2.0)) and torch.isclose(w * h, torch.tensor(32.0 * 32))
    assert torch.allclose(a[-1, :2] + a[-1, 2:], torch.tensor([32.0, 32.0]))  # last centre (16, 16)


def test_every_augmented_box_overlaps_the_true_box_by_more_than_half(insloc):
    fg, bg = _flat(FG, 90, 50), _flat(BG, 40, 70)
    moved = 0
    for seed in range(50):
        rng = np.random.default_rng(seed)
        _, box = insloc.composite(fg, bg, rng)
        aug = anchor_augment(box, insloc.anchors, rng)
        iou = box_iou(torch.tensor(np.stack([box]), dtype=torch.float32), torch.tensor(np.stack([aug])))[0, 0]
        assert iou > 0.5, (box, aug)
        moved += not np.allclose(aug, box)
    assert moved > 40            # an anchor, not the fallback, nearly always


def test_augmented_box_falls_back_to_the_true_box_when_no_anchor_fits():
    box = np.array([10.0, 10.0, 12.0, 60.0])            # 2 x 50: no 0.5-2 anchor overlaps it by 0.5
    out = anchor_augment(box, anchor_grid(64, 64, 4), np.random.default_rng(0))
    assert np.array_equal(out, box.astype(np.float32))


def test_p2_to_p4_pool_the_true_box_and_only_p5_the_augmented_one(insloc):
    true = torch.tensor([[8.0, 8.0, 40.0, 48.0], [4.0, 10.0, 50.0, 40.0]])
    aug = true + 4
    boxes = insloc.level_boxes(true, aug)
    assert boxes.shape == (2, 4, 4)
    assert torch.equal(boxes[:, :3], true[:, None].expand(2, 3, 4)) and torch.equal(boxes[:, 3], aug)
    assert torch.equal(insloc.level_boxes(true), true[:, None].expand(2, 4, 4))     # the key side
    # through the encoder (eval BN: rows independent): moving the augmented box moves P5 only
    enc = insloc.encoder_q.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = enc(x, insloc.level_boxes(true, aug)), enc(x, insloc.level_boxes(true, aug + 6))
    enc.train()
    assert torch.allclose(a[:, :3], b[:, :3]) and not torch.allclose(a[:, 3], b[:, 3])


def test_level_queues_advance_together_and_hold_the_last_keys():
    q = LevelQueues(dim=2, size=5, levels=4)
    keys = [torch.randn(3, 4, 2) for _ in range(3)]
    for k in keys:
        q.enqueue(k)
    assert int(q.ptr) == 9 % 5
    last5 = torch.nn.functional.normalize(torch.cat(keys)[-5:], dim=-1)       # slots 4, 0, 1, 2, 3
    order = [(4 + i) % 5 for i in range(5)]
    for level in range(4):
        assert torch.allclose(q[level][order], last5[:, level])


def test_forward_enqueues_the_keys_of_every_level_in_the_same_slots(insloc):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    recs = [{"image": rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)} for _ in range(4)]
    src = ListSource(recs)
    batch = insloc.collate([insloc.views(r, np.random.default_rng(i), src) for i, r in enumerate(recs)])
    before, p = insloc.queues.keys.clone(), int(insloc.queues.ptr)
    out = insloc(batch)
    assert torch.isfinite(out["loss"]) and set(out) >= {"loss_p2", "loss_p3", "loss_p4", "loss_p5", "acc1"}
    assert torch.isclose(out["loss"], sum(out[f"loss_p{i}"] for i in range(2, 6)))
    changed = (insloc.queues.keys != before).any(-1)                             # (size, levels)
    slots = [(p + i) % insloc.cfg.queue_size for i in range(4)]
    assert changed[slots].all() and not changed[[s for s in range(16) if s not in slots]].any()
    assert int(insloc.queues.ptr) == (p + 4) % insloc.cfg.queue_size
    out["loss"].backward()
    assert all(p.grad is None for p in insloc.encoder_k.parameters())


def test_level_loss_equals_a_hand_computation():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # level 0: q = k = e1, queue e2, -e1 -> logits (1, 0, -1) / T
    # level 1: q = e1, k = e2, queue e1, e2 -> logits (0, 1, 0) / T; q scaled by 3 (normalised away)
    q = torch.stack([torch.stack([e1, 3 * e1])])
    k = torch.stack([torch.stack([e1, e2])])
    queues = torch.stack([torch.stack([e2, e1]), torch.stack([-e1, e2])])      # (K=2, L=2, D=2)
    T = 0.5
    total, losses, logits = level_info_nce(q, k, queues, T, weights=(1.0, 0.5))
    l0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(-2)))
    l1 = -math.log(math.exp(0) / (math.exp(0) + math.exp(2) + math.exp(0)))
    assert math.isclose(losses[0].item(), l0, rel_tol=1e-6) and math.isclose(losses[1].item(), l1, rel_tol=1e-6)
    assert math.isclose(total.item(), l0 + 0.5 * l1, rel_tol=1e-6)
    assert torch.allclose(logits[0], torch.tensor([[2.0, 0.0, -2.0]]))


@pytest.fixture(scope="module")
def tiny_export():
    torch.manual_seed(0)
    m = methods.build_method("insloc", **{**methods.get_method("insloc").scales["tiny"]["method"],
                                          "queue_size": 8})
    return m.export()


EXTRA_NORM = {f"roi_heads.box_head.extra_norm.{n}" for n in ("weight", "bias", "running_mean", "running_var")}


def _insloc_detector(**overrides):
    from benchmark.experiments.config import finetune_config
    from benchmark.detectors import build_detector
    det_cfg = finetune_config(scale="micro", schedule="1x", parent="p" * 16, method="insloc",
                              detector_overrides=overrides or None)["detector"]
    return det_cfg, build_detector(det_cfg, num_classes=9)


def test_export_loads_into_the_insloc_finetuning_detector_with_the_box_head_loaded(tiny_export):
    """InsLoc's rows fine-tune with the ExtraNorm head (official FastRCNNConvFCHeadExtraNorm):
    convs + fc1 load from the export, the norm after fc1 is fresh and reported in ``other``."""
    from benchmark.detectors import get_detector, load_pretrained
    state = tiny_export
    assert not any(k.startswith(("fc2", "proj", "fc.")) for k in state)
    head_keys = {k for k in state if k.startswith("box_head.")}
    assert {k.split(".")[1] for k in head_keys} == {"0", "1", "2", "3", "5"}   # 4 convs (+BN) and fc1
    det_cfg, det = _insloc_detector()
    assert det_cfg["box_head_extra_norm"] is True
    report = load_pretrained(det, state, get_detector(det_cfg["name"]), require=("backbone", "fpn", "box_head"),
                             source="insloc")
    for g in ("backbone", "fpn", "box_head"):
        r = report.groups[g]
        assert r.loaded and not r.missing and not r.unexpected and not r.mismatched, (g, r)
    assert len(report.groups["box_head"].loaded) == len(head_keys)
    assert EXTRA_NORM <= set(report.groups["other"].missing)       # freshly initialised, and said so
    assert torch.equal(det.roi_heads.box_head[5].weight, state["box_head.5.weight"])
    # the head's output is fc1 -> ReLU -> the extra BN (last layer; batch statistics in training)
    head = det.roi_heads.box_head.train()
    assert isinstance(head.extra_norm, torch.nn.BatchNorm1d) and list(head)[-1] is head.extra_norm
    x = torch.randn(6, det_cfg["fpn_channels"], 7, 7)
    h = x
    for layer in list(head)[:-1]:
        h = layer(h)
    assert h.shape == (6, det_cfg["box_head_fc_dim"]) and (h >= 0).all()    # after fc1's ReLU
    want = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
    assert torch.allclose(head(x), want, atol=1e-4)


def test_an_export_with_the_extra_norm_loads_it(tiny_export):
    from benchmark.detectors import get_detector, load_pretrained
    fc = tiny_export["box_head.5.bias"].numel()
    norm = {"weight": torch.full((fc,), 2.0), "bias": torch.full((fc,), -1.0),
            "running_mean": torch.full((fc,), 0.5), "running_var": torch.full((fc,), 3.0)}
    state = {**tiny_export, **{f"box_head.extra_norm.{k}": v for k, v in norm.items()}}
    det_cfg, det = _insloc_detector()
    report = load_pretrained(det, state, get_detector(det_cfg["name"]), require=("backbone", "fpn", "box_head"))
    assert EXTRA_NORM <= set(report.groups["other"].loaded) and not EXTRA_NORM & set(report.groups["other"].missing)
    assert not report.groups["box_head"].missing
    for k, v in norm.items():
        assert torch.equal(getattr(det.roi_heads.box_head.extra_norm, k), v), k


def test_only_insloc_rows_of_fpn_rcnns_get_the_extra_norm_and_other_keys_stay():
    from benchmark.experiments.config import finetune_config
    from benchmark.runs.identity import run_key
    plain = finetune_config(scale="tiny", parent="p" * 16)
    moco = finetune_config(scale="tiny", parent="p" * 16, method="moco_v2")
    insloc = finetune_config(scale="tiny", parent="p" * 16, method="insloc")
    # at its default (off) the field is left out of the resolved config: other runs keep their keys
    assert "box_head_extra_norm" not in plain["detector"] and plain["detector"] == moco["detector"]
    assert insloc["detector"] == {**moco["detector"], "box_head_extra_norm": True}
    assert run_key(insloc) != run_key(moco)
    # a row override turns it off again; the C4 detectors have no fc head and no such field
    off = finetune_config(scale="tiny", parent="p" * 16, method="insloc",
                          detector_overrides={"box_head_extra_norm": False})
    assert off["detector"] == moco["detector"]
    for c4 in ("mask_rcnn_c4", "faster_rcnn_c4"):
        assert finetune_config(scale="tiny", parent="p" * 16, method="insloc", detector=c4)["detector"] == \
            finetune_config(scale="tiny", parent="p" * 16, method="moco_v2", detector=c4)["detector"]
    with pytest.raises(ConfigError, match="detector.box_head_extra_norm"):
        finetune_config(scale="tiny", parent="p" * 16, method="insloc", detector_overrides={"box_head": "2mlp"})


def test_pretraining_optimizer_is_nesterov_for_insloc_and_not_for_moco(isolated):
    """Official insloc_fpn_200ep.py: SGD, momentum 0.9, nesterov. The field is left out of a
    run's config at its default (False), so MoCo v2's runs keep their keys."""
    from benchmark.experiments.config import pretrain_config
    from benchmark.stages.pretrain import run_pretrain
    from tests.conftest import MICRO_DATA
    seen = {}
    for name, method in (("insloc", {"queue_size": 8}), ("moco_v2", {"queue_size": 8, "crop_size": 32})):
        cfg = pretrain_config(name, scale="tiny", epochs=4, method_overrides=method,
                              recipe_overrides={"batch_size": 2, "steps_per_epoch": 1}, data_overrides=MICRO_DATA)
        cfg["runtime"] = {"ckpt_every": 100, "log_every": 1}
        run_pretrain(cfg, isolated / name, stop_after=1, progress=False)
        opt = torch.load(isolated / name / "checkpoint.pt", weights_only=False)["optimizer"]
        seen[name] = (cfg["recipe"].get("nesterov"), {g["nesterov"] for g in opt["param_groups"]})
    assert seen == {"insloc": (True, {True}), "moco_v2": (None, {False})}


@pytest.mark.parametrize("fused", [False, True])
def test_nesterov_step_equals_a_hand_computation(fused):
    from benchmark.engine.optim import build_optimizer
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([p], "sgd", 0.1, 0.0, momentum=0.9, fused=fused, nesterov=True)
    for _ in range(2):
        p.grad = torch.full((3,), 2.0)
        opt.step()
    # buf1 = g, p1 = 1 - 0.1 (g + 0.9 buf1) = 0.62; buf2 = 0.9 g + g = 3.8, p2 = p1 - 0.1 (g + 0.9 buf2)
    assert torch.allclose(p.detach(), torch.full((3,), 0.62 - 0.1 * (2.0 + 0.9 * 3.8)))


@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
def test_nesterov_with_another_optimizer_is_a_config_error_naming_the_field(optimizer):
    from benchmark.experiments.config import pretrain_config
    from benchmark.engine.optim import build_optimizer
    from benchmark.runs.identity import strip_defaults
    from methods.base import PretrainRecipe
    with pytest.raises(ConfigError, match="recipe.nesterov"):
        PretrainRecipe.from_dict({"optimizer": optimizer, "nesterov": True})
    with pytest.raises(ConfigError, match="recipe.nesterov"):
        pretrain_config("insloc", scale="tiny", recipe_overrides={"optimizer": optimizer})
    with pytest.raises(ValueError, match="recipe.nesterov"):
        build_optimizer([torch.nn.Parameter(torch.ones(1))], optimizer, 0.1, 0.0, nesterov=True)
    assert "nesterov" not in strip_defaults(PretrainRecipe, PretrainRecipe(optimizer=optimizer).to_dict())


def test_c4_reconstruction_pools_c4_and_exports_res5_with_the_backbone():
    m = methods.build_method("insloc", arch="c4", backbone="resnet18", head_fc_dim=32, background_size=64,
                             fg_size=(32, 64), anchor_stride=4, queue_size=8)
    assert m.level_names == ["c4"] and m.aug_levels == [0] and m.encoder_q.roi_size == 14
    boxes = m.level_boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]] * 2), torch.tensor([[4.0, 4.0, 44.0, 40.0]] * 2))
    assert m.encoder_q(torch.randn(2, 3, 64, 64), boxes).shape == (2, 1, 128)
    state = m.export()
    assert "layer4.0.conv1.weight" in state and not any(k.startswith(("fpn.", "box_head.")) for k in state)


@pytest.mark.parametrize("key, value, match", [
    ("arch", "c5", "method.arch"),
    ("fg_size", [128, 300], "method.fg_size"),
    ("box_aug_levels", [4], "method.box_aug_levels"),
    ("level_weights", [1.0, 1.0], "method.level_weights"),
])
def test_bad_config_values_name_the_field(key, value, match):
    with pytest.raises(ConfigError, match=match):
        methods.build_method("insloc", **{**SMALL, key: value})


def test_modelzoo_plans_fpn_and_c4_columns_and_an_unknown_detector_needs_it(tmp_path):
    import dataclasses

    from benchmark.experiments.plan import plan_table
    from benchmark.reporting.render import cell_values
    from benchmark.runs.store import RunStore
    plan = plan_table("insloc_modelzoo", scale="micro", seeds=(0,))
    spec = plan.spec
    jobs = {j.key: j for j in plan.jobs}
    c4 = {ci for ci, col in enumerate(spec.columns) if col.detector == "mask_rcnn_c4"}
    assert len(c4) == 4 and {spec.columns[ci].label[:2] for ci in c4} == {"C4"}
    for cell in plan.cells:
        assert cell.eval_key is not None
        want = "mask_rcnn_c4" if cell.col in c4 else "mask_rcnn"
        assert jobs[cell.chain[-2]].config["detector"]["name"] == want
    cells = cell_values(plan, RunStore(tmp_path))
    insloc400 = next(ri for ri, r in enumerate(spec.rows) if r.label == "InsLoc 400ep")
    assert cells[(insloc400, 0)]["ref"] == 42.0 and cells[(insloc400, 7)]["ref"] == 36.3   # FPN 1x APbb, C4 2x APmk
    # a column naming a detector that is not registered: its cells read "needs detector"
    cols = [dataclasses.replace(c, detector="no_such_detector") if i in c4 else c for i, c in enumerate(spec.columns)]
    odd = plan_table(dataclasses.replace(spec, columns=cols), scale="micro", seeds=(0,))
    assert all(c.eval_key is None and c.missing == "needs detector" for c in odd.cells if c.col in c4)
    assert cell_values(odd, RunStore(tmp_path))[(insloc400, min(c4))]["status"] == "needs detector"
    # the InsLoc row of SoCo's Table 1 is planned now that the method is registered
    t1 = plan_table("soco_table1", scale="micro", seeds=(0,))
    row = next(ri for ri, r in enumerate(t1.spec.rows) if r.method == "insloc")
    assert all(c.eval_key for c in t1.cells if c.row == row)
