"""The export load table (issue 26): for each framework x method x arch, a randomly initialised
pretraining model's export (and a few fine-tuned detectors') loaded into the model its config
fragment names, with the keys loaded / missing (in the exported groups) / unexpected and the
largest |output difference| of backbone, FPN, box head (and detector heads) against our modules.

    .venv/bin/python -m tools.export_load_table            # writes results/exports/load_table.{md,json}

torchvision: the fragment run as a user runs it (its builder, ``load_state_dict``). mmdet
(``make test-mmdet`` installs it into .cache/mmdet-site, off the default path): the detector
built from mmdet's own base config with the fragment pasted over it, loaded by mmengine's
``load_checkpoint``. detectron2 (not on PyPI): names and shapes only (tools/d2_reference.py).
"Our modules" are torchvision's, which define the canonical key space, strict-loaded from the
canonical state (a fine-tuned detector: the torchvision detector itself).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import pickle
import runpy
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import yaml
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from benchmark.stages.export import ExportError, describe, detector_kind, detector_to_canonical, save_export
from methods.backbones import resnet_stages
from tools import d2_reference

REPO = Path(__file__).resolve().parents[1]
MMDET_SITE = REPO / ".cache" / "mmdet-site"
METHODS = ("moco_v2", "soco", "insloc", "pixpro")
ARCHS = ("R18", "R50")
FINETUNED = ("mask_rcnn", "mask_rcnn_c4", "retinanet", "fcos")
FRAMEWORKS = ("torchvision", "mmdet", "detectron2")
EXPORTED = {"torchvision": ("backbone.body.", "backbone.fpn.", "roi_heads.box_head."),
            "mmdet": ("backbone.", "neck.", "roi_head.bbox_head.shared_", "roi_head.shared_head."),
            "detectron2": ("backbone.", "roi_heads.res5.", "roi_heads.box_head.")}
HEADS = {"torchvision": ("rpn.", "roi_heads.", "head."), "mmdet": ("rpn_head.", "roi_head.", "bbox_head."),
         "detectron2": ("proposal_generator.", "roi_heads.", "head.")}


# ------------------------------------------------------------------ the states
def _perturb_norms(state: dict, seed: int = 0) -> dict:
    """BatchNorm/GroupNorm affine parameters and statistics drawn away from their init (1, 0,
    0, 1), so that a norm placed in the wrong slot shows in the outputs; weights keep the
    model's own initialisation (bounded activations through R50)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    norms = {k.rsplit(".", 1)[0] for k in state if k.endswith("running_mean")}
    norms |= {k.rsplit(".", 1)[0] for k, v in state.items() if k.endswith(".weight") and v.dim() == 1
              and k.rsplit(".", 1)[0] + ".bias" in state and ("norm" in k or ".bn" in k or k.startswith("bn")
                                                               or ".1.weight" in k)}
    for m in sorted(norms):
        for p, draw in (("weight", lambda s: torch.rand(s, generator=g) + 0.5),
                        ("bias", lambda s: torch.randn(s, generator=g) * 0.1),
                        ("running_mean", lambda s: torch.randn(s, generator=g) * 0.1),
                        ("running_var", lambda s: torch.rand(s, generator=g) + 0.5)):
            k = f"{m}.{p}"
            if k in out and out[k].is_floating_point():
                out[k] = draw(out[k].shape)
    return out


def pretrain_state(method: str, arch: str, seed: int = 0) -> dict:
    """A randomly initialised pretraining model's export: R18 at the method's tiny config, R50
    at its paper defaults."""
    from benchmark.experiments.config import pretrain_config
    from methods import build_method
    cfg = {}
    if arch == "R18":
        cfg = dict(pretrain_config(method, scale="tiny")["method"])
        cfg.pop("name")
    torch.manual_seed(seed)
    return _perturb_norms(build_method(method, **cfg).export(), seed)


FINETUNE_CFG = {"mask_rcnn": dict(fpn_channels=32, head_norm="bn", box_head_conv_dim=32, box_head_fc_dim=64,
                                  mask_head_dim=32),
                "mask_rcnn_c4": {}, "retinanet": dict(fpn_channels=32), "fcos": dict(fpn_channels=32)}


def finetuned(name: str, seed: int = 0):
    """(a torchvision detector at R18 with 2 classes + background, its canonical state)."""
    from benchmark.detectors.registry import build_detector
    torch.manual_seed(seed)
    model = build_detector({"name": name, "backbone": "resnet18", **FINETUNE_CFG[name]}, 3)
    model.load_state_dict(_perturb_norms(model.state_dict(), seed))
    return model.eval(), detector_to_canonical(model.state_dict())


# ------------------------------------------------------------------ our modules
def _strict(module: nn.Module, state: dict, prefix: str) -> nn.Module:
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return module.eval()


def reference(state: dict) -> dict:
    """torchvision's modules (which define the canonical key space) strict-loaded from ``state``:
    ``body`` (C2..C5 of ``x``), ``fpn``, ``box_head``, as present."""
    d = describe(state)
    body = getattr(resnet, f"resnet{d['depth']}")()
    missing = body.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in
                                    ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")}, strict=False).missing_keys
    assert all(k.startswith("fc.") for k in missing), missing
    out = {"body": body.eval(), "describe": d}
    fpn = d.get("fpn")
    if fpn:
        norm = {"bn": nn.BatchNorm2d, "gn": lambda c: nn.GroupNorm(32, c)}.get(fpn["norm"])
        extra = LastLevelP6P7(fpn["p6p7_in"], fpn["channels"]) if fpn["p6p7_in"] else LastLevelMaxPool()
        out["fpn"] = _strict(FeaturePyramidNetwork(fpn["in_channels"], fpn["channels"], extra_blocks=extra,
                                                   norm_layer=norm), state, "fpn.")
    bh = d.get("box_head")
    if bh and bh["type"] == "2mlp":
        out["box_head"] = _strict(TwoMLPHead(fpn["channels"] * 49, bh["fc_dim"]), state, "box_head.")
    elif bh:
        out["box_head"] = _strict(FastRCNNConvFCHead((fpn["channels"], 7, 7), [bh["conv_dim"]] * bh["num_conv"],
                                                     [bh["fc_dim"]], norm_layer=nn.BatchNorm2d if bh["norm"] == "bn" else None),
                                  state, "box_head.")
    return out


def _maxdiff(a, b) -> float:
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), (len(a), len(b))
        return max((_maxdiff(x, y) for x, y in zip(a, b)), default=0.0)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def inputs(seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ mmdet
class _OpsStub(types.ModuleType):
    """``mmcv.ops`` without mmcv's compiled ``_ext`` (mmcv-lite): any name is a placeholder
    module class that builds (RoIAlign and the like have no parameters) and raises when run."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def forward(*a, **k):
            raise RuntimeError(f"{self.__name__}.{name}: a compiled mmcv op (mmcv-lite has none)")

        def init(obj, *a, **k):
            nn.Module.__init__(obj)
        cls = type(name, (nn.Module,), {"__init__": init, "forward": forward, "__module__": self.__name__})
        setattr(self, name, cls)
        return cls


class _OpsFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mmcv.ops" or fullname.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _OpsStub(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


def import_mmdet():
    """Import mmdet 3.3 over mmcv-lite 2.2 (the caller puts its site dir on ``sys.path``):
    ``mmcv.ops`` is stubbed (mmcv-lite has no compiled ops; none is needed to build and run
    ResNet, FPN, RPNHead, the bbox, mask and RetinaNet heads), and mmdet's ``mmcv < 2.2.0``
    assertion (which guards those compiled ops) is passed by reporting 2.1.0 while mmdet's
    ``__init__`` runs. Returns the ``mmdet`` module; ImportError when it is not installed."""
    if "mmdet.models" in sys.modules:
        return sys.modules["mmdet"]
    import mmcv   # ImportError: not installed
    try:
        importlib.import_module("mmcv.ops")
    except ImportError:
        for k in [k for k in sys.modules if k == "mmcv.ops" or k.startswith("mmcv.ops.")]:
            del sys.modules[k]
        sys.meta_path.insert(0, _OpsFinder())
    real = mmcv.__version__
    mmcv.__version__ = "2.1.0"
    try:
        mmdet = importlib.import_module("mmdet")
    finally:
        mmcv.__version__ = real
    importlib.import_module("mmdet.models")
    from mmengine.registry import init_default_scope
    init_default_scope("mmdet")
    return mmdet


MMDET_BASE = {"pretrain": "mask-rcnn_r50_fpn.py", "rcnn": "mask-rcnn_r50_fpn.py", "c4": "mask-rcnn_r50-caffe-c4.py",
              "retinanet": "retinanet_r50_fpn.py"}


def mmdet_detector(fragment_path: str, kind: str):
    """The mmdet detector of mmdet's own ``_base_/models`` config with the fragment pasted over
    it (the fragment's ``model = dict(...)`` merges into the base's), as docs/export.md says."""
    import mmdet
    from mmengine.config import Config
    from mmdet.registry import MODELS
    base = Path(mmdet.__file__).parent / ".mim" / "configs" / "_base_" / "models" / MMDET_BASE[kind]
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "cfg.py"
        cfg_file.write_text(f"_base_ = [{str(base)!r}]\n" + Path(fragment_path).read_text())
        cfg = Config.fromfile(str(cfg_file))
    model = MODELS.build(cfg.model)
    return model.eval(), cfg


def mmdet_load(model: nn.Module, path: str) -> dict:
    """``mmengine.runner.load_checkpoint`` (strict=False) of ``path`` into ``model``; the key sets
    as its ``load_state_dict`` computes them, and the keys whose values did not arrive."""
    import logging
    from mmengine.runner.checkpoint import _load_checkpoint, load_checkpoint
    msgs = []

    class _Catch(logging.Handler):
        def emit(self, record):
            msgs.append(record.getMessage())
    from mmengine.logging import MMLogger
    logger = MMLogger.get_instance("detbench-export-check")
    handler = _Catch()
    logger.addHandler(handler)
    try:
        load_checkpoint(model, path, map_location="cpu", strict=False, logger=logger)
    finally:
        logger.removeHandler(handler)
    file = _load_checkpoint(path, map_location="cpu")["state_dict"]
    sd = model.state_dict()
    not_equal = [k for k, v in file.items() if k in sd and not (sd[k].shape == v.shape and torch.equal(sd[k], v))]
    return {"file": file, "missing": sorted(set(sd) - set(file)), "unexpected": sorted(set(file) - set(sd)),
            "not_loaded": not_equal, "messages": msgs}


def mmdet_outputs(model, ref: dict, x: torch.Tensor, tv_model=None) -> dict:
    """max |difference| of mmdet's module outputs against ours, per group present."""
    diffs = {}
    with torch.no_grad():
        c = resnet_stages(ref["body"], x)
        mm_c = list(model.backbone(x))
        d = ref["describe"]
        if d["kind"] == "c4":
            diffs["backbone"] = _maxdiff(mm_c, c[2:3])
            if tv_model is not None:
                diffs["res5"] = _maxdiff(model.roi_head.shared_head.layer4(c[2]), c[3])
            return diffs
        diffs["backbone"] = _maxdiff(mm_c, c)
        if "fpn" in ref and hasattr(model, "neck"):
            lv = d["fpn"]["levels"]
            ins = {f"{i}": c[lvl - 2] for i, lvl in enumerate(lv)}
            ours = list(ref["fpn"](ins).values())
            diffs["fpn"] = _maxdiff(list(model.neck(mm_c)), ours)
            if tv_model is not None and d["kind"] == "retinanet":
                a, k = 9, d["num_classes"]
                th, cls_d, reg_d = tv_model.head, 0.0, 0.0
                for p in ours:
                    mc, mr = model.bbox_head.forward_single(p)
                    tc = th.classification_head.cls_logits(th.classification_head.conv(p))
                    tc = tc.reshape(1, a, k + 1, *tc.shape[2:])[:, :, 1:].reshape(mc.shape)
                    tr = th.regression_head.bbox_reg(th.regression_head.conv(p))
                    cls_d, reg_d = max(cls_d, _maxdiff(mc, tc)), max(reg_d, _maxdiff(mr, tr))
                diffs["retina_head"] = max(cls_d, reg_d)
            if tv_model is not None and d["kind"] == "rcnn":
                rpn = tv_model.rpn.head
                diffs["rpn_head"] = max(_maxdiff(list(model.rpn_head.forward_single(p)),
                                                 [rpn.cls_logits(rpn.conv(p)), rpn.bbox_pred(rpn.conv(p))])
                                        for p in ours[:4])
        if "box_head" in ref and hasattr(model, "roi_head"):
            bh = model.roi_head.bbox_head
            rois = torch.randn(2, d["fpn"]["channels"], 7, 7, generator=torch.Generator().manual_seed(1))
            seen = {}
            h = bh.fc_cls.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
            cls, reg = bh(rois)
            h.remove()
            feats = ref["box_head"](rois)
            diffs["box_head"] = _maxdiff(seen["x"], feats)
            if tv_model is not None and d.get("num_classes"):
                pred = tv_model.roi_heads.box_predictor
                diffs["box_predictor"] = max(_maxdiff(cls, torch.roll(pred.cls_score(feats), -1, 1)),
                                             _maxdiff(reg, pred.bbox_pred(feats)[:, 4:]))
            if tv_model is not None and d.get("mask"):
                rois = torch.randn(2, d["fpn"]["channels"], 14, 14, generator=torch.Generator().manual_seed(2))
                rh = tv_model.roi_heads
                diffs["mask_head"] = _maxdiff(model.roi_head.mask_head(rois), rh.mask_predictor(rh.mask_head(rois))[:, 1:])
    return diffs


def present_groups(keys, framework: str, finetuned: bool) -> tuple:
    """The exported groups (``EXPORTED``, and a fine-tuned detector's heads) the file holds."""
    groups = EXPORTED[framework] + (HEADS[framework] if finetuned else ())
    return tuple(g for g in groups if any(k.startswith(g) for k in keys))


def _export(state: dict, framework: str, path: Path) -> tuple[dict | None, dict | None]:
    """(``save_export``'s report, None), or (None, {"error": its message's first part}) when the
    export refuses the file (a key with no place in ``framework``): the table's "fails" cell."""
    try:
        return save_export(state, framework, path), None
    except ExportError as e:
        return None, {"error": str(e).split(" (--allow")[0][:160]}


def check_mmdet(state: dict, tmp: Path, tv_model=None) -> dict:
    rep, refused = _export(state, "mmdet", tmp / "mmdet.pth")
    if refused:
        return refused
    kind, note = detector_kind(state), None
    try:
        model, _ = mmdet_detector(rep["config_path"], kind)
    except KeyError as e:
        if "ResLayerExtraNorm" not in str(e):
            raise
        # mmselfsup's ResLayerExtraNorm (res5 + MoCo's norm) is not an mmdet module: mmdet's
        # ResLayer takes the rest, the norm is unexpected
        note = "shared_head ResLayerExtraNorm is mmselfsup's, not in mmdet: built as ResLayer"
        frag = Path(rep["config_path"])
        frag.write_text(frag.read_text().replace("ResLayerExtraNorm", "ResLayer"))
        model, _ = mmdet_detector(rep["config_path"], kind)
    r = mmdet_load(model, rep["path"])
    groups = present_groups(r["file"], "mmdet", kind != "pretrain")
    out = {"loaded": len(r["file"]) - len(r["unexpected"]) - len(r["not_loaded"]),
           "missing": [k for k in r["missing"] if k.startswith(groups)], "unexpected": r["unexpected"],
           "not_loaded": r["not_loaded"], "no_place": rep["no_place"] + ([note] if note else [])}
    out["diff"] = mmdet_outputs(model, reference(state), inputs(), tv_model)
    return out


def check_torchvision(state: dict, tmp: Path, tv_model=None) -> dict:
    rep, refused = _export(state, "torchvision", tmp / "torchvision.pth")
    if refused:
        return refused
    ns = runpy.run_path(rep["config_path"])
    model = ns["model"].eval()
    file = torch.load(rep["path"], weights_only=True)
    groups = present_groups(file, "torchvision", tv_model is not None)
    sd = model.state_dict()
    out = {"builder": next((b for b in ("maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", "BackboneWithFPN")
                            if b + "(" in rep["config"]), "?"),
           "loaded": sum(1 for k, v in file.items() if k in sd and torch.equal(sd[k], v)),
           "missing": [k for k in ns["missing"] if k.startswith(groups)], "unexpected": list(ns["unexpected"]),
           "not_loaded": [k for k, v in file.items() if k in sd and not torch.equal(sd[k], v)], "no_place": rep["no_place"]}
    ref, x, diffs = reference(state), inputs(), {}
    with torch.no_grad():
        c = resnet_stages(ref["body"], x)
        body = model.backbone.body
        ret = list(body.return_layers.values())
        diffs["backbone"] = _maxdiff(list(body(x).values()), [c[int(n) + 4 - len(ret)] for n in ret])
        if "fpn" in ref:
            lv = ref["describe"]["fpn"]["levels"]
            ins = {f"{i}": c[lvl - 2] for i, lvl in enumerate(lv)}
            diffs["fpn"] = _maxdiff(list(model.backbone.fpn(ins).values()), list(ref["fpn"](ins).values()))
        if "box_head" in ref:
            rois = torch.randn(2, ref["describe"]["fpn"]["channels"], 7, 7, generator=torch.Generator().manual_seed(1))
            diffs["box_head"] = _maxdiff(model.roi_heads.box_head(rois), ref["box_head"](rois))
        if tv_model is not None and "fpn" in ref:   # the heads: the fragment's model against the original's
            feats = list(model.backbone(inputs(size=256)).values())   # P7 2x2: FCOS's GroupNorm needs > 1 value
            if hasattr(model, "rpn"):
                diffs["rpn_head"] = _maxdiff([t for p in model.rpn.head(feats) for t in p],
                                             [t for p in tv_model.rpn.head(feats) for t in p])
                rh, th = model.roi_heads, tv_model.roi_heads
                rois = torch.randn(2, ref["describe"]["fpn"]["channels"], 14, 14, generator=torch.Generator().manual_seed(2))
                diffs["mask_head"] = _maxdiff(rh.mask_predictor(rh.mask_head(rois)), th.mask_predictor(th.mask_head(rois)))
            if hasattr(model, "head"):
                a, b = model.head(feats), tv_model.head(feats)
                diffs["head"] = _maxdiff([a[k] for k in sorted(a)], [b[k] for k in sorted(b)])
    out["diff"] = diffs
    return out


def check_detectron2(state: dict, tmp: Path, tv_model=None) -> dict:
    rep, refused = _export(state, "detectron2", tmp / "detectron2.pkl")
    if refused:
        return refused
    cfg = {k: v for k, v in d2_reference.flat(yaml.safe_load(rep["config"])).items() if v is not None}   # "FPN:" empty
    assert set(cfg) <= d2_reference.D2_KEYS, set(cfg) - d2_reference.D2_KEYS
    with open(rep["path"], "rb") as f:
        ckpt = {k: tuple(v.shape) for k, v in pickle.load(f)["model"].items()}
    m = d2_reference.match(d2_reference.model_shapes(cfg), ckpt)
    groups = {_d2_group(k) for k in ckpt}
    return {"loaded": len(m["loaded"]), "missing": [k for k in m["missing"] if _d2_group(k) in groups],
            "unexpected": m["unexpected"], "not_loaded": m["shape"], "no_place": rep["no_place"], "diff": {}}


def _d2_group(key: str) -> str:
    """resnet | fpn | box_head | heads, of a detectron2 model key or a file key (bare ResNet)."""
    k = key.removeprefix("backbone.bottom_up.").removeprefix("backbone.").removeprefix("roi_heads.")
    if k.startswith(("stem.", "res")):
        return "resnet"
    if k.startswith(("fpn_", "top_block.")):
        return "fpn"
    return "box_head" if k.startswith("box_head.") else "heads"


# ------------------------------------------------------------------ the table
def _cell(r: dict | None, framework: str) -> str:
    if r is None:
        return "not installed"
    if "error" in r:
        return "fails, naming the keys: " + r["error"].split(": [")[0]
    text = (f"`{r['builder']}`: " if r.get("builder") else "") + f"{r['loaded']} / {len(r['missing'])} / {len(r['unexpected'])}"
    if r["not_loaded"]:
        text += f" ({len(r['not_loaded'])} shape mismatches)"
    if r["diff"]:
        text += f"; max abs diff {max(r['diff'].values()):.1g} ({', '.join(r['diff'])})"
    if r["no_place"]:
        text += "; " + "; ".join(n.split(":")[0] for n in r["no_place"])
    return text


def build_table(with_mmdet: bool, archs=ARCHS, methods=METHODS, detectors=FINETUNED) -> list[dict]:
    rows = []
    checks = {"torchvision": check_torchvision, "mmdet": check_mmdet if with_mmdet else None,
              "detectron2": check_detectron2}
    jobs = [(m, a, "pretrain") for m in methods for a in archs] + [(d, "R18", "finetuned") for d in detectors]
    for name, arch, what in jobs:
        t = time.time()
        tv_model, state = finetuned(name) if what == "finetuned" else (None, pretrain_state(name, arch))
        row = {"model": name, "arch": arch, "what": what}
        for fw, check in checks.items():
            with tempfile.TemporaryDirectory() as tmp:
                row[fw] = check(state, Path(tmp), tv_model) if check else None
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
        print(f"{name} {arch}: {row['seconds']} s", file=sys.stderr)
    return rows


def render(rows: list[dict], command: str) -> str:
    lines = ["# Export load table", "",
             f"Made by `{command}` (tools/export_load_table.py). Each cell: keys **loaded / missing (in the "
             "exported groups) / unexpected**, then the largest |output difference| against our modules "
             "(torchvision's, strict-loaded from the canonical state; a fine-tuned row: the original "
             "torchvision detector) over the groups named. Pretraining rows: a randomly initialised model's "
             "export (R18: the method's tiny config, R50: its paper defaults; norm statistics drawn away "
             "from their init); fine-tuned rows: torchvision detectors at R18, 2 classes.", "",
             "- torchvision: the fragment run as written (its builder), `load_state_dict(strict=False)`.",
             "- mmdet 3.3.0 (mmengine 0.10.7, mmcv-lite 2.2.0 with `mmcv.ops` stubbed): the detector built from "
             "mmdet's own `_base_/models` config (`mask-rcnn_r50_fpn.py`, `mask-rcnn_r50-caffe-c4.py`, "
             "`retinanet_r50_fpn.py`) with the fragment pasted over it, loaded by `mmengine.runner.load_checkpoint`.",
             "- detectron2: names+shapes (detectron2 not installed): the model the fragment's config builds, from "
             "detectron2's documented structure (tools/d2_reference.py), matched as `matching_heuristics` does.", "",
             "| model | arch | torchvision | mmdet | detectron2: names+shapes (detectron2 not installed) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        name = r["model"] + (" (fine-tuned)" if r["what"] == "finetuned" else "")
        lines.append(f"| {name} | {r['arch']} | {_cell(r['torchvision'], 'torchvision')} | "
                     f"{_cell(r['mmdet'], 'mmdet')} | {_cell(r['detectron2'], 'detectron2')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "results" / "exports" / "load_table"))
    ap.add_argument("--mmdet-site", default=str(MMDET_SITE))
    args = ap.parse_args(argv)
    with_mmdet = False
    if Path(args.mmdet_site).is_dir():
        sys.path.insert(0, args.mmdet_site)
        try:
            import_mmdet()
            with_mmdet = True
        except ImportError as e:
            print(f"mmdet: not importable from {args.mmdet_site} ({e})", file=sys.stderr)
    import logging
    logging.getLogger("mmengine").setLevel(logging.ERROR)
    rows = build_table(with_mmdet)
    command = ".venv/bin/python -m tools.export_load_table" + (f" --out {args.out}" if argv else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(render(rows, command))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "mmdet": with_mmdet, "rows": rows}, indent=1) + "\n")
    print(out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
