"""The panel-kernel causal prefill attention (moelens.panel_gemm.causal_attention) against torch's
SDPA run one prompt at a time, and its input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelens import panel_gemm

pytestmark = pytest.mark.skipif(not panel_gemm.is_supported(),
                                reason="panel kernels need x86-64 with AVX2 and FMA")


def _sdpa_per_prompt(q, k, v, lengths, scale):
    """Each prompt alone through torch's SDPA, its KV heads repeated for their query heads."""
    group = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lengths:
        qs = q[start:start + n].transpose(0, 1).double()  # [Hq, n, D]
        ks, vs = (t[start:start + n].transpose(0, 1).repeat_interleave(group, 0).double()
                  for t in (k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                  scale=scale).transpose(0, 1))
        start += n
    return torch.cat(out).float()


# lengths around the 6-key and 16-row blocks; GQA 1/4/8; head dims from the issue (64, 128 and
# odd 80, 96) plus one that is not a multiple of 8
@pytest.mark.parametrize("lengths", [[1], [5, 6, 7], [16, 17, 1, 33], [130, 3, 64]])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (16, 2)])
@pytest.mark.parametrize("dim", [64, 80, 96, 128, 36])
def test_matches_sdpa_per_prompt(lengths, heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(sum(lengths) * 31 + heads * 7 + dim)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, generator=gen)
    k, v = torch.randn(2, total, kv_heads, dim, generator=gen)
    got = panel_gemm.causal_attention(q, k, v, lengths, dim ** -0.5)
    torch.testing.assert_close(got, _sdpa_per_prompt(q, k, v, lengths, dim ** -0.5),
                               atol=1e-5, rtol=1e-5)


def test_large_scores_and_threads_agree():
    """Scores far from 0 (the row max is subtracted) and 1 vs 2 threads give the same output."""
    gen = torch.Generator().manual_seed(3)
    lengths = [200, 41]
    q = torch.randn(241, 8, 64, generator=gen) * 8
    k, v = torch.randn(2, 241, 2, 64, generator=gen)
    want = _sdpa_per_prompt(q, k, v, lengths, 0.125)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = panel_gemm.causal_attention(q, k, v, lengths, 0.125)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_strided_inputs_are_read_correctly():
    """q, k, v as column slices of one fused projection output (what a QKV GEMM gives)."""
    gen = torch.Generator().manual_seed(5)
    fused = torch.randn(40, (8 + 2 + 2) * 64, generator=gen)
    q = fused[:, :512].view(40, 8, 64)
    k = fused[:, 512:640].view(40, 2, 64)
    v = fused[:, 640:].view(40, 2, 64)
    got = panel_gemm.causal_attention(q, k, v, [25, 15], 0.125)
    torch.testing.assert_close(got, _sdpa_per_prompt(q, k, v, [25, 15], 0.125),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v, n: (q, k, v, [5, 4]), "sum to 9"),
    (lambda q, k, v, n: (q, k, v, [10, 0]), r"seq_lens\[1\] = 0"),
    (lambda q, k, v, n: (q.double(), k, v, n), "float32"),
    (lambda q, k, v, n: (q, k[:, :, :8], v[:, :, :8], n), "k and v must be"),
    (lambda q, k, v, n: (q, k[:, :1].expand(10, 3, 16), v[:, :1].expand(10, 3, 16), n),
     "not a multiple of 3 KV heads"),
    (lambda q, k, v, n: (q, k, v[:9], n), "k and v must be"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    q, k, v = torch.randn(10, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match=message):
        panel_gemm.causal_attention(*change(q, k, v, [10]), 0.25)
