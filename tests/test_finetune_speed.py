"""The faster CPU fine-tuning step trains the same numbers: the vectorised RoIAlign backward
gives torchvision's gradient bit for bit, and a few Mask R-CNN steps at the tiny config end
with the very weights of torchvision's pooler (a rounding difference would grow, at lr 0.02,
into a different run within ten steps: nothing but bit equality keeps a run's results)."""
from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align as tv_roi_align

from benchmark.experiments.config import finetune_config
from benchmark.detectors import detector_config
from benchmark.detectors.rcnn import RoIPooler, roi_align, roi_align_grad_input


def _rois(n_img: int, n: int, side: float, g: torch.Generator) -> torch.Tensor:
    """Boxes of every kind the kernel branches on: inside, over the border, far outside,
    smaller than a pixel."""
    xy = torch.rand(n, 2, generator=g) * side * 1.4 - side * 0.3
    wh = torch.rand(n, 2, generator=g) * side * 0.6
    wh[: n // 4] *= 0.01
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[-1] = torch.tensor([-5 * side, -5 * side, -4 * side, -4 * side])
    return torch.cat([torch.randint(0, n_img, (n, 1), generator=g).float(), boxes], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_roi_align_backward_is_torchvisions_bit_for_bit(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(sampling_ratio)
    feat = torch.randn(3, 5, 13, 11, generator=g, requires_grad=True)
    rois = _rois(3, 40, 48, g)
    ref_out = tv_roi_align(feat, rois, (4, 3), spatial_scale=0.25, sampling_ratio=sampling_ratio, aligned=aligned)
    out = roi_align(feat, rois, (4, 3), 0.25, sampling_ratio, aligned)
    assert torch.equal(out, ref_out)
    grad = torch.randn(out.shape, generator=g)
    ref, = torch.autograd.grad(ref_out, feat, grad)
    got, = torch.autograd.grad(out, feat, grad)
    assert torch.equal(got, ref)
    assert ref.abs().sum() > 0
    # in chunks of a few bins (the order of the additions stays the kernel's)
    assert torch.equal(roi_align_grad_input(grad, rois, feat.shape, 0.25, sampling_ratio, aligned, max_elements=50), ref)


def test_roi_align_backward_of_no_rois_is_zero():
    feat = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = roi_align(feat, torch.zeros(0, 5), (7, 7), 0.5, 2, False)
    got, = torch.autograd.grad(out.sum(), feat)
    assert out.shape == (0, 4, 7, 7) and torch.equal(got, torch.zeros_like(feat))


def test_pooler_matches_torchvisions_multiscale_roi_align_with_gradients():
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(2, 4, s, s, generator=g, requires_grad=True) for k, s in (("0", 32), ("1", 16), ("2", 8))}
    boxes = [_rois(1, 12, 128, g)[:, 1:].clamp(0, 127) for _ in range(2)]
    boxes = [torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2] + 1)], 1) for b in boxes]
    ours = RoIPooler(["0", "1", "2"], 7, 2)(x, boxes, [(128, 128)] * 2)
    ref = MultiScaleRoIAlign(["0", "1", "2"], 7, 2)(x, boxes, [(128, 128)] * 2)
    assert torch.equal(ours, ref)
    grad = torch.randn(ours.shape, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(ours, list(x.values()), grad),
                                                 torch.autograd.grad(ref, list(x.values()), grad)))


def test_tiny_mask_rcnn_steps_train_the_numbers_of_torchvisions_pooler(monkeypatch):
    """Two SGD steps of the tiny Mask R-CNN: the same losses and weights, bit for bit, as with
    torchvision's RoIAlign."""
    from tools.bench.detector_bench import synthetic_batch
    import benchmark.detectors.rcnn as rcnn
    cfg = finetune_config(scale="tiny", parent=None)
    det, det_cfg = detector_config(cfg["detector"])
    recipe = det.Recipe.from_dict(cfg["recipe"])
    torch.manual_seed(0)
    model = det.build(det_cfg, 5).train()
    images, targets = synthetic_batch(2, 96, 5)

    def train(m, opt):
        losses = []
        for step in range(2):
            torch.manual_seed(step)
            loss = sum(m(images, targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses), m.state_dict()

    fast = copy.deepcopy(model)
    fast_losses, fast_state = train(fast, det.optimizer(fast, recipe))
    monkeypatch.setattr(rcnn, "roi_align", lambda f, r, o, s, sr, al: tv_roi_align(
        f, r, o, spatial_scale=s, sampling_ratio=sr, aligned=al))
    slow = copy.deepcopy(model)
    slow_losses, slow_state = train(slow, det.optimizer(slow, recipe))
    assert torch.equal(fast_losses, slow_losses)
    assert [k for k, v in slow_state.items() if not torch.equal(fast_state[k], v)] == []
    assert not torch.equal(fast_state["roi_heads.box_head.0.0.weight"], model.state_dict()["roi_heads.box_head.0.0.weight"])
