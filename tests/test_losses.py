"""Loss functions against values computed by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from methods.losses import (byol_regression, dense_correspondence, dense_info_nce, grouped_info_nce, info_nce,
                            masked_cosine_regression)


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


# -- DenseCL's dense pieces ------------------------------------------------------------------
def test_correspondence_is_the_one_way_cosine_argmax():
    torch.manual_seed(0)
    base = F.normalize(torch.randn(2, 8, 5), dim=1)          # 5 well-separated key directions
    perm = torch.tensor([[3, 0, 4, 1, 2], [1, 2, 0, 4, 3]])
    f_k = base * torch.tensor([0.5, 3.0, 1.0, 7.0, 0.2])    # norms vary: cosine, not dot product
    f_q = torch.stack([base[n][:, perm[n]] for n in range(2)]) * 2.0 + 0.01 * torch.randn(2, 8, 5)
    f_q = torch.cat([f_q, f_q[:, :, :1] + 0.02 * torch.randn(2, 8, 1)], 2)   # a 6th query near the 1st
    match = dense_correspondence(f_q, f_k)
    assert match.shape == (2, 6) and match.dtype == torch.long
    want = torch.cat([perm, perm[:, :1]], 1)                  # two queries share key perm[:, 0]: no mutual check
    assert torch.equal(match, want)
    # the dot product would pick the large-norm key 3 for some query: the norms mattered
    dot = torch.einsum("nci,ncj->nij", f_q, f_k).argmax(2)
    assert not torch.equal(dot, want)
    # a query row whose best match differs per image (the match is per image, not over the batch)
    assert not torch.equal(match[0], match[1])


def test_dense_loss_by_hand():
    torch.manual_seed(1)
    N, D, L, K, t = 2, 3, 2, 3, 0.2
    q, k = torch.randn(N, D, L, dtype=torch.float64), torch.randn(N, D, L, dtype=torch.float64)
    queue = torch.randn(K, D, dtype=torch.float64)
    match = torch.tensor([[1, 1], [0, 1]])
    loss, logits = dense_info_nce(q, k, match, queue, t)
    unit = lambda v: v / math.sqrt(float((v * v).sum()))
    rows = []
    for n in range(N):
        for i in range(L):
            qi = unit(q[n, :, i])
            pos = float(qi @ unit(k[n, :, match[n, i]])) / t
            negs = [float(qi @ unit(queue[j])) / t for j in range(K)]
            rows.append(-pos + math.log(math.exp(pos) + sum(math.exp(x) for x in negs)))
    assert logits.shape == (N * L, 1 + K)
    assert float(loss) == pytest.approx(sum(rows) / len(rows), rel=1e-10)
    # the match is what picks the positive
    other, _ = dense_info_nce(q, k, torch.tensor([[0, 0], [1, 0]]), queue, t)
    assert abs(float(other) - float(loss)) > 1e-3
    # gradients reach the queries only
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    dense_info_nce(qg, kg, match, queue, t)[0].backward()
    assert qg.grad.abs().sum() > 0 and kg.grad is None
