"""The attention_cpu C++ kernel against torch SDPA on gathered KV, on every ISA path this CPU runs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from moelens import native
from moelens.kv_cache import pool_shapes
from moelens.model import attention as reference
from services.attention_cpu import kernel

NATIVE = [b for b in kernel.available_backends() if b != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
# (block_size, num_kv_heads, gqa group, head_dim): blocks of 8 fill half an AVX-512 vector and
# 32 two; 5 and 13 fill no vector evenly; head_dim 100 and 36 are not multiples of the d-split;
# groups 1..16 take every head-tile width (16 is two tiles of 8).
SHAPES = [(16, 2, 1, 64), (8, 1, 4, 128), (32, 2, 8, 80), (16, 2, 4, 96), (8, 2, 3, 100),
          (16, 1, 5, 36), (8, 2, 8, 36), (16, 1, 16, 128), (5, 2, 2, 64), (13, 1, 7, 36)]


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    kernel.force_backend(None)


def sdpa_on_gathered(q, k_pool, v_pool, tables, lens, scale):
    """Ground truth: gather each row's tokens by slot, then torch SDPA with GQA."""
    block_size = v_pool.shape[2]
    out = torch.empty_like(q)
    for r in range(q.shape[0]):
        pos = torch.arange(int(lens[r]))
        blocks = tables[r, pos // block_size].long()
        k = k_pool[blocks, :, :, pos % block_size].float().transpose(0, 1)  # [Hkv, L, D]
        v = v_pool[blocks, :, pos % block_size].float().transpose(0, 1)
        out[r] = F.scaled_dot_product_attention(q[r, :, None], k, v, scale=scale,
                                                enable_gqa=True)[:, 0]
    return out


def make_case(lens, block_size, num_kv_heads, group, head_dim, dtype, spare_columns=2, seed=0):
    """Random pool, q and scattered block tables padded with -1 past each row's blocks."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 3
    k_shape, v_shape = pool_shapes(num_blocks, num_kv_heads, block_size, head_dim)
    k_pool = torch.randn(k_shape, generator=gen).to(dtype)  # [N, Hkv, D, B]
    v_pool = torch.randn(v_shape, generator=gen).to(dtype)  # [N, Hkv, B, D]
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max(needed) + spare_columns), -1, dtype=torch.int32)
    start = 0
    for r, n in enumerate(needed):
        tables[r, :n] = perm[start:start + n].int()
        start += n
    return q, k_pool, v_pool, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_sdpa(backend, dtype, shape):
    block_size, num_kv_heads, group, head_dim = shape
    kernel.force_backend(backend)
    lens = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5, 300, 700]
    case = make_case(lens, block_size, num_kv_heads, group, head_dim, dtype)
    scale = head_dim ** -0.5
    out = kernel.paged_attention(*case, scale, num_threads=2)
    expected = sdpa_on_gathered(*case, scale)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("backend", NATIVE)
def test_split_context_and_thread_counts(backend):
    """One long row is split across threads; results agree for any thread count."""
    kernel.force_backend(backend)
    case = make_case([5000], 16, 1, 8, 128, torch.float16)
    expected = sdpa_on_gathered(*case, 0.1)
    for threads in (1, 2, 3, 8):
        out = kernel.paged_attention(*case, 0.1, num_threads=threads)
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("group", [4, 8])
def test_peaked_scores_are_stable(backend, group):
    """Large logits (one dominant token late in the context) need the running max rescale."""
    kernel.force_backend(backend)
    q, k_pool, v_pool, tables, lens = make_case([257, 1000], 16, 2, group, 64, torch.float32)
    q = q * 30.0
    expected = sdpa_on_gathered(q, k_pool, v_pool, tables, lens, 1.0)
    out = kernel.paged_attention(q, k_pool, v_pool, tables, lens, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [3, 8])
def test_reads_stop_at_pool_end(backend, dtype, group):
    """The last row of the last block is the pool's last bytes (AddressSanitizer runs see overreads)."""
    kernel.force_backend(backend)
    q, k_pool, v_pool, _, _ = make_case([16], 8, 2, group, 36, dtype)
    num_blocks = k_pool.shape[0]
    k_pool, v_pool = k_pool[num_blocks - 2:].clone(), v_pool[num_blocks - 2:].clone()
    tables = torch.tensor([[0, 1]], dtype=torch.int32)
    lens = torch.tensor([16], dtype=torch.int32)
    expected = sdpa_on_gathered(q, k_pool, v_pool, tables, lens, 0.2)
    out = kernel.paged_attention(q, k_pool, v_pool, tables, lens, 0.2)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype], rtol=0)


def test_matches_torch_reference_module():
    case = make_case([40, 3, 129], 16, 2, 4, 128, torch.bfloat16)
    out = kernel.paged_attention(*case, 0.088)
    torch.testing.assert_close(out, reference.paged_attention(*case, 0.088), atol=2e-3, rtol=0)


@pytest.mark.parametrize("backend", NATIVE + ["torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_matches_reference(backend, dtype):
    kernel.force_backend(backend)
    k_shape, v_shape = pool_shapes(6, 2, 8, 80)
    k_pool, v_pool = torch.zeros(k_shape, dtype=dtype), torch.zeros(v_shape, dtype=dtype)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    k, v = torch.randn(10, 2, 80), torch.randn(10, 2, 80)
    slots = torch.randperm(48)[:10]
    kernel.store_kv(k_pool, v_pool, k, v, slots)
    reference.store_kv(k_ref, v_ref, k, v, slots)
    assert torch.equal(k_pool, k_ref) and torch.equal(v_pool, v_ref)


def test_torch_fallback_matches_native():
    case = make_case([5, 77], 16, 2, 2, 64, torch.float16)
    native = kernel.paged_attention(*case, 0.125)
    kernel.force_backend("torch")
    assert not kernel.is_native()
    torch.testing.assert_close(kernel.paged_attention(*case, 0.125), native, atol=2e-3, rtol=0)


def _bad_attention_inputs():
    q, k_pool, v_pool, tables, lens = make_case([20, 33], 16, 2, 2, 64, torch.float32)
    needed_minus_one = tables.clone()
    needed_minus_one[1, 2] = -1
    out_of_pool = tables.clone()
    out_of_pool[0, 1] = k_pool.shape[0]
    narrow_lens = torch.tensor([20, 33 + 16 * 3], dtype=torch.int32)
    return {
        "-1 where a block is needed": ((q, k_pool, v_pool, needed_minus_one, lens), "block_tables"),
        "block past the pool": ((q, k_pool, v_pool, out_of_pool, lens), "not a pool block"),
        "table narrower than context": ((q, k_pool, v_pool, tables, narrow_lens), "columns"),
        "zero context": ((q, k_pool, v_pool, tables, torch.tensor([0, 33]).int()), "positive"),
        "negative context": ((q, k_pool, v_pool, tables, torch.tensor([20, -4]).int()),
                             "positive"),
        "k/v dtype mismatch": ((q, k_pool, v_pool.half(), tables, lens), "dtype"),
        "k pool not transposed": ((q, v_pool, v_pool, tables, lens), "same blocks"),
        "q rank": ((q[0], k_pool, v_pool, tables, lens), "q must be"),
        "pool rank": ((q, k_pool[0], v_pool[0], tables, lens), "k_pool must be"),
        "heads not a multiple": ((q[:, :3], k_pool, v_pool, tables, lens), "multiple"),
        "int64 block tables": ((q, k_pool, v_pool, tables.long(), lens), "int32"),
    }


@pytest.mark.parametrize("name", list(_bad_attention_inputs()))
def test_attention_rejects_bad_inputs(name):
    args, message = _bad_attention_inputs()[name]
    with pytest.raises(ValueError, match=message):
        kernel.paged_attention(*args, 0.125)


@pytest.mark.parametrize("slot", [-1, 48])
def test_store_kv_rejects_slot_outside_pool(slot):
    k_pool, v_pool = (torch.zeros(shape) for shape in pool_shapes(6, 2, 8, 16))
    slots = torch.tensor([3, slot])
    with pytest.raises(ValueError, match="outside the pool"):
        kernel.store_kv(k_pool, v_pool, torch.ones(2, 2, 16), torch.ones(2, 2, 16), slots)
    assert not k_pool.any(), "nothing may be written when a slot is bad"


def test_store_kv_rejects_mismatched_shapes():
    k_pool, v_pool = (torch.zeros(shape) for shape in pool_shapes(6, 2, 8, 16))
    with pytest.raises(ValueError, match="num_kv_heads"):
        kernel.store_kv(k_pool, v_pool, torch.ones(2, 3, 16), torch.ones(2, 3, 16),
                        torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dtype"):
        kernel.store_kv(k_pool, v_pool.half(), torch.ones(2, 2, 16), torch.ones(2, 2, 16),
                        torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same blocks"):
        kernel.store_kv(v_pool, v_pool.clone(), torch.ones(2, 2, 16), torch.ones(2, 2, 16),
                        torch.tensor([0, 1]))


def test_backend_selection():
    assert kernel.backend() in ("avx512", "avx2", "scalar", "torch")
    assert kernel.available_backends()[-1] == "torch"
    with pytest.raises(ValueError, match="not available"):
        kernel.force_backend("neon")
    with pytest.raises(ValueError, match="num_threads"):
        kernel.set_num_threads(0)


def test_stream_read_bandwidth_is_measured():
    gbps = kernel.stream_read_gbps(num_bytes=8 << 20, num_threads=2, reps=1)
    assert math.isfinite(gbps) and gbps > 0


def test_unbuildable_extension_falls_back_with_warning(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "paged_attention.cpp").write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(kernel, "CSRC_DIR", csrc)
    monkeypatch.setattr(native.platformdirs, "user_cache_dir", lambda name: str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernel.load_extension.__wrapped__(False) is None
    assert any("falling back" in str(w.message) for w in caught)
