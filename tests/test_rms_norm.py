"""The fused CPU RMSNorm (csrc/rms_norm.cpp) against the torch ops it replaces and HF's module."""

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

from moelens import panel_gemm
from moelens.model.stages import rms_norm, rms_norm_torch

pytestmark = pytest.mark.skipif(not panel_gemm.is_supported(), reason="no panel kernels here")


def _ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 steps between same-sign values (the bit patterns as integers)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


# rows and widths around the 8- and 16-lane loops and their scalar tails
@pytest.mark.parametrize("shape", [(1, 8), (3, 1024), (5, 1000), (2, 7, 64), (40, 3), (0, 16)])
def test_fused_matches_torch_ops(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen) * 3
    w = torch.randn(shape[-1], generator=gen)
    got, want = panel_gemm.rms_norm(x, w, 1e-5), rms_norm_torch(x, w, 1e-5)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)  # the sum's order only
    xb, wb = x.bfloat16(), w.bfloat16()
    got, want = panel_gemm.rms_norm(xb, wb, 1e-5), rms_norm_torch(xb, wb, 1e-5)
    assert got.dtype == torch.bfloat16
    # same roundings; r may differ by an fp32 ulp, which moves a product across a bf16 tie
    # at most rarely and by one step
    steps = _ulps_bf16(got, want)
    if steps.numel():
        assert steps.max().item() <= 1 and (steps > 0).float().mean().item() <= 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stages_norm_matches_hf_module(dtype):
    """What the model runs (fused on this CPU) against transformers' own RMSNorm."""
    gen = torch.Generator().manual_seed(0)
    hf = MixtralRMSNorm(256, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(256, generator=gen) + 0.5)
    hf = hf.to(dtype)
    x = (torch.randn(33, 256, generator=gen) * 2).to(dtype)
    with torch.no_grad():
        want = hf(x)
    got = rms_norm(x, hf.weight.detach(), 1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:
        assert _ulps_bf16(got, want).max().item() <= 1


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="one dtype"):
        panel_gemm.rms_norm(torch.ones(2, 4), torch.ones(4, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        panel_gemm.rms_norm(torch.ones(2, 4), torch.ones(3), 1e-5)
