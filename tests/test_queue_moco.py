import numpy as np
import pytest
import torch

import methods
from methods.queues import MemoryQueue


def test_queue_fifo_wraps():
    q = MemoryQueue(dim=2, size=3)
    q.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert int(q.ptr) == 2
    q.enqueue(torch.tensor([[0.0, 2.0], [3.0, 0.0]]))      # wraps: slot 2 then slot 0
    assert int(q.ptr) == 1
    assert torch.allclose(q.keys[2], torch.tensor([0.0, 1.0]))
    assert torch.allclose(q.keys[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(q.keys[1], torch.tensor([0.0, 1.0]))


def test_registry_unknown_method_and_key():
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        methods.build_method("nope")
    with pytest.raises(ValueError, match="method.queue_sise"):
        methods.build_method("moco_v2", queue_sise=3)
    with pytest.raises(ValueError, match="method.queue_size: expected an integer"):
        methods.build_method("moco_v2", queue_size="big")


@pytest.fixture(scope="module")
def moco():
    torch.manual_seed(0)
    return methods.build_method("moco_v2", backbone="resnet18", queue_size=64, crop_size=32, momentum=0.9)


def test_moco_defaults_are_the_papers():
    cfg = methods.get_method("moco_v2").Config()
    assert (cfg.queue_size, cfg.temperature, cfg.momentum, cfg.dim) == (65536, 0.2, 0.999, 128)
    m = methods.build_method("moco_v2", queue_size=16)
    assert [l.out_features for l in m.proj_q if isinstance(l, torch.nn.Linear)] == [2048, 128]


def test_moco_views_and_step(moco):
    rec = {"image": (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)}
    samples = [moco.views(rec, np.random.default_rng(i)) for i in range(4)]
    again = moco.views(rec, np.random.default_rng(0))
    assert torch.equal(samples[0]["im_q"], again["im_q"])           # views are a function of rng
    batch = moco.collate(samples)
    assert batch["im_q"].shape == (4, 3, 32, 32)
    ptr = int(moco.queue.ptr)
    out = moco(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert int(moco.queue.ptr) == (ptr + 4) % 64
    out["loss"].backward()
    assert all(p.grad is None for p in moco.encoder_k.parameters())


def test_moco_momentum_update_moves_key_encoder(moco):
    pq = next(moco.encoder_q.parameters())
    pk = next(moco.encoder_k.parameters())
    with torch.no_grad():
        pq.add_(1.0)
    before = pk.detach().clone()
    moco.momentum_update(0.5)
    assert torch.allclose(pk, 0.9 * before + 0.1 * pq.detach())


def test_moco_export_is_torchvision_resnet(moco):
    import torchvision
    sd = moco.export()
    ref = torchvision.models.resnet18(weights=None).state_dict()
    assert set(sd) == {k for k in ref if not k.startswith("fc.")}
