"""async_sl's pure logic: the staleness functions s(tau) of algorithms.md 10 and option checks."""

from __future__ import annotations

import pytest
import torch

from nodes.schemes import get_scheme
from nodes.schemes.async_sl import staleness_weight, step_with_scale


def test_staleness_functions():
    assert [staleness_weight(t, "constant", 0.5, 4) for t in (0, 9)] == [1.0, 1.0]
    assert staleness_weight(3, "polynomial", 0.5, 4) == pytest.approx(0.5)  # (1+3)^-0.5
    assert staleness_weight(4, "hinge", 2.0, 4) == 1.0
    assert staleness_weight(6, "hinge", 2.0, 4) == pytest.approx(1 / 5)  # 1/(2*(6-4)+1)
    ws = [staleness_weight(t, "polynomial", 1.0, 0) for t in range(5)]
    assert ws == sorted(ws, reverse=True)


def test_step_with_scale_scales_the_step_and_restores_lr():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.5)
    p.grad = torch.ones(3)
    step_with_scale([opt], 0.2)
    assert torch.allclose(p.detach(), torch.full((3,), 0.9)) and opt.param_groups[0]["lr"] == 0.5


def test_options_are_checked():
    with pytest.raises(ValueError, match="staleness_policy"):
        get_scheme("async_sl", staleness_policy="sometimes")
    with pytest.raises(ValueError, match="u_shaped"):
        get_scheme("async_sl", u_shaped=True)
    s = get_scheme("async_sl", client_mix="fedasync_mix")
    roles = {"client": ["c1", "c2"], "server": ["srv"]}
    assert s.placement(3, roles)["srv"] == [0, 1, 2]  # the global W_c lives on the server
    assert get_scheme("async_sl").placement(3, roles)["srv"] == [1, 2]
    with pytest.raises(ValueError, match="chain"):
        s.chain_placement(3, {**roles, "edge": ["e1"]}, ["edge"])
