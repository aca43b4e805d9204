"""Loss functions against values computed by hand."""
import math

import pytest
import torch

from methods.losses import byol_regression, grouped_info_nce, info_nce, masked_cosine_regression


def test_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    loss, logits = info_nce(q, k, queue, temperature=0.5)
    # logits = [1, 0, -1] / 0.5 = [2, 0, -2]; loss = -log(e^2 / (e^2 + 1 + e^-2))
    expect = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert torch.allclose(logits, torch.tensor([[2.0, 0.0, -2.0]]))
    assert loss.item() == pytest.approx(expect, rel=1e-6)


def test_info_nce_normalises_and_stops_key_gradient():
    q = torch.tensor([[3.0, 4.0]], requires_grad=True)
    k = torch.tensor([[6.0, 8.0]], requires_grad=True)
    loss, logits = info_nce(q, k, torch.tensor([[0.0, 1.0]]), 1.0)
    assert logits[0, 0].item() == pytest.approx(1.0)      # cos of parallel vectors
    assert logits[0, 1].item() == pytest.approx(0.8)      # (3,4)/5 . (0,1)
    loss.backward()
    assert k.grad is None and q.grad is not None


def test_info_nce_in_batch_negatives():
    q = torch.eye(3)
    loss, logits = info_nce(q, q.clone(), None, 1.0)
    assert logits.shape == (3, 3)
    expect = -math.log(math.e / (math.e + 2))
    assert loss.item() == pytest.approx(expect, rel=1e-6)


def test_byol_regression_values():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # rows: cos 1 -> 0 ; cos 0 -> 2 ; mean 1
    assert byol_regression(p, z).item() == pytest.approx(1.0)
    assert byol_regression(p, -p).item() == pytest.approx(4.0)


def test_grouped_info_nce_two_instances():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([0, 0, 1])
    loss = grouped_info_nce(q, q.clone(), g, 1.0)
    # row 0: logits [1,1,0], positives {0,1}: -log(e/(2e+1)) each
    r01 = -math.log(math.e / (2 * math.e + 1))
    r2 = -math.log(math.e / (math.e + 2))
    assert loss.item() == pytest.approx((2 * r01 + r2) / 3, rel=1e-6)


def test_masked_cosine_regression():
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])          # N=1, C=2, Li=2 (columns are pixels)
    z = torch.tensor([[[1.0], [0.0]]])                     # Lj=1, pixel (1, 0)
    match = torch.tensor([[[1.0], [1.0]]])
    # pixel 0 of p is (1,0): cos 1; pixel 1 is (0,1): cos 0 -> mean -0.5
    assert masked_cosine_regression(p, z, match).item() == pytest.approx(-0.5)
    assert masked_cosine_regression(p, z, torch.zeros_like(match)).item() == 0.0


def test_byol_regression_weighted_rows():
    # the weighted form is the mean over the kept rows, and 0 (with a zero gradient) when none is kept
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    keep = torch.tensor([True, False, True])
    assert byol_regression(p, z, keep).item() == pytest.approx((0.0 + 4.0) / 2)
    assert byol_regression(p, z, keep).item() == pytest.approx(byol_regression(p[keep], z[keep]).item())
    none = byol_regression(p, z, torch.zeros(3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and p.grad.abs().sum() == 0
