"""Everything the coordinator holds, built once at start from its flags and the services' Info."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from moelens.config import ModelConfig, load_config
from moelens.grpc_server import wait_until_serving
from moelens.profile import load_profile
from moelens.tokenizer import Tokenizer
from moelens.v1 import attention_pb2, coordinator_pb2, expert_pb2
from services.coordinator.block_manager import BlockManager
from services.coordinator.engine import Engine
from services.coordinator.executor import Executor
from services.coordinator.lens import LiveLens, profile_from_services
from services.coordinator.observer import StatsObserver
from services.coordinator.scheduler import Scheduler, SchedulerConfig
from services.coordinator.stopping import StopChecker

log = logging.getLogger(__name__)


@dataclass
class CoordinatorOptions:
    model_dir: Path
    expert_address: str
    attention_address: str
    token_budget: int | None = None
    """None: the performance model's n_real (capped by the expert's --max-num-tokens)."""
    profile_path: Path | None = None
    """A saved HardwareProfile; None = assembled from the services' warmup measurements."""
    max_num_seqs: int = 256
    max_waiting: int = 4096
    pipeline: str = "auto"
    """"on", "off", or "auto" (on when the expert service runs on an accelerator)."""
    startup_timeout_s: float = 600.0


@dataclass
class CoordinatorState:
    options: CoordinatorOptions
    model: ModelConfig
    tokenizer: Tokenizer | None
    executor: Executor
    engine: Engine
    expert_info: expert_pb2.ExpertInfo
    attention_info: attention_pb2.AttentionInfo
    observer: StatsObserver

    def model_info(self) -> coordinator_pb2.ModelInfo:
        m = self.model
        return coordinator_pb2.ModelInfo(
            model_path=str(self.options.model_dir), model_type=m.model_type,
            vocab_size=m.vocab_size, max_model_len=self.expert_info.max_model_len,
            num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k,
            num_parameters=m.num_parameters(), dtype=self.expert_info.dtype,
            has_tokenizer=self.tokenizer is not None,
            eos_token_ids=list(self.expert_info.eos_token_ids))

    def server_info(self) -> coordinator_pb2.ServerInfo:
        s = self.engine.scheduler
        pred = self.observer.prediction()
        return coordinator_pb2.ServerInfo(
            num_running=len(s.running), num_waiting=len(s.waiting),
            num_kv_blocks=s.blocks.num_blocks, num_free_kv_blocks=s.blocks.num_free_blocks,
            block_size=s.blocks.block_size, token_budget=s.config.token_budget,
            max_waiting=s.config.max_waiting, expert_address=self.options.expert_address,
            attention_address=self.options.attention_address, device=self.expert_info.device,
            transport=self.expert_info.transport, num_preemptions=s.num_preemptions,
            num_steps=self.engine.num_steps, pipeline=self.executor.pipeline,
            predicted_tokens_per_s=pred.predicted_tokens_per_s,
            measured_tokens_per_s=pred.measured_tokens_per_s, bottleneck=pred.bottleneck)


def resolve_pipeline(choice: str, expert_device: str) -> bool:
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--pipeline must be auto, on or off, got {choice!r}")
    return expert_device != "cpu" if choice == "auto" else choice == "on"


def build_state(options: CoordinatorOptions, metrics=None) -> CoordinatorState:
    """Wait for both compute services, read their capacity, and wire the engine."""
    for address in (options.attention_address, options.expert_address):
        wait_until_serving(address, options.startup_timeout_s)
    model = load_config(options.model_dir)
    executor = Executor(options.expert_address, options.attention_address)
    attention_info, expert_info = executor.attention_info(), executor.expert_info()
    executor.pipeline = resolve_pipeline(options.pipeline, expert_info.device)
    blocks = BlockManager(attention_info.num_blocks, attention_info.block_size)
    profile = (load_profile(options.profile_path) if options.profile_path
               else profile_from_services(model, expert_info, attention_info))
    lens = LiveLens.build(model, profile, expert_info, attention_info)
    observer = StatsObserver(lens, metrics)
    budget = options.token_budget or lens.token_budget()
    scheduler = Scheduler(SchedulerConfig(token_budget=budget, max_num_seqs=options.max_num_seqs,
                                          max_waiting=options.max_waiting,
                                          max_model_len=expert_info.max_model_len), blocks)
    stop = StopChecker(tuple(expert_info.eos_token_ids), expert_info.max_model_len)
    engine = Engine(scheduler, executor, stop, observer)
    observer.live_pairs = engine.live_pairs
    log.info("KV: %d blocks x %d tokens; token budget %d (%s)", blocks.num_blocks,
             blocks.block_size, budget, "flag" if options.token_budget else "performance model")
    return CoordinatorState(options=options, model=model,
                            tokenizer=Tokenizer.maybe_load(options.model_dir), executor=executor,
                            engine=engine, expert_info=expert_info,
                            attention_info=attention_info, observer=observer)
