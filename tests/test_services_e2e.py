"""End to end through three real service processes: greedy tokens identical to HF transformers.

Every family, ragged prompts (blocks of 8 tokens, prompts crossing block boundaries), 32+
generated tokens, over the shm transport; the grpc transport and the `moe-lens generate` command
on top.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import torch

from moelens import panel_gemm

from moelens.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from services_fixture import running_services
from tiny_models import FAMILIES, build_tiny, hf_greedy, load_reference

PROMPT_LENS = (5, 19, 33)
NUM_TOKENS = 34


def _prompts(vocab: int) -> list[list[int]]:
    return [[(7 * i + 3 * n) % vocab for i in range(n)] for n in PROMPT_LENS]


def _generate(address: str, prompt: list[int], max_tokens: int) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        request = coordinator_pb2.GenerateRequest(
            token_ids=coordinator_pb2.TokenIds(ids=prompt),
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0,
                                               ignore_eos=True))
        tokens, finish = [], None
        for event in stub.Generate(request, timeout=120):
            if event.HasField("chunk"):
                tokens += event.chunk.token_ids
            else:
                finish = event.complete.finish_reason
    assert finish == "length"
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("family,transport", [(f, "shm") for f in sorted(FAMILIES)]
                         + [("qwen2_moe", "grpc")])
def test_greedy_matches_transformers(tiny_checkpoints, family, transport):
    model_dir = tiny_checkpoints[family]
    reference = load_reference(model_dir)
    prompts = _prompts(reference.config.vocab_size)
    expected = [hf_greedy(reference, p, NUM_TOKENS) for p in prompts]
    with running_services(model_dir, transport=transport) as services:
        got = [_generate(services.coordinator_address, p, NUM_TOKENS) for p in prompts]
    assert got == expected


@pytest.mark.slow
@pytest.mark.skipif(not panel_gemm.is_supported(torch.bfloat16),
                    reason="the bf16 panel GEMMs need a CPU with AMX-BF16 or AVX512-BF16")
def test_bf16_panels_greedy_agrees_with_transformers(tiny_checkpoints):
    """--dtype bfloat16 on the CPU device, every GEMM on the bf16 panel kernels (AMX or
    AVX512-BF16, whichever the CPU has) and prefill attention on the fp32 one. bf16 rounds
    differently in every implementation, and HF's own bf16 run parts from its fp32 one on these
    peaky models (an OLMoE router near-tie): the first tokens must equal HF's bf16 greedy ones,
    and every token must be HF fp32's argmax on our sequence to within bf16 rounding."""
    model_dir = tiny_checkpoints["olmoe"]
    reference = load_reference(model_dir)
    prompts = _prompts(reference.config.vocab_size)
    with running_services(model_dir, dtype="bfloat16", kv_dtype="bfloat16") as services:
        got = [_generate(services.coordinator_address, p, NUM_TOKENS) for p in prompts]
    with torch.no_grad():
        for prompt, tokens in zip(prompts, got):
            logits = reference(torch.tensor([prompt + tokens])).logits[0]  # [S, V] fp32
            steps = logits[len(prompt) - 1:-1]  # [G, V]: the logits each token was chosen from
            ours = steps.gather(1, torch.tensor(tokens)[:, None])[:, 0]
            assert torch.all(steps.max(dim=1).values - ours <= 0.02 * steps.abs().max()), tokens
        reference = reference.to(torch.bfloat16)
        assert [t[:8] for t in got] == [hf_greedy(reference, p, 8) for p in prompts]


@pytest.mark.slow
def test_generate_command_matches_transformers(tiny_checkpoints, tmp_path):
    model_dir = tiny_checkpoints["olmoe"]
    reference = load_reference(model_dir)
    prompts = _prompts(reference.config.vocab_size)
    lines = [json.dumps({"prompt_token_ids": p, "max_tokens": NUM_TOKENS}) for p in prompts]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "moelens_cli.main", "generate", "--model", str(model_dir),
               "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
               "--temperature", "0", "--ignore-eos", "--transport", "grpc", "--dtype", "float32",
               "--kv-cache-gb", "0.05", "--block-size", "8"]
    subprocess.run(command, check=True, timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["token_ids"] for r in rows] == [hf_greedy(reference, p, NUM_TOKENS) for p in prompts]
    assert all(r["num_generated_tokens"] == NUM_TOKENS for r in rows)


def _streaming_budget_gb(model_dir, max_num_tokens: int, extra_layers: int) -> float:
    """A device budget that holds the double buffer plus `extra_layers` resident layers."""
    from moelens.checkpoint import load_weights
    from services.expert_gpu.worker import workspace_bytes
    cfg, weights = load_weights(model_dir)
    layer = max(lw.num_bytes() for lw in weights.layers)
    fixed = (weights.embed.numel() * 2 + weights.final_norm.numel()) * 4
    need = fixed + workspace_bytes(cfg, max_num_tokens, 4) + (2 + extra_layers) * layer
    return (need + layer // 2) / 2**30


@pytest.mark.slow
def test_streamed_layers_match_transformers(tmp_path):
    """4 layers under a budget for the double buffer + 1 layer: 1 resident, 3 streamed (an odd
    count, so the two buffers swap roles from one step to the next)."""
    from moelens.v1 import expert_pb2, expert_pb2_grpc
    model_dir = build_tiny("qwen2_moe", tmp_path / "four", num_hidden_layers=4, mlp_only_layers=[])
    reference = load_reference(model_dir)
    prompts = _prompts(reference.config.vocab_size)
    budget = _streaming_budget_gb(model_dir, 256, extra_layers=1)
    with running_services(model_dir, device_memory_gb=budget, token_budget=256) as services:
        with grpc.insecure_channel(services.expert_address) as channel:
            info = expert_pb2_grpc.ExpertServiceStub(channel).Info(expert_pb2.ExpertInfoRequest())
        got = [_generate(services.coordinator_address, p, NUM_TOKENS) for p in prompts]
    assert info.num_resident_layers == 1 and info.num_streamed_layers == 3
    assert got == [hf_greedy(reference, p, NUM_TOKENS) for p in prompts]


@pytest.mark.slow
def test_budget_below_double_buffer_fails_with_minimum(tiny_checkpoints):
    from moelens_cli.launcher import ServiceStartError
    model_dir = tiny_checkpoints["mixtral"]
    budget = _streaming_budget_gb(model_dir, 256, extra_layers=0) / 2
    with pytest.raises(ServiceStartError, match="minimum is"):
        with running_services(model_dir, device_memory_gb=budget, token_budget=256):
            pass
