"""Continuous batching through the real services: 256 mixed requests give each request's own
greedy output (HF transformers, one request at a time), with and without preemptions, with the
two-group pipeline on and off."""

from __future__ import annotations

import random

import pytest

from moelens_client import Client
from services_fixture import running_services
from tiny_models import hf_greedy, load_reference

pytestmark = pytest.mark.slow

NUM_REQUESTS = 256


@pytest.fixture(scope="module")
def workload(tiny_checkpoints):
    rng = random.Random(0)
    reference = load_reference(tiny_checkpoints["qwen3_moe"])
    vocab = reference.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
               for _ in range(NUM_REQUESTS)]
    lengths = [rng.randint(2, 20) for _ in range(NUM_REQUESTS)]
    expected = [hf_greedy(reference, p, n) for p, n in zip(prompts, lengths)]
    return prompts, lengths, expected


def _run(services, prompts, lengths, num_requests):
    prompts, lengths = prompts[:num_requests], lengths[:num_requests]
    with Client(services.coordinator_address) as client:
        results = client.generate_batch(
            prompts, overrides=[{"max_tokens": n} for n in lengths], max_concurrency=NUM_REQUESTS,
            progress=False, temperature=0, ignore_eos=True, timeout=600)
        return [r.token_ids for r in results], client.server_info()


@pytest.mark.parametrize("num_requests,options", [
    (NUM_REQUESTS, dict(kv_cache_gb=0.05, token_budget=512, pipeline="on")),
    (96, dict(kv_cache_gb=0.0005, token_budget=512)),  # ~1k tokens of KV: forces preemptions
    (96, dict(kv_cache_gb=0.05, token_budget=512, pipeline="off")),
], ids=["pipeline", "preempting", "no-pipeline"])
def test_batch_matches_each_alone(tiny_checkpoints, workload, num_requests, options):
    prompts, lengths, expected = workload
    expected = expected[:num_requests]
    with running_services(tiny_checkpoints["qwen3_moe"], max_num_seqs=256, **options) as services:
        got, info = _run(services, prompts, lengths, num_requests)
    mismatches = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not mismatches, f"{len(mismatches)} requests differ, first {mismatches[:5]}"
    if options["kv_cache_gb"] < 0.001:
        assert info.num_preemptions > 0
    assert info.num_free_kv_blocks == info.num_kv_blocks
