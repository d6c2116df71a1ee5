"""How to start the local services: validated options, their command-line flags, and the
flags each service gets."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

ROLES = ("attention", "expert", "coordinator")
"""Start order: each needs the addresses of the ones before it."""

TRANSPORTS = ("shm", "grpc")


@dataclass(frozen=True)
class LaunchOptions:
    """How to start the services; None leaves a flag to the service's own default."""

    model: str = "default"
    """Checkpoint folder or "default" (built here once, before the services start)."""
    transport: str = "shm"
    """Activation transport between expert and attention: "shm" (same host) or "grpc"."""
    kv_cache_gb: float = 2.0
    block_size: int = 16
    kv_dtype: str | None = None
    device: str = "auto"
    device_memory_gb: float | None = None
    dtype: str | None = None
    cpu_gemm: str | None = None
    """The expert service's CPU GEMMs: "auto", "panels" or "torch" (None: its default)."""
    expert_threads: int | None = None
    attention_threads: int | None = None
    token_budget: int | None = None
    """Tokens per step; also sizes the expert workspace and the shared-memory slots."""
    max_num_seqs: int | None = None
    max_waiting: int | None = None
    pipeline: str = "auto"
    """Two-group pipeline: "auto" (on when the expert runs on an accelerator), "on" or "off"."""
    host: str = "127.0.0.1"
    """Where the coordinator binds (the compute services always bind loopback)."""
    port: int = 0
    """Coordinator port; 0 = pick a free one."""
    metrics_port: int = 0
    """Prometheus ports: coordinator here, expert +1, attention +2; 0 = off."""
    log_level: str = "INFO"
    log_dir: Path | None = None
    """Where service logs go; None = a temporary folder removed after a clean stop."""
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        threads = (self.expert_threads, self.attention_threads)
        checks = [  # (holds, flag, what to set instead)
            (self.transport in TRANSPORTS, "--transport", f"must be one of {TRANSPORTS}"),
            (self.kv_cache_gb > 0, "--kv-cache-gb", "must be > 0"),
            (self.block_size >= 1, "--block-size", "must be >= 1"),
            (all(t is None or t >= 1 for t in threads), "--expert-threads/--attention-threads",
             "must be >= 1 (or unset for the service's default)"),
            (self.token_budget is None or self.token_budget >= 1, "--token-budget",
             "must be >= 1 (or unset for the performance model's)"),
            (self.max_num_seqs is None or self.max_num_seqs >= 1, "--max-num-seqs",
             "must be >= 1"),
            (0 <= self.port <= 65535, "--port", "must be in [0, 65535] (0 = pick a free one)"),
            (0 <= self.metrics_port <= 65533, "--metrics-port", "must be in [0, 65533]"),
            (self.pipeline in ("auto", "on", "off"), "--pipeline", "must be auto, on or off"),
            (self.startup_timeout_s > 0, "--startup-timeout", "must be > 0 seconds"),
        ]
        config_json = Path(self.model).expanduser() / "config.json"
        if self.model != "default" and not config_json.is_file():
            raise ValueError(f"--model {self.model}: no config.json there; pass a Hugging Face "
                             "checkpoint folder or 'default'")
        for holds, flag, why in checks:
            if not holds:
                raise ValueError(f"{flag} {why}")

    def role_flags(self, role: str, model: str, addresses: dict[str, str]) -> list[str]:
        """The service-specific flags of one role (the launcher adds host, port, logging)."""
        flags = ["--model", model]
        if self.metrics_port:
            flags += ["--metrics-port", str(self.metrics_port + ROLES[::-1].index(role))]
        if role == "attention":
            flags += ["--kv-cache-gb", str(self.kv_cache_gb), "--block-size",
                      str(self.block_size), "--transport", self.transport]
            flags += _optional(kv_dtype=self.kv_dtype, num_threads=self.attention_threads,
                               max_num_tokens=self.token_budget)
        elif role == "expert":
            flags += ["--attention", addresses["attention"], "--device", self.device,
                      "--transport", self.transport]
            flags += _optional(device_memory_gb=self.device_memory_gb, dtype=self.dtype,
                               cpu_gemm=self.cpu_gemm, num_threads=self.expert_threads,
                               max_num_tokens=self.token_budget)
        else:
            flags += ["--expert", addresses["expert"], "--attention", addresses["attention"]]
            flags += _optional(token_budget=self.token_budget, max_num_seqs=self.max_num_seqs,
                               max_waiting=self.max_waiting)
            flags += ["--pipeline", self.pipeline]
        return flags


def _optional(**values: object) -> list[str]:
    flags: list[str] = []
    for name, value in values.items():
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the services the launcher starts (shared by `generate` and `serve all`)."""
    group = parser.add_argument_group("local services (started when no --coordinator is given)")
    add = group.add_argument
    add("--transport", choices=TRANSPORTS, default="shm",
        help="activations between expert and attention: shared memory or gRPC")
    add("--kv-cache-gb", type=float, default=2.0, help="host memory for the KV pool, GiB")
    add("--block-size", type=int, default=16, help="tokens per KV block")
    add("--kv-dtype", choices=["float32", "float16", "bfloat16"], default=None)
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--device-memory-gb", type=float, default=None,
        help="accelerator budget for weights + workspace (default: all layers resident)")
    add("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None)
    add("--cpu-gemm", choices=["auto", "panels", "torch"], default=None,
        help="the expert service's CPU GEMMs: our packed-panel kernels or torch's F.linear "
             "(default: auto, panels wherever they build)")
    add("--expert-threads", type=int, default=None, help="torch threads of the expert service")
    add("--attention-threads", type=int, default=None, help="attention kernel threads")
    add("--token-budget", type=int, default=None,
        help="tokens per step (default: from the performance model)")
    add("--max-num-seqs", type=int, default=None, help="most running requests")
    add("--max-waiting", type=int, default=None, help="bound on the waiting queue")
    add("--pipeline", choices=["auto", "on", "off"], default="auto",
        help="two-group pipeline overlapping CPU attention with GEMMs (auto: on with an "
             "accelerator)")
    add("--no-pipeline", dest="pipeline", action="store_const", const="off",
        help="same as --pipeline off")
    add("--service-log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add("--log-dir", type=Path, default=None,
        help="keep service logs here (default: a temp folder, removed after a clean stop)")
    add("--startup-timeout", type=float, default=600.0,
        help="seconds each service may take to start (loading a large model takes a while)")


def options_from_args(args: argparse.Namespace, **overrides: object) -> LaunchOptions:
    """LaunchOptions from the flags of add_launch_arguments (plus --model and the overrides)."""
    values = dict(
        model=args.model, transport=args.transport, kv_cache_gb=args.kv_cache_gb,
        block_size=args.block_size, kv_dtype=args.kv_dtype, device=args.device,
        device_memory_gb=args.device_memory_gb, dtype=args.dtype, cpu_gemm=args.cpu_gemm,
        expert_threads=args.expert_threads, attention_threads=args.attention_threads,
        token_budget=args.token_budget, max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting, pipeline=args.pipeline,
        log_level=args.service_log_level, log_dir=args.log_dir,
        startup_timeout_s=args.startup_timeout)
    values.update(overrides)
    return LaunchOptions(**values)
