"""Grouped expert GEMMs against the slow loop-over-experts reference."""

from __future__ import annotations

import pytest
import torch

from moelens.model.moe import (Routing, gather_experts_per_token, grouped_experts,
                               loop_experts_reference, route)


def _weights(e, h, i, gen):
    return (torch.randn(e, 2 * i, h, generator=gen) * 0.2, torch.randn(e, h, i, generator=gen) * 0.2)


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("experts,top_k", [(4, 1), (8, 2), (16, 4)])
def test_grouped_matches_loop(tokens, experts, top_k):
    gen = torch.Generator().manual_seed(tokens * 100 + experts)
    x = torch.randn(tokens, 32, generator=gen)
    gate_up, down = _weights(experts, 32, 24, gen)
    routing = route(x, torch.randn(experts, 32, generator=gen), top_k, renormalize=True)
    expected = loop_experts_reference(x, routing, gate_up, down)
    assert torch.allclose(grouped_experts(x, routing, gate_up, down), expected, atol=1e-5, rtol=0)
    assert torch.allclose(gather_experts_per_token(x, routing, gate_up, down), expected, atol=1e-5)


def test_skewed_routing_with_idle_experts():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 16, generator=gen)
    gate_up, down = _weights(8, 16, 8, gen)
    # every token picks experts 5 and 2; experts 0,1,3,4,6,7 get nothing
    experts = torch.tensor([[5, 2]] * 39 + [[2, 5]])
    routing = Routing(weights=torch.rand(40, 2, generator=gen), experts=experts)
    expected = loop_experts_reference(x, routing, gate_up, down)
    assert torch.allclose(grouped_experts(x, routing, gate_up, down), expected, atol=1e-5, rtol=0)


def test_route_renormalisation():
    x = torch.randn(5, 8)
    router = torch.randn(4, 8)
    assert torch.allclose(route(x, router, 2, True).weights.sum(-1), torch.ones(5))
    probs = torch.softmax(x @ router.T, -1)
    assert torch.allclose(route(x, router, 2, False).weights, probs.topk(2).values)
