"""`moe-lens bench serve`: online latency under Poisson arrivals, in vLLM's result format.

Requests arrive at --request-rate per second (gaps drawn from a gamma distribution of shape
--burstiness, 1 = Poisson, seeded; inf = all at once), at most --max-concurrency in flight.
Each streams through the SDK; per request we record TTFT (send to first token), ITL (gaps
between streamed chunks), TPOT ((E2E - TTFT) / (output tokens - 1)) and E2E latency, and print
the block vLLM's benchmark_serving prints, with the same definitions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import numpy as np

from moelens_client import AsyncClient, Client, MoeLensError
from moelens_cli import bench_common as common
from moelens_cli.launch_options import add_launch_arguments, options_from_args
from moelens_cli.launcher import ServiceStartError, sigterm_as_interrupt, start_local_services

_READY_TIMEOUT_S = 60.0
METRICS = (("ttft", "TTFT", "Time to First Token"),
           ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
           ("itl", "ITL", "Inter-token Latency"),
           ("e2el", "E2EL", "End-to-end Latency"))
"""(key, short name, section header) in vLLM's order."""


@dataclass
class RequestRecord:
    """One request as the client saw it (seconds)."""

    success: bool
    prompt_len: int
    output_len: int = 0
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    error: str = ""


@dataclass
class ServingMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ms: dict[str, dict[str, float]]
    """Per metric (ttft, tpot, itl, e2el): mean, median and pXX in milliseconds."""


def _stats_ms(values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    # numpy's defaults (linear interpolation), as vLLM computes them; 0 when empty, as vLLM
    values = np.asarray(values_s or [0.0]) * 1000.0
    stats = {"mean": float(np.mean(values)), "median": float(np.median(values))}
    for p in percentiles:
        stats[f"p{_p_word(p)}"] = float(np.percentile(values, p))
    return stats


def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def serving_metrics(records: list[RequestRecord], duration_s: float,
                    percentiles: list[float]) -> ServingMetrics:
    """vLLM's calculate_metrics over the successful requests."""
    done = [r for r in records if r.success]
    tpots = [(r.latency_s - r.ttft_s) / (r.output_len - 1) for r in done if r.output_len > 1]
    series = {"ttft": [r.ttft_s for r in done], "tpot": tpots,
              "itl": [gap for r in done for gap in r.itl_s], "e2el": [r.latency_s for r in done]}
    inputs, outputs = sum(r.prompt_len for r in done), sum(r.output_len for r in done)
    return ServingMetrics(
        completed=len(done), failed=len(records) - len(done), duration_s=duration_s,
        total_input_tokens=inputs, total_output_tokens=outputs,
        request_throughput=len(done) / duration_s, output_throughput=outputs / duration_s,
        total_token_throughput=(inputs + outputs) / duration_s,
        ms={key: _stats_ms(values, percentiles) for key, values in series.items()})


def format_serving(metrics: ServingMetrics, max_concurrency: int | None = None) -> str:
    """The block vLLM's benchmark_serving prints, line for line."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
             "{:<40} {:<10}".format("Successful requests:", metrics.completed)]
    if metrics.failed:
        lines.append("{:<40} {:<10}".format("Failed requests:", metrics.failed))
    if max_concurrency is not None:
        lines.append("{:<40} {:<10}".format("Maximum request concurrency:", max_concurrency))
    lines += ["{:<40} {:<10.2f}".format("Benchmark duration (s):", metrics.duration_s),
              "{:<40} {:<10}".format("Total input tokens:", metrics.total_input_tokens),
              "{:<40} {:<10}".format("Total generated tokens:", metrics.total_output_tokens),
              "{:<40} {:<10.2f}".format("Request throughput (req/s):",
                                        metrics.request_throughput),
              "{:<40} {:<10.2f}".format("Output token throughput (tok/s):",
                                        metrics.output_throughput),
              "{:<40} {:<10.2f}".format("Total Token throughput (tok/s):",
                                        metrics.total_token_throughput)]
    for key, name, header in METRICS:
        stats = metrics.ms[key]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        lines.append("{:<40} {:<10.2f}".format(f"Mean {name} (ms):", stats["mean"]))
        lines.append("{:<40} {:<10.2f}".format(f"Median {name} (ms):", stats["median"]))
        for label, value in stats.items():
            if label.startswith("p"):
                lines.append("{:<40} {:<10.2f}".format(f"P{label[1:]} {name} (ms):", value))
    lines.append("=" * 50)
    return "\n".join(lines)


async def arrivals(requests: list[common.BenchRequest], rate: float, burstiness: float,
                   seed: int) -> AsyncIterator[common.BenchRequest]:
    """Each request when it arrives: gamma-distributed gaps of mean 1/rate (Poisson at
    burstiness 1), or all at once when the rate is infinite."""
    rng = np.random.default_rng(seed)
    for request in requests:
        yield request
        if math.isfinite(rate):
            await asyncio.sleep(rng.gamma(burstiness, 1.0 / (rate * burstiness)))


async def one_request(client: AsyncClient, request: common.BenchRequest,
                      limit: asyncio.Semaphore | None) -> RequestRecord:
    async with limit if limit is not None else contextlib.nullcontext():
        record = RequestRecord(success=False, prompt_len=len(request.prompt_ids))
        sent = last = time.perf_counter()
        try:
            stream = client.generate_stream(
                request.prompt_ids, detokenize=False, max_tokens=request.gen_len,
                min_tokens=request.gen_len, temperature=0.0, ignore_eos=True)
            async for chunk in stream:
                if not chunk.token_ids:
                    continue
                now = time.perf_counter()
                if record.output_len == 0:
                    record.ttft_s = now - sent
                else:
                    record.itl_s.append(now - last)
                last = now
                record.output_len += len(chunk.token_ids)
        except MoeLensError as err:
            record.error = str(err)
            return record
        record.latency_s = time.perf_counter() - sent
        record.success = True
        return record


async def run_benchmark(address: str, requests: list[common.BenchRequest], rate: float,
                        burstiness: float, max_concurrency: int | None,
                        seed: int) -> tuple[list[RequestRecord], float]:
    async with AsyncClient(address) as client:
        limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        tasks = []
        start = time.perf_counter()
        async for request in arrivals(requests, rate, burstiness, seed):
            tasks.append(asyncio.create_task(one_request(client, request, limit)))
        records = list(await asyncio.gather(*tasks))
        return records, time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="checkpoint folder, 'default', or a preset such as bench-mixtral")
    parser.add_argument("--workload", default="fixed", choices=list(common.WORKLOADS))
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="prompt tokens (fixed: default 128; others: the mean)")
    parser.add_argument("--gen-len", type=int, default=None,
                        help="generated tokens (fixed: default 64; others: the mean)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="arrivals per second (inf = all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the gaps: 1 = Poisson, < 1 burstier")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="most requests in flight (default: unbounded)")
    parser.add_argument("--metric-percentiles", default="99",
                        help="comma list of percentiles to report, e.g. 50,90,99")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--coordinator", default=None,
                        help="host:port of running services (default: start them here)")
    add_launch_arguments(parser)


def _check(args: argparse.Namespace) -> list[float]:
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.workload == "fixed":
        args.prompt_len = 128 if args.prompt_len is None else args.prompt_len
        args.gen_len = 64 if args.gen_len is None else args.gen_len
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    except ValueError:
        raise ValueError(f"--metric-percentiles {args.metric_percentiles!r}: give numbers "
                         "like 50,90,99") from None
    if not all(0 < p <= 100 for p in percentiles):
        raise ValueError("--metric-percentiles must lie in (0, 100]")
    return percentiles


def _payload(args: argparse.Namespace, metrics: ServingMetrics,
             records: list[RequestRecord]) -> dict[str, Any]:
    payload: dict[str, Any] = {k: v for k, v in dataclasses.asdict(metrics).items() if k != "ms"}
    for key, stats in metrics.ms.items():
        for label, value in stats.items():
            payload[f"{label}_{key}_ms"] = value
    payload["config"] = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                         for k, v in vars(args).items()
                         if not k.startswith("_") and not callable(v)
                         and isinstance(v, (str, int, float, bool, type(None)))}
    payload["requests"] = [dataclasses.asdict(r) for r in records]
    return payload


def run(args: argparse.Namespace) -> int:
    try:
        percentiles = _check(args)
        options = None if args.coordinator else options_from_args(
            args, model=common.resolve_bench_model(args.model))
    except ValueError as err:
        print(f"moe-lens bench serve: {err}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt(), ExitStack() as stack:
            address = args.coordinator
            if options is not None:
                print("moe-lens bench: starting services...", file=sys.stderr, flush=True)
                address = stack.enter_context(start_local_services(options)).coordinator_address
            client = stack.enter_context(Client(address))
            client.wait_ready(_READY_TIMEOUT_S)
            info = client.model_info()
            requests = common.make_requests(args.workload, args.num_requests, info.vocab_size,
                                            args.seed, args.prompt_len, args.gen_len,
                                            info.max_model_len or None)
            records, duration = asyncio.run(run_benchmark(
                address, requests, args.request_rate, args.burstiness, args.max_concurrency,
                args.seed))
    except KeyboardInterrupt:
        print("moe-lens bench serve: interrupted; services stopped", file=sys.stderr)
        return 130
    except (MoeLensError, ServiceStartError, ValueError) as err:
        print(f"moe-lens bench serve: {err}", file=sys.stderr)
        return 1
    metrics = serving_metrics(records, duration, percentiles)
    print(format_serving(metrics, args.max_concurrency))
    for record in records:
        if not record.success:
            print(f"failed request: {record.error}", file=sys.stderr)
            break
    if args.json:
        common.write_json(args.json, _payload(args, metrics, records))
    return 0 if metrics.failed == 0 else 1
