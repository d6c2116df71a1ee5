"""Grouped expert GEMMs against the slow loop-over-experts reference; batched prefill attention
against one call per sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelens.model.attention import prefill_attention
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


def test_prefill_attention_groups_lengths_like_one_call_per_sequence():
    gen = torch.Generator().manual_seed(11)
    lengths = [5, 3, 5, 1, 3, 5, 7]
    q = torch.randn(sum(lengths), 8, 16, generator=gen)
    k, v = torch.randn(2, sum(lengths), 2, 16, generator=gen)
    expected, start = [], 0
    for n in lengths:  # the plain definition: each sequence alone, KV heads repeated
        qs = q[start:start + n].transpose(0, 1)
        ks, vs = (t[start:start + n].transpose(0, 1).repeat_interleave(4, 0) for t in (k, v))
        expected.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                       scale=0.3).transpose(0, 1))
        start += n
    got = prefill_attention(q, k, v, lengths, 0.3)
    assert torch.allclose(got, torch.cat(expected), atol=1e-6)
