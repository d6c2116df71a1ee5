"""The expert service's state: weights (host + device), the attention link, the step runner."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moelens import panel_gemm
from moelens.checkpoint import load_weights
from moelens.errors import InvalidArgument
from moelens.model.stages import rope_inv_freq
from moelens.model.weights import ModelWeights
from moelens.sampling import RowSampling, SamplingParams
from moelens.v1 import expert_pb2
from services.expert_gpu.attention_client import AttentionClient
from services.expert_gpu.config import ExpertConfig
from services.expert_gpu.layer_store import LayerStore, plan_residency
from services.expert_gpu.profiling import measure_profile
from services.expert_gpu.runner import SeqStep, StepRunner

log = logging.getLogger(__name__)


def workspace_bytes(cfg, max_num_tokens: int, itemsize: int) -> int:
    """Activations of the largest step: hidden states, q/k/v/attention, routed expert rows."""
    per_token = (6 * cfg.hidden_size + 3 * (cfg.q_size + 2 * cfg.kv_size)
                 + 3 * cfg.top_k * cfg.expert_intermediate_size)
    return max_num_tokens * per_token * itemsize


class ExpertWorker:
    def __init__(self, model_dir: Path, config: ExpertConfig):
        self.model_dir, self.config = model_dir, config
        self.device = torch.device(config.device)
        self.cfg, host = load_weights(model_dir, config.torch_dtype)
        itemsize = config.torch_dtype.itemsize
        fixed = [host.embed, host.final_norm] + ([] if host.lm_head is host.embed else [host.lm_head])
        fixed_bytes = sum(t.numel() for t in fixed) * itemsize
        budget = None if config.device_memory_gb is None else int(config.device_memory_gb * 2**30)
        self.num_resident = plan_residency([lw.num_bytes() for lw in host.layers], fixed_bytes,
                                           workspace_bytes(self.cfg, config.max_num_tokens, itemsize),
                                           budget)
        self.panels = panel_gemm.resolve_mode(config.cpu_gemm, config.device, config.torch_dtype)
        self.store = LayerStore(host.layers, self.device, self.num_resident, self.panels)
        embed = host.embed.to(self.device)
        lm_head = embed if host.lm_head is host.embed else host.lm_head.to(self.device)
        self.weights = ModelWeights(embed=embed, final_norm=host.final_norm.to(self.device),
                                    lm_head=panel_gemm.maybe_pack(lm_head, self.panels))
        self.weight_bytes_total = host.num_bytes()
        self.attention = AttentionClient(config.attention_address, config.transport)
        self.runner = StepRunner(self.cfg, self.weights, self.store, self.attention, self.device,
                                 rope_inv_freq(self.cfg, self.device), self.panels)
        self.eos_token_ids = tuple(self.cfg.eos_token_ids)
        self.profile = None
        self.is_ready = False

    @property
    def max_model_len(self) -> int:
        return self.cfg.max_position_embeddings

    def validate(self, seqs: list[SeqStep]) -> None:
        """Reject plans that would index out of range (ids, positions, block tables)."""
        bs = self.runner.block_size
        for s in seqs:
            end = s.start_position + len(s.token_ids)
            if s.start_position < 0 or end > self.max_model_len:
                raise InvalidArgument(f"sequences[{s.seq_id}]: positions up to {end} exceed "
                                      f"max_model_len {self.max_model_len}")
            if any(not 0 <= t < self.cfg.vocab_size for t in s.token_ids):
                raise InvalidArgument(f"sequences[{s.seq_id}].token_ids outside "
                                      f"[0, {self.cfg.vocab_size})")
            if len(s.block_ids) * bs < end:
                raise InvalidArgument(f"sequences[{s.seq_id}].block_ids cover {len(s.block_ids) * bs}"
                                      f" tokens, the step needs {end}")

    def step(self, step_id: int, seqs: list[SeqStep], rows: list[RowSampling], pipeline: bool):
        with torch.inference_mode():
            return self.runner.run(step_id, seqs, rows, pipeline)

    def warmup(self) -> expert_pb2.ExpertInfo:
        """Measure the profile, then run one real step so every lazy allocation happens now."""
        self.attention.warmup()
        with torch.inference_mode():
            self.profile = measure_profile(self)
        self.is_ready = True
        return self.info()

    def info(self) -> expert_pb2.ExpertInfo:
        c = self.cfg
        info = expert_pb2.ExpertInfo(
            model_path=str(self.model_dir), model_type=c.model_type, device=self.config.device,
            dtype=self.config.dtype, num_layers=c.num_layers, vocab_size=c.vocab_size,
            max_model_len=self.max_model_len,
            device_memory_budget_bytes=int((self.config.device_memory_gb or 0) * 2**30),
            num_resident_layers=self.num_resident, num_streamed_layers=self.store.num_streamed,
            weight_bytes_total=self.weight_bytes_total,
            weight_bytes_streamed_per_step=self.store.streamed_bytes_per_step,
            eos_token_ids=list(self.eos_token_ids), transport=self.config.transport,
            is_ready=self.is_ready, max_num_tokens=self.config.max_num_tokens)
        if self.profile is not None:
            info.h2d_bytes_per_s = self.profile.h2d_bytes_per_s
            info.layer_gemm.intercept_s = self.profile.gemm_intercept_s
            info.layer_gemm.slope_s = self.profile.gemm_slope_s
            for tokens, seconds in self.profile.gemm_curve:
                info.layer_gemm_curve.add(tokens=tokens, seconds=seconds)
            info.exchange_fixed_s = self.profile.exchange_fixed_s
            info.exchange_s_per_byte = self.profile.exchange_s_per_byte
        return info

    def close(self) -> None:
        self.store.close()
        self.attention.close()


def greedy_rows(n: int) -> list[RowSampling]:
    return [RowSampling(SamplingParams(temperature=0.0), 0, 0) for _ in range(n)]
