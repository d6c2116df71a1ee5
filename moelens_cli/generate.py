"""`moe-lens generate`: run a JSONL file of prompts through the services, write JSONL results.

Input, one JSON object per line (blank lines are skipped):
    {"prompt": "text"} or {"prompt_token_ids": [1, 2, 3]}
    optional per-line overrides: max_tokens, min_tokens, temperature, top_p, top_k, seed, stop,
    ignore_eos (they replace the command-line values for that line).
Output, one line per prompt in input order (index = position among the prompts, from 0):
    index, token_ids, text, finish_reason, num_prompt_tokens, num_generated_tokens.

Without --coordinator the three services are started here on loopback and stopped at the end.
Every input line is checked before anything starts: a bad one fails as `path:line: problem`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from moelens_client import Client, MoeLensError
from moelens_client._requests import build_request, validate_sampling
from moelens_cli.launch_options import add_launch_arguments, options_from_args
from moelens_cli.launcher import ServiceStartError, sigterm_as_interrupt, start_local_services

SAMPLING_KEYS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                 "ignore_eos")
"""Sampling settings a flag or an input line may set."""
PROMPT_KEYS = ("prompt", "prompt_token_ids")
_READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class JobItem:
    """One input line: the prompt and the sampling settings that line overrides."""

    index: int
    prompt: str | list[int]
    overrides: dict[str, Any]
    line_number: int


@dataclass(frozen=True)
class JobSummary:
    num_requests: int
    num_prompt_tokens: int
    num_generated_tokens: int
    wall_s: float

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def format(self) -> str:
        return (f"requests: {self.num_requests}  prompt tokens: {self.num_prompt_tokens}  "
                f"generated tokens: {self.num_generated_tokens}  wall time: {self.wall_s:.2f} s  "
                f"output: {self.output_tokens_per_s:.1f} tok/s")


def parse_line(text: str, index: int, line_number: int,
               defaults: Mapping[str, Any]) -> JobItem:
    """One input line as a JobItem; ValueError saying what is wrong (without the location)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object like {{\"prompt\": \"...\"}}, "
                         f"got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(PROMPT_KEYS) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {[*PROMPT_KEYS, *SAMPLING_KEYS]}")
    given = [k for k in PROMPT_KEYS if k in obj]
    if len(given) != 1:
        raise ValueError("set exactly one of \"prompt\" (text) or \"prompt_token_ids\" "
                         f"(list of ints), got {given or 'neither'}")
    prompt = obj[given[0]]
    if given[0] == "prompt" and not isinstance(prompt, str):
        raise ValueError(f"\"prompt\" must be a string, got {type(prompt).__name__}; use "
                         "\"prompt_token_ids\" for token ids")
    if given[0] == "prompt_token_ids" and not isinstance(prompt, list):
        raise ValueError(f"\"prompt_token_ids\" must be a list of ints, got "
                         f"{type(prompt).__name__}")
    overrides = {k: obj[k] for k in SAMPLING_KEYS if k in obj}
    build_request(prompt, **{**defaults, **overrides})  # the SDK's checks, same messages
    return JobItem(index, prompt, overrides, line_number)


def read_items(path: Path, defaults: Mapping[str, Any]) -> list[JobItem]:
    """Every prompt of a JSONL file, all checked; ValueError as `path:line: problem`."""
    items: list[JobItem] = []
    with open(path, encoding="utf-8") as lines:
        for line_number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                items.append(parse_line(text, len(items), line_number, defaults))
            except ValueError as err:
                raise ValueError(f"{path}:{line_number}: {err}") from None
    if not items:
        raise ValueError(f"{path}: no prompts (one JSON object per line, e.g. "
                         f"{{\"prompt\": \"Hello\"}})")
    return items


def run_job(client: Client, items: Sequence[JobItem], *, sampling: Mapping[str, Any],
            concurrency: int = 64, progress: bool = True,
            detokenize: bool | None = None) -> list[dict[str, Any]]:
    """Run every item through the coordinator; one output record per item, in input order."""
    results = client.generate_batch([item.prompt for item in items],
                                    overrides=[item.overrides for item in items],
                                    max_concurrency=concurrency, progress=progress,
                                    detokenize=detokenize, **sampling)
    return [{"index": item.index, "token_ids": result.token_ids, "text": result.text,
             "finish_reason": result.finish_reason,
             "num_prompt_tokens": result.usage.prompt_tokens,
             "num_generated_tokens": len(result.token_ids)}
            for item, result in zip(items, results)]


def summarize(records: Sequence[Mapping[str, Any]], wall_s: float) -> JobSummary:
    return JobSummary(len(records), sum(r["num_prompt_tokens"] for r in records),
                      sum(r["num_generated_tokens"] for r in records), wall_s)


def write_records(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write atomically: a crash never leaves a half-written output that looks complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="checkpoint folder or 'default' (ignored with --coordinator)")
    parser.add_argument("--input", type=Path, required=True, help="prompts, JSONL")
    parser.add_argument("--output", type=Path, required=True, help="results, JSONL")
    sampling = parser.add_argument_group("sampling (defaults for every line)")
    sampling.add_argument("--max-tokens", type=int, default=None, help="default 16")
    sampling.add_argument("--min-tokens", type=int, default=None)
    sampling.add_argument("--temperature", type=float, default=None, help="0 = greedy; default 1")
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--top-k", type=int, default=None)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", action="append", default=None,
                          help="stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true", default=None)
    parser.add_argument("--coordinator", default=None,
                        help="host:port of running services (default: start them here)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="requests in flight at once")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_launch_arguments(parser)


def _prepare(args: argparse.Namespace) -> tuple[dict[str, Any], list[JobItem]]:
    """Everything checkable before a service starts: flags, input lines, output folder."""
    sampling = {k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k) is not None}
    try:
        validate_sampling(sampling)
    except ValueError as err:
        raise ValueError(f"--{str(err).replace('_', '-')}") from None
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    if not args.input.is_file():
        raise ValueError(f"--input {args.input}: no such file")
    if not args.output.parent.resolve().is_dir():
        raise ValueError(f"--output {args.output}: folder {args.output.parent} does not exist")
    return sampling, read_items(args.input, sampling)


def run(args: argparse.Namespace) -> int:
    try:
        sampling, items = _prepare(args)
        options = None if args.coordinator else options_from_args(args)
    except ValueError as err:
        print(f"moe-lens generate: {err}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt(), ExitStack() as stack:
            address = args.coordinator
            if options is not None:
                print("moe-lens generate: starting services...", file=sys.stderr, flush=True)
                address = stack.enter_context(start_local_services(options)).coordinator_address
            client = stack.enter_context(Client(address))
            client.wait_ready(_READY_TIMEOUT_S)
            detokenize = client.model_info().has_tokenizer
            start = time.perf_counter()
            records = run_job(client, items, sampling=sampling, concurrency=args.concurrency,
                              progress=not args.no_progress, detokenize=detokenize)
            wall_s = time.perf_counter() - start
        write_records(args.output, records)
    except KeyboardInterrupt:
        print("moe-lens generate: interrupted; services stopped", file=sys.stderr)
        return 130
    except (MoeLensError, ServiceStartError, ValueError) as err:
        print(f"moe-lens generate: {err}", file=sys.stderr)
        return 1
    print(f"moe-lens generate: wrote {args.output}; {summarize(records, wall_s).format()}",
          file=sys.stderr)
    return 0
