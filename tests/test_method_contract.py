"""One contract over every registered method (as timm tests every registered model): views ->
collate -> forward -> backward -> optimizer step -> momentum update -> export -> load into the
fine-tuning detector with every exported group loaded. A new method is covered the day it
registers."""
from __future__ import annotations


import pytest
import torch

from tests import inputs
from benchmark.experiments.config import finetune_config
from benchmark.detectors import build_detector, get_detector, load_pretrained
from benchmark.engine.optim import build_optimizer
from methods import build_method, get_method, list_methods



def test_registry_lists_the_methods_imported_explicitly():
    assert {"moco_v2", "soco", "supervised"} <= set(list_methods())


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name):
    torch.manual_seed(0)
    cls = get_method(name)
    method = build_method(name, **inputs.method_config(name, cls.scales.get("tiny")))
    spec = method.detector_spec()
    if spec is not None:   # a method that pretrains a whole detector gets one, as the harness injects it
        det_cfg = finetune_config(scale="micro", schedule="1x", parent=None, detector=spec["name"])["detector"]
        method.attach_detector(build_detector({**det_cfg, **spec}, num_classes=9))
    # views: every sample has the same keys; tensors are finite
    samples = inputs.samples(method, 4, 64)
    assert all(s.keys() == samples[0].keys() for s in samples)
    batch = method.collate(samples)
    method.train()
    out = method(batch)
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss), f"{name}: loss {loss}"
    assert all(torch.as_tensor(v).numel() == 1 for v in out.values()), f"{name}: logs must be scalars"
    # backward: the trained parameters get gradients; an optimizer step changes them
    groups = method.param_groups()
    trained = [p for g in groups for p in g["params"]]
    assert trained and all(p.requires_grad for p in trained)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), f"{name}: no gradient"
    before = {k: v.clone() for k, v in method.state_dict().items()}
    build_optimizer(groups, cls.recipe.optimizer, 0.1, cls.recipe.weight_decay).step()
    method.momentum_update(0.5)
    after = method.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, f"{name}: nothing changed after a step"
    # parameters outside the optimizer (target networks) change only through the momentum update
    trained_ids = {id(p) for p in trained}
    frozen = [n for n, p in method.named_parameters() if id(p) not in trained_ids]
    assert all(not p.requires_grad for n, p in method.named_parameters() if n in frozen)
    # export: canonical keys, loadable into the fine-tuning detector, every exported group loaded
    state = method.export()
    assert "conv1.weight" in state and not any(k.startswith("fc.") for k in state)
    det_cfg = finetune_config(scale="micro", schedule="1x", parent=None)["detector"]   # the tables' Mask R-CNN
    det_cls = get_detector(det_cfg["name"])
    det = build_detector(det_cfg, num_classes=9)
    top = {n for n, _ in det.named_children()}
    exported = {det_cls.key_group(k if k.split(".", 1)[0] in top else det_cls.detector_key(k) or "") for k in state}
    report = load_pretrained(det, state, det_cls, require=tuple(sorted(exported - {"other"})), source=name)
    for g in exported:
        r = report.groups[g]
        assert r.loaded and not r.unexpected and not r.mismatched, f"{name}: {g}: {r}"
        assert g == "other" or not r.missing, f"{name}: {g}: {r}"
    if "other" in exported:   # whole-detector exports (AlignDet): the final classifiers are re-initialised
        missing = report.groups["other"].missing
        assert any(k.startswith("roi_heads.box_predictor.") for k in missing), missing
        assert not any(k.startswith("rpn.") for k in missing), missing
