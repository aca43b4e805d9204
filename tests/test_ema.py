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
