"""AlignDet in the harness: its config records the detector and the parent run, its recipe
is the detector's box-domain recipe, the pretraining stage injects the detector with the
parent's backbone, fine-tuning after it scales the detector's own lr and wd."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.experiments.config import finetune_config, pretrain_config
from benchmark.detectors import build_detector
from benchmark.stages.pretrain import attach_detector, build_for_pretrain
from benchmark.runs.identity import run_key
from methods.aligndet import AlignDet
from methods.config import ConfigError


def _cfg(detector="retinanet", parent="p" * 16, **kw):
    return pretrain_config("aligndet", scale="micro", parent=parent,
                           method_overrides={"detector": detector}, **kw)


def test_config_records_detector_parent_and_box_domain_recipe():
    cfg = _cfg("retinanet")
    assert cfg["parent"] == "p" * 16
    ref = finetune_config(scale="micro", parent=None, detector="retinanet")["detector"]
    assert cfg["detector"] == ref                      # the fine-tuning builder's config at this scale
    r = cfg["recipe"]
    assert r["schedule"] == "multistep" and r["milestones"] == pytest.approx([8 / 12, 11 / 12])
    assert r["base_lr"] == 0.01 and "grad_clip" not in r      # RetinaNet's lr; no clipping: left out
    mask = _cfg("mask_rcnn")["detector"]
    assert mask["name"] == "mask_rcnn" and mask["box_head"] == "4conv1fc"   # detector_spec's overrides
    assert mask["fpn_channels"] == 64                                        # the micro scale's entry
    assert _cfg("mask_rcnn")["recipe"]["base_lr"] == 0.02
    # the identity covers the parent and the detector
    assert len({run_key(_cfg("retinanet")), run_key(_cfg("retinanet", parent="q" * 16)), run_key(_cfg("fcos"))}) == 3


def test_config_needs_a_parent_and_refuses_unknown_detectors():
    with pytest.raises(ConfigError, match="parent: missing"):
        _cfg("fcos", parent=None)
    with pytest.raises(ConfigError, match="method.detector"):
        _cfg("mask_rcnn_c4")


def test_aligndet_pretrains_on_the_detection_training_images(tmp_path):
    method, data, _ = build_for_pretrain(_cfg("fcos"))
    assert data["pretrain"] == data["train"]               # synthetic train scenes, labels unread
    user = {"kind": "coco", "pretrain": {"image_root": str(tmp_path)},
            "train": {"image_root": str(tmp_path), "ann_file": "t.json"}, "val": {"image_root": "v", "ann_file": "v.json"}}
    cfg = _cfg("fcos", data=user)
    assert set(cfg["data"]) - {"identity"} == {"kind", "train"}      # --data: its train split, nothing else
    assert "train" not in pretrain_config("moco_v2", scale="micro", data=user)["data"]


def test_image_domain_configs_keep_their_recipe_keys_and_new_fields_are_checked():
    cfg = pretrain_config("moco_v2", scale="micro")
    assert "milestones" not in cfg["recipe"] and "grad_clip" not in cfg["recipe"]
    assert "detector" not in cfg and "parent" not in cfg
    cfg = pretrain_config("moco_v2", scale="micro", recipe_overrides={"milestones": [0.5], "grad_clip": 1.0})
    assert cfg["recipe"]["milestones"] == [0.5] and cfg["recipe"]["grad_clip"] == 1.0
    with pytest.raises(ConfigError, match="recipe.milestones"):
        pretrain_config("moco_v2", scale="micro", recipe_overrides={"milestones": [0.9, 0.5]})
    with pytest.raises(ConfigError, match="recipe.grad_clip"):
        pretrain_config("moco_v2", scale="micro", recipe_overrides={"grad_clip": 0})


@pytest.mark.parametrize("detector", ["mask_rcnn", "retinanet", "fcos"])
def test_finetuning_after_aligndet_scales_the_detectors_own_lr_and_wd(detector):
    plain = finetune_config(scale="micro", parent="x", method="moco_v2", detector=detector)["recipe"]
    after = finetune_config(scale="micro", parent="x", method="aligndet", detector=detector)["recipe"]
    assert after["lr"] == pytest.approx(1.5 * plain["lr"])
    assert after["weight_decay"] == pytest.approx(0.5 * plain["weight_decay"])
    paper = finetune_config(scale="tiny", parent="x", method="aligndet", detector=detector)["recipe"]
    assert AlignDet.finetune_factors["lr"] == 1.5 and paper["lr"] > 0


def test_attach_detector_loads_the_parents_backbone(tmp_path):
    cfg = _cfg("fcos")
    parent = build_detector(cfg["detector"], 2).backbone.body.state_dict()   # bare torchvision names
    torch.manual_seed(1)
    parent = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in parent.items()}
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": parent}, path)
    method = build_for_pretrain(cfg)[0]
    attach_detector(method, cfg, path)
    got = method.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in parent.items() if not k.endswith("num_batches_tracked"))
    assert not any(p.requires_grad for p in method.backbone.parameters())
    with pytest.raises(ValueError, match="parent: missing"):
        attach_detector(build_for_pretrain(cfg)[0], {**cfg, "parent": None}, path)
    with pytest.raises(FileNotFoundError, match="weights.pt"):
        attach_detector(build_for_pretrain(cfg)[0], cfg, tmp_path / "none" / "weights.pt")


def _spec(tmp_path, columns, row):
    import yaml
    from benchmark.experiments.tables import load_spec
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "columns": [{"label": d, "schedule": "1x", "metric": "bbox.AP",
                                                            "detector": d} for d in columns], "rows": [row]}))
    return load_spec(str(p))


def test_plan_chains_parent_then_one_aligndet_run_per_detector():
    from benchmark.experiments.plan import plan_table
    plan = plan_table("aligndet_gains", scale="tiny")
    jobs = {j.key: j for j in plan.jobs}
    alone = [c for c in plan.cells if c.row == 0]
    moco = alone[0].chain[0]
    assert all(c.chain[0] == moco and len(c.chain) == 3 for c in alone)
    seen = set()
    for c in (c for c in plan.cells if c.row == 1):
        col = plan.spec.columns[c.col]
        parent, box, ft, ev = c.chain
        assert parent == moco                                  # the image-domain row's run, shared
        b = jobs[box]
        assert b.parents == (moco,) and b.config["parent"] == moco
        shared = "mask_rcnn" if col.detector == "faster_rcnn" else col.detector   # one R-CNN run
        assert b.config["method"]["detector"] == shared == b.config["detector"]["name"]
        assert jobs[ft].parents == (box,) and jobs[ft].config["parent"] == box
        assert jobs[ev].parents == (ft,) and c.eval_key == ev
        plain = next(jobs[a.chain[1]] for a in alone if a.col == c.col)
        factor = 1.5 if col.detector != "detr" else 1.0      # DETR keeps its one recipe (detr.py)
        assert jobs[ft].config["recipe"]["lr"] == pytest.approx(factor * plain.config["recipe"]["lr"])
        seen.add(box)
    assert len(seen) == 4        # FCOS, RetinaNet, the R-CNNs' shared run, DETR
    order = [j.key for j in plan.jobs]
    assert all(order.index(p) < order.index(j.key) for j in plan.jobs for p in j.parents)


def test_plan_box_rows_need_a_parent_and_mark_unsupported_columns(tmp_path):
    from benchmark.experiments.plan import plan_table
    row = {"label": "AD", "method": "aligndet", "parent": {"method": "moco_v2", "pretrain_epochs": 200}}
    plan = plan_table(_spec(tmp_path, ["fcos", "detr", "faster_rcnn_c4"], row), scale="tiny")
    assert [c.missing for c in plan.cells] == ["", "", "not supported"]
    with pytest.raises(ConfigError, match=r"rows\[0\]\.parent: missing"):
        plan_table(_spec(tmp_path, ["fcos"], {"label": "AD", "method": "aligndet"}), scale="tiny")
    with pytest.raises(ConfigError, match=r"rows\[0\]\.parent: moco_v2 pretrains no detector"):
        plan_table(_spec(tmp_path, ["fcos"], {"label": "M", "method": "moco_v2", "parent": {"method": "moco_v2"}}),
                   scale="tiny")
    with pytest.raises(ConfigError, match=r"rows\[0\]\.parent\.method"):
        plan_table(_spec(tmp_path, ["fcos"], {**row, "parent": {"method": "aligndet"}}), scale="tiny")


def test_micro_chain_end_to_end(isolated):
    """``reproduce`` at micro (about 10 s): MoCo v2 -> AlignDet(FCOS) -> fine-tuning ->
    evaluation; the AlignDet run names its parent, drops its lr at the recipe's milestones and
    exports the parent's backbone bit for bit."""
    import json
    from pathlib import Path

    from benchmark.cli import main
    from methods.weights import read_state_dict
    from benchmark.experiments.plan import plan_table
    spec = str(Path(__file__).resolve().parent / "specs" / "micro_aligndet.yaml")
    assert main(["reproduce", "--table", spec, "--scale", "micro"]) == 0
    (cell,) = plan_table(spec, scale="micro").cells
    parent, box, ft, ev = cell.chain
    runs = isolated / "runs"
    for k in cell.chain:
        assert (runs / k / "metrics.json").exists(), k
    cfg = json.loads((runs / box / "config.json").read_text())
    assert cfg["parent"] == parent and cfg["detector"]["name"] == "fcos"
    assert json.loads((runs / ft / "config.json").read_text())["parent"] == box
    lrs = [json.loads(line)["lr"] for line in (runs / box / "log.jsonl").read_text().splitlines()]
    total = len(lrs)   # 8 at micro: drops at round(8 * 8/12) = 5 and round(8 * 11/12) = 7
    drops = [round(f * total) for f in cfg["recipe"]["milestones"]]
    assert lrs == pytest.approx([lrs[0] * 0.1 ** sum(s >= m for m in drops) for s in range(total)])
    assert lrs[-1] == pytest.approx(lrs[0] * 0.01)
    mine, theirs = read_state_dict(runs / box / "weights.pt"), read_state_dict(runs / parent / "weights.pt")
    backbone = [k for k in theirs if not k.startswith(("fc.", "fpn.", "box_head."))]
    assert backbone and all(torch.equal(mine[k], theirs[k]) for k in backbone if not k.endswith("num_batches_tracked"))
    assert any(k.startswith("fpn.") or k.startswith("head.") for k in mine)   # the pretrained neck/heads


@pytest.mark.slow
def test_interrupted_aligndet_run_resumes_to_the_same_weights(isolated):
    """The detector is attached before resume: a run killed half-way and resumed exports the
    weights of an uninterrupted one (same sha256). About 13 s."""
    from pathlib import Path

    from benchmark.experiments.plan import plan_table
    from benchmark.runner import run_job
    from benchmark.runs.store import RunStore
    plan = plan_table(str(Path(__file__).resolve().parent / "specs" / "micro_aligndet.yaml"), scale="micro")
    parent, box = (j for j in plan.jobs if j.stage == "pretrain")
    assert box.parents == (parent.key,)
    a, b = str(isolated / "a"), str(isolated / "b")
    for store in (a, b):
        run_job(parent, store, progress=False)
    run_job(box, a, progress=False)
    run_job(box, b, stop_after=3, progress=False)
    assert RunStore(b).status(box.key) == "interrupted"
    run_job(box, b, progress=False)
    assert RunStore(a).metrics(box.key)["weights_sha256"] == RunStore(b).metrics(box.key)["weights_sha256"]


def test_faster_and_mask_rcnn_share_one_aligndet_run():
    """The mask head is not pretrained: AlignDet over Faster R-CNN is the Mask R-CNN run."""
    faster, mask = _cfg("faster_rcnn"), _cfg("mask_rcnn")
    assert faster == mask and run_key(faster) == run_key(mask)
    assert faster["method"]["detector"] == faster["detector"]["name"] == "mask_rcnn"


# the exported classifiers/regressors a fine-tuning detector re-initialises (and the mask
# branch, which AlignDet does not pretrain), by detector
REINIT = {"faster_rcnn": ("roi_heads.box_predictor.",),
          "mask_rcnn": ("roi_heads.box_predictor.", "roi_heads.mask_head.", "roi_heads.mask_predictor."),
          "retinanet": ("head.classification_head.cls_logits.", "head.regression_head.bbox_reg."),
          "fcos": ("head.classification_head.cls_logits.", "head.regression_head.bbox_reg.",
                   "head.regression_head.bbox_ctrness."),
          "detr": ("detr.class_labels_classifier.", "detr.bbox_predictor.")}
# the pretrained neck and heads each export brings (detector key prefixes)
NECK_HEADS = {"faster_rcnn": ("backbone.fpn.", "rpn.", "roi_heads.box_head."),
              "mask_rcnn": ("backbone.fpn.", "rpn.", "roi_heads.box_head."),
              "retinanet": ("backbone.fpn.", "head.classification_head.conv.", "head.regression_head.conv."),
              "fcos": ("backbone.fpn.", "head.classification_head.conv.", "head.regression_head.conv."),
              "detr": ("detr.model.input_projection.", "detr.model.encoder.", "detr.model.decoder.",
                       "detr.model.query_position_embeddings.")}


@pytest.mark.parametrize("detector", sorted(REINIT))
def test_export_loads_into_the_fine_tuning_detector(detector, tmp_path):
    """Each detector's AlignDet export (its online part moved off its initial values) loads
    into the registry's fine-tuning detector of that name: neck and heads loaded bit for bit;
    exactly the final classifiers/regressors (and the mask branch) missing: re-initialised."""
    from torchvision.models import resnet18

    from benchmark.detectors import get_detector, load_pretrained
    cfg = _cfg(detector)
    path = tmp_path / "parent.pt"        # an image-domain export: canonical ResNet-18 names
    torch.save({"state_dict": resnet18(weights=None).state_dict()}, path)
    method = build_for_pretrain(cfg)[0]
    attach_detector(method, cfg, path)
    with torch.no_grad():
        for p in method.online.parameters():
            p.add_(0.01)
    state = method.export()
    ft = finetune_config(scale="micro", parent="x", method="aligndet", detector=detector)["detector"]
    model, det = build_detector(ft, 5), get_detector(detector)
    report = load_pretrained(model, state, det, source="aligndet")
    groups = report.groups.values()
    assert not any(g.unexpected or g.mismatched for g in groups), report.summary()
    missing = [k for g in groups for k in g.missing]
    assert all(k.startswith(REINIT[detector]) for k in missing), missing
    assert all(any(k.startswith(p) for k in missing) for p in REINIT[detector])
    own, top = model.state_dict(), {n for n, _ in model.named_children()}
    mapped = {(k if k.split(".", 1)[0] in top else det.detector_key(k)): v for k, v in state.items()}
    for prefix in NECK_HEADS[detector]:
        keys = [k for k in mapped if k.startswith(prefix)]
        assert keys and all(torch.equal(own[k], mapped[k]) for k in keys), prefix


class _Proposals:
    """A proposal cache's interface (``path``, ``len``, ``boxes(i)``) over given boxes."""

    def __init__(self, path, boxes):
        self.path, self._boxes = path, boxes

    def __len__(self):
        return len(self._boxes)

    def boxes(self, i):
        return self._boxes[i]


class _Source:
    def record(self, i):
        return {"image": np.full((32, 48, 3), 40 * i, dtype=np.uint8)}


class _Features:
    """``proposal_features`` of a method: one feature per box (its coordinates), counted."""
    calls = 0

    def proposal_features(self, image, boxes):
        self.calls += 1
        assert image.shape == (3, 32, 48) and image.dtype == torch.float32
        return torch.cat([boxes, image.mean().expand(len(boxes), 1)], 1)


def test_pseudo_classes_are_cached_per_backbone_and_one_per_proposal(tmp_path):
    from benchmark.data.pseudo_class_cache import compute_pseudo_classes
    rng = np.random.default_rng(0)
    boxes = [rng.integers(0, 30, (n, 4)).astype(np.int64) for n in (5, 0, 7, 4)]   # image 1: none
    props = _Proposals(tmp_path / "proposals-abc.npz", boxes)
    params = {"k": 3, "pca_dim": 4, "seed": 0}
    m = _Features()
    a = compute_pseudo_classes(m, _Source(), props, tmp_path / "pc", weights_sha256="w1", params=params, device="cpu")
    assert m.calls == 3                                             # the image without proposals is not read
    labels = [a.labels(i) for i in range(4)]
    assert [len(x) for x in labels] == [5, 0, 7, 4]                 # exactly one class per proposal
    flat = np.concatenate(labels)
    assert set(flat.tolist()) == {0, 1, 2}
    b = compute_pseudo_classes(m, _Source(), props, tmp_path / "pc", weights_sha256="w1", params=params, device="cpu")
    assert m.calls == 3 and b.path == a.path                        # read from the cache
    assert all(np.array_equal(x, b.labels(i)) for i, x in enumerate(labels))
    assert not list((tmp_path / "pc").glob("*.lock"))
    c = compute_pseudo_classes(m, _Source(), props, tmp_path / "pc", weights_sha256="w2", params=params, device="cpu")
    assert c.path != a.path and m.calls == 6                        # another backbone: its own file
    assert np.array_equal(np.concatenate([c.labels(i) for i in range(4)]), flat)   # same features here
    d = compute_pseudo_classes(m, _Source(), props, tmp_path / "pc", weights_sha256="w1",
                               params={**params, "seed": 1}, device="cpu")
    assert d.path not in (a.path, c.path)
    a.path.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="pseudo-class cache"):
        compute_pseudo_classes(m, _Source(), props, tmp_path / "pc", weights_sha256="w1", params=params, device="cpu")


def test_detr_aligndet_config_reads_pseudo_classes_at_the_scale_size():
    cfg = _cfg("detr")
    assert cfg["detector"]["name"] == "detr" and cfg["method"]["detr_classes"] == 64
    assert build_for_pretrain(cfg)[0].pseudo_class_params() == {"k": 64, "pca_dim": 256}
    assert build_for_pretrain(_cfg("fcos"))[0].pseudo_class_params() is None


def test_convergence_points_follow_the_schedules_of_each_detector():
    from benchmark.experiments.plan import plan_table
    from benchmark.reporting.render import convergence_points
    plan = plan_table("aligndet_gains", scale="micro")
    cells = {(c.row, c.col): {"mean": float(10 * c.row + c.col), "std": 0.0} for c in plan.cells}
    pts = convergence_points(plan, cells)
    assert list(pts) == [(d, "bbox.AP") for d in ("fcos", "retinanet", "faster_rcnn", "mask_rcnn", "detr")]
    for ci, col in enumerate(plan.spec.columns[::2]):
        for row in (0, 1):   # micro: 12k = 2 steps, 90k = 4 steps, in step order
            assert pts[(col.detector, "bbox.AP")][row] == [(2, 10.0 * row + 2 * ci, 0.0), (4, 10.0 * row + 2 * ci + 1, 0.0)]


@pytest.mark.slow
def test_micro_detr_chain_clusters_the_proposals_once(isolated, tmp_path):
    """MoCo v2 -> AlignDet(DETR) at micro: the run computes the pseudo-classes of every cached
    proposal on its parent's backbone and trains on them; another parent (backbone) gets its
    own classes."""
    from benchmark.cli import main
    from benchmark.data.proposal_cache import ProposalCache
    from benchmark.data.pseudo_class_cache import PseudoClasses
    row = {"label": "AD", "method": "aligndet", "parent": {"method": "moco_v2", "pretrain_epochs": 200}}
    spec = _spec(tmp_path, ["detr"], row)
    assert main(["reproduce", "--table", str(spec.path), "--scale", "micro"]) == 0
    (classes,) = (isolated / "cache" / "pseudo_classes").glob("classes-*.npz")
    (props,) = (isolated / "cache" / "proposals").glob("proposals-*.npz")
    props = ProposalCache.load(props)
    pc = PseudoClasses.load(classes, len(props))
    for i in range(len(props)):
        assert len(pc.labels(i)) == len(props.boxes(i))
    flat = np.concatenate([pc.labels(i) for i in range(len(props))])
    assert flat.min() >= 0 and flat.max() < 64 and len(set(flat.tolist())) == 64
    assert main(["reproduce", "--table", str(spec.path), "--scale", "micro",
                 "--set", "recipe.batch_size=4"]) == 0     # another parent run
    assert len(list((isolated / "cache" / "pseudo_classes").glob("classes-*.npz"))) == 2
