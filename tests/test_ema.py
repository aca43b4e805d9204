"""methods.ema: the target-network update and BYOL's cosine momentum schedule."""
import pytest
import torch

from methods.ema import cosine_schedule, momentum_copy, update_momentum


def test_cosine_schedule_endpoints_and_midpoint():
    assert cosine_schedule(0.0, 0.99) == pytest.approx(0.99)
    assert cosine_schedule(0.5, 0.99) == pytest.approx(0.995)
    assert cosine_schedule(1.0, 0.99) == pytest.approx(1.0)
    assert cosine_schedule(2.0, 0.99) == pytest.approx(1.0)       # clamped
    assert cosine_schedule(0.5, 0.996, end=0.998) == pytest.approx(0.997)


def test_update_momentum_is_an_ema_of_parameters_not_buffers():
    online = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        online[0].weight.fill_(0.0)
    target = momentum_copy(online)
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online[0].weight.fill_(1.0)
        online[1].running_mean.fill_(5.0)
    update_momentum(online, target, 0.5)
    update_momentum(online, target, 0.5)
    assert target[0].weight.item() == pytest.approx(0.75)       # 0 -> 0.5 -> 0.75
    assert target[1].running_mean.item() == 0.0                 # each network keeps its own BN stats
    assert online[0].weight.item() == 1.0


@pytest.mark.parametrize("method", ["pixpro", "soco"])
def test_byol_style_methods_follow_the_cosine_momentum_schedule(method):
    """PixPro and SoCo: momentum 0.99 -> 1 (cosine over training); the target is an EMA of
    the whole online network (backbone and projector alike) and never trains."""
    from tests.test_pixpro import make as make_pixpro
    from tests.test_soco import make as make_soco
    m = {"pixpro": make_pixpro, "soco": make_soco}[method]()
    for progress, expect in ((0.0, 0.99), (0.5, 0.995), (1.0, 1.0)):
        m.momentum_update(progress)
        assert m.current_momentum == pytest.approx(expect)
    with torch.no_grad():
        for p in m.online.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in m.target.parameters()]
    m.momentum_update(1.0)     # momentum 1: target unchanged
    assert all(torch.equal(a, b) for a, b in zip(t0, m.target.parameters()))
    m.momentum_update(0.0)     # 0.99 t + 0.01 o
    for t, a, o in zip(m.target.parameters(), t0, m.online.parameters()):
        torch.testing.assert_close(t, 0.99 * a + 0.01 * o)
    assert not any(p.requires_grad for p in m.target.parameters())
