"""Sampler semantics: greedy, top-k/top-p masks, seeded reproducibility independent of the batch."""

from __future__ import annotations

import pytest
import torch

from moelens import panel_gemm
from moelens.model.sampling import sample
from moelens.sampling import RowSampling, SamplingParams


def _row(seed=0, step=0, **kw):
    return RowSampling(params=SamplingParams(**kw), seed=seed, step=step)


def test_greedy_and_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    out = sample(logits.clone(), [_row(temperature=0, logprobs=2), _row(temperature=0)])
    assert out.token_ids.tolist() == [1, 0]
    assert torch.allclose(out.logprobs, torch.log_softmax(logits, -1).max(-1).values)
    assert out.top_ids.shape == (2, 2) and out.top_ids[0].tolist() == [1, 2]


def test_seed_reproducible_and_batch_independent():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen)
    alone = sample(logits[1:2].clone(), [_row(seed=7, step=4)]).token_ids[0]
    batched = sample(logits.clone(), [_row(seed=1), _row(seed=7, step=4), _row(seed=2)])
    assert batched.token_ids[1] == alone


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]])
    seen_k = {int(sample(logits.clone(), [_row(seed=s, top_k=2)]).token_ids[0]) for s in range(200)}
    assert seen_k == {0, 1}
    # p(0)=0.72, p(1)=0.26: top_p=0.5 keeps token 0 only, 0.9 keeps 0 and 1
    seen_p = {int(sample(logits.clone(), [_row(seed=s, top_p=0.5)]).token_ids[0]) for s in range(100)}
    assert seen_p == {0}
    seen_p = {int(sample(logits.clone(), [_row(seed=s, top_p=0.9)]).token_ids[0]) for s in range(300)}
    assert seen_p == {0, 1}


def test_suppressed_tokens_never_chosen():
    logits = torch.tensor([[9.0, 0.0, 0.0]])
    row = RowSampling(params=SamplingParams(temperature=0), seed=0, step=0, suppress_token_ids=(0,))
    assert sample(logits, [row]).token_ids[0] != 0


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2),
                                         ("max_tokens", 0), ("logprobs", 50)])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.skipif(not panel_gemm.is_supported(), reason="needs x86-64 with AVX2 and FMA")
@pytest.mark.parametrize("vocab", [1, 7, 8, 16, 23, 32000, 50257])
def test_fused_argmax_logsumexp_matches_torch(vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=gen) * 6
    logits[1] = 0.5  # a row of ties: the first index wins, as in torch.argmax
    logits[2, ::3] = float("-inf")  # masked (suppressed) tokens
    logits[3] = float("-inf")  # every token masked
    logits[4, vocab // 2:] = 40.0  # ties at the maximum past the first lane block
    chosen, lse = panel_gemm.argmax_logsumexp(logits)
    assert chosen.tolist() == torch.argmax(logits, -1).tolist()
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-6)


@pytest.mark.skipif(not panel_gemm.is_supported(), reason="needs x86-64 with AVX2 and FMA")
def test_fused_argmax_logsumexp_rejects_bad_input():
    with pytest.raises(ValueError, match="float32"):
        panel_gemm.argmax_logsumexp(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="no columns"):
        panel_gemm.argmax_logsumexp(torch.zeros(2, 0))
