"""SwAV (methods/swav.py): the Sinkhorn codes against the paper's pseudo-code and their
marginals, the swapped prediction loss by hand, the prototypes kept on the unit sphere and
frozen for the first iterations, multi-crop views batched per resolution, the queue, the
Sinkhorn over the global batch on two processes, the export."""
from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import methods.swav  # noqa: F401  (registers "swav")
from methods import build_method
from methods.config import ConfigError
from methods.geometry import multi_crop_views
from methods.losses import sinkhorn, swapped_prediction
from tests import inputs

TINY = {"backbone": "resnet18", "crop_sizes": [32, 16], "num_prototypes": 10, "dim": 8, "hidden_dim": 16}


def _paper_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """SwAV Appendix A.1 pseudo-code (the official first release's loop with u, r, c)."""
    Q = np.exp(scores / eps).T
    Q /= Q.sum()
    K, B = Q.shape
    r, c = np.ones(K) / K, np.ones(B) / B
    for _ in range(iters):
        u = Q.sum(1)
        Q *= (r / u)[:, None]
        Q *= (c / Q.sum(0))[None, :]
    return (Q / Q.sum(0, keepdims=True)).T


def _scores(n=12, k=5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(k, 8, generator=g, dtype=torch.float64), dim=1)
    return z @ c.t()


# -- Sinkhorn -------------------------------------------------------------------------------
def test_sinkhorn_is_the_papers_algorithm_and_each_code_sums_to_one():
    s = _scores()
    q = sinkhorn(s, epsilon=0.05, iterations=3)
    ref = _paper_sinkhorn(s.numpy(), 0.05, 3)
    assert q.shape == (12, 5) and q.dtype == torch.float32
    assert np.allclose(q.numpy(), ref, atol=1e-5)
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-6)        # a distribution per sample
    # after 3 iterations the prototypes' shares are near, and at convergence equal to, B / K
    per_proto = q.sum(0)
    assert (per_proto - 12 / 5).abs().max() < (sinkhorn(s, 0.05, 0).sum(0) - 12 / 5).abs().max()
    assert torch.allclose(sinkhorn(s, 0.05, 500).sum(0), torch.full((5,), 12 / 5), atol=1e-3)


def test_sinkhorn_is_shift_invariant_and_excludes_weight_zero_samples():
    s = _scores()
    assert torch.allclose(sinkhorn(s + 3.0), sinkhorn(s), atol=1e-6)   # the max shift changes nothing
    w = torch.tensor([0.0] * 4 + [1.0] * 8)
    q = sinkhorn(s, 0.05, 3, weight=w)
    assert torch.equal(q[:4], torch.zeros(4, 5))
    assert torch.allclose(q[4:], sinkhorn(s[4:], 0.05, 3), atol=1e-6)   # the problem of the other 8 alone


# -- the swapped prediction loss ----------------------------------------------------------
def test_swapped_prediction_by_hand():
    # 3 crops, B = 1, K = 2; codes of crops 0 and 1
    s = [torch.tensor([[0.2, -0.4]]), torch.tensor([[0.9, 0.1]]), torch.tensor([[-0.3, 0.5]])]
    q0, q1 = torch.tensor([[0.7, 0.3]]), torch.tensor([[0.25, 0.75]])
    t = 0.1

    def logsm(v):
        a, b = v[0] / t, v[1] / t
        m = max(a, b)
        lse = m + math.log(math.exp(a - m) + math.exp(b - m))
        return [a - lse, b - lse]

    lp = [logsm(x[0].tolist()) for x in s]
    ce = lambda q, v: -(q[0] * lp[v][0] + q[1] * lp[v][1])
    want = ((ce([0.7, 0.3], 1) + ce([0.7, 0.3], 2)) / 2 + (ce([0.25, 0.75], 0) + ce([0.25, 0.75], 2)) / 2) / 2
    got = swapped_prediction(s, [(0, q0), (1, q1)], t)
    assert math.isclose(got.item(), want, rel_tol=1e-5)


# -- multi-crop views and their batch ----------------------------------------------------
def test_multi_crop_geometry_counts_sizes_and_scales():
    rng = np.random.default_rng(0)
    groups = multi_crop_views(200, 150, rng, (64, 32), (2, 6), ((0.14, 1.0), (0.05, 0.14)))
    assert [len(g) for g in groups] == [2, 6]
    for grp, size, (lo, hi) in zip(groups, (64, 32), ((0.14, 1.0), (0.05, 0.14))):
        for g in grp:
            x0, y0, x1, y1 = g.crop
            assert g.out_size == (size, size)
            assert lo - 0.02 <= (x1 - x0) * (y1 - y0) / (200 * 150) <= hi + 0.02


def test_collate_batches_each_resolution_crop_major():
    m = build_method("swav", **TINY)
    samples = inputs.samples(m, 3, 48)
    assert [len(samples[0][k]) for k in ("crops_0", "crops_1")] == [2, 6]
    batch = m.collate(samples)
    assert batch["crops_0"].shape == (6, 3, 32, 32) and batch["crops_1"].shape == (18, 3, 16, 16)
    for j in range(6):        # row j * B + b is crop j of sample b
        for b in range(3):
            assert torch.equal(batch["crops_1"][j * 3 + b], samples[b]["crops_1"][j])


def test_backbone_runs_once_per_resolution_and_the_head_once():
    m = build_method("swav", **TINY)
    calls = {"backbone": [], "head": []}
    m.backbone.register_forward_hook(lambda mod, i, o: calls["backbone"].append(tuple(i[0].shape)))
    m.projector.register_forward_hook(lambda mod, i, o: calls["head"].append(tuple(i[0].shape)))
    out = m(m.collate(inputs.samples(m, 4, 48)))
    assert calls["backbone"] == [(8, 3, 32, 32), (24, 3, 16, 16)]
    assert calls["head"] == [(32, 512)]                     # 8 crops x 4 images, BN over all of them
    assert torch.isfinite(out["loss"])


def test_device_loader_batch_matches_the_cpu_batch_shapes(tmp_path):
    from benchmark.data.images import ImageSource, render_deferred
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    src = ImageSource.from_folder(tmp_path)
    m = build_method("swav", **TINY)
    got = {}
    for loader in ("cpu", "device"):
        src.loader = loader
        batch = m.collate([m.views(src.record(i), np.random.default_rng(i)) for i in range(2)])
        got[loader] = render_deferred(batch, "cpu")
    for k in ("crops_0", "crops_1"):
        assert got["device"][k].shape == got["cpu"][k].shape
        assert (got["device"][k] - got["cpu"][k]).abs().mean() < 0.1   # same crops and colours, other resampling


# -- prototypes -----------------------------------------------------------------------------
def test_prototypes_stay_normalised_and_are_frozen_for_the_first_iterations():
    torch.manual_seed(0)
    m = build_method("swav", **{**TINY, "freeze_prototypes_progress": 0.5})
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(10), atol=1e-6)   # from the start
    opt = torch.optim.SGD(m.param_groups()[0]["params"], lr=0.5, momentum=0.9, weight_decay=1e-2)
    batch = m.collate(inputs.samples(m, 4, 48))
    start = m.prototypes.weight.detach().clone()
    for step, progress in enumerate((0.25, 0.5, 0.75)):    # the step after progress p runs at p
        loss = m(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        g = m.prototypes.weight.grad
        if step == 0:   # progress 0 < 0.5: frozen, every other parameter trains
            assert torch.equal(g, torch.zeros_like(g))
            assert m.backbone.conv1.weight.grad.abs().sum() > 0
        else:           # progress 0.25 < 0.5 still frozen; then 0.5: free
            assert (g.abs().sum() > 0) == (step == 2)
        opt.step()
        m.momentum_update(progress)
        assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(10), atol=1e-6)
        if step < 2:    # weight decay and momentum only shrink them: back on the sphere, unchanged
            assert torch.allclose(m.prototypes.weight, start, atol=1e-6)
    assert not torch.allclose(m.prototypes.weight, start, atol=1e-3)


# -- the queue --------------------------------------------------------------------------------
def test_queue_fills_from_its_start_newest_first_and_counts_once_full():
    torch.manual_seed(0)
    m = build_method("swav", **{**TINY, "queue_length": 8, "queue_start_progress": 0.3})
    m.train()
    batches = [m.collate(inputs.samples(m, 4, 48, seed=s)) for s in range(4)]
    out = m(batches[0])                                      # progress 0: before the start
    assert m.queue_count.item() == 0 and torch.equal(m.queue, torch.zeros_like(m.queue))
    assert out["queue_in_use"].item() == 0
    m.momentum_update(0.3)
    m(batches[1])
    assert m.queue_count.item() == 4 and m.queue[:, 4:].abs().sum() == 0
    m.momentum_update(0.4)
    with torch.no_grad():     # what the step enqueues: the crops' embeddings, crop 0 in queue 0
        z = m.embed([batches[2]["crops_0"], batches[2]["crops_1"]])
    out = m(batches[2])
    assert m.queue_count.item() == 8 and out["queue_in_use"].item() == 0   # full only after this step
    assert torch.allclose(m.queue[0, :4], z[:4], atol=1e-5) and torch.allclose(m.queue[1, :4], z[4:8], atol=1e-5)
    assert torch.allclose(m.queue[0, 4:].norm(dim=1), torch.ones(4), atol=1e-5)
    assert m(batches[3])["queue_in_use"].item() == 1


def test_queue_length_must_be_a_multiple_of_the_global_batch():
    m = build_method("swav", **{**TINY, "queue_length": 20})
    m.check_split(10)
    with pytest.raises(ConfigError, match="method.queue_length: expected a multiple of the global batch 8"):
        m.check_split(8)


@pytest.mark.parametrize("bad", [{"crop_sizes": [32]}, {"max_scale_crops": [1.0, 0.01]},
                                 {"crops_for_assign": [0, 8]}, {"num_crops": [1]}])
def test_inconsistent_multi_crop_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        methods.swav.SwAV.Config.from_dict({**TINY, **bad})


# -- the Sinkhorn and the queue over the global batch ----------------------------------------
QUEUED = {**TINY, "queue_length": 8, "queue_start_progress": 0.0}


def _steps(m, batches) -> list[float]:
    """Three forwards at progress 0.1: the queue of 8 fills with the 2 x 4 embeddings of the
    first two, the third computes its codes with it."""
    from methods.dist import mean_over_processes
    losses = []
    for b in batches:
        losses.append(mean_over_processes(m(b)["loss"].detach()).item())
        m.momentum_update(0.1)
    return losses


def _batches(rank: int, world: int):
    from methods.sync_bn import convert_sync_batchnorm
    torch.manual_seed(0)
    m = convert_sync_batchnorm(build_method("swav", **QUEUED))
    n = 4 // world
    return m, [m.collate(inputs.samples(m, 4, 48, seed=s)[rank * n:(rank + 1) * n]) for s in range(3)]


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    s, w = _scores(16, 5).float(), torch.tensor([0.0] * 6 + [1.0] * 10)
    n = 16 // world
    mine = slice(rank * n, (rank + 1) * n)
    m, batches = _batches(rank, world)
    losses = _steps(m, batches)
    results.put(inputs.by_value((rank, sinkhorn(s[mine], 0.05, 3), sinkhorn(s[mine], 0.05, 3, weight=w[mine]),
                                 losses, m.queue.clone())))
    dist.destroy_process_group()


def test_two_processes_compute_the_codes_and_the_queue_of_one_process():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {r[0]: r[1:] for r in (inputs.as_tensors(results.get(timeout=180)) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    s, w = _scores(16, 5).float(), torch.tensor([0.0] * 6 + [1.0] * 10)
    assert torch.allclose(torch.cat([got[0][0], got[1][0]]), sinkhorn(s, 0.05, 3), atol=1e-6)
    assert torch.allclose(torch.cat([got[0][1], got[1][1]]), sinkhorn(s, 0.05, 3, weight=w), atol=1e-6)
    m, batches = _batches(0, 1)
    losses = _steps(m, batches)
    for r in (0, 1):   # the global queue on every process, the loss of the global batch
        assert torch.allclose(got[r][3], m.queue, atol=1e-5)
        assert np.allclose(got[r][2], losses, rtol=1e-4), (got[r][2], losses)
    assert m.queue_count.item() == 8 and losses[2] != losses[1]


# -- export ---------------------------------------------------------------------------------
def test_export_is_the_backbone_in_torchvision_names():
    import torchvision
    m = build_method("swav", **TINY)
    state = m.export()
    assert "conv1.weight" in state and not any(k.startswith(("fc.", "projector", "prototypes")) for k in state)
    ref = torchvision.models.resnet18(weights=None)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
