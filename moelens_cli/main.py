"""`moe-lens`: one console script, one module per subcommand.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; this file only
wires them. Modules are imported when their command runs, so `moe-lens --help` stays fast and a
missing optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moelens.compute_loop import default_openmp_spin
from moelens.malloc_tuning import keep_freed_memory

# command -> (module, help); nested groups map to dicts of the same
COMMANDS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "generate": ("moelens_cli.generate", "run a JSONL batch job through the services"),
    "serve": {
        "coordinator": ("services.coordinator.server", "the client-facing API and scheduler"),
        "expert": ("services.expert_gpu.server", "weights and GEMMs on the accelerator"),
        "attention": ("services.attention_cpu.server", "KV cache and CPU attention"),
        "all": ("moelens_cli.serve_all", "all three as separate local processes"),
    },
    "make-model": ("moelens_cli.make_model", "write a synthetic checkpoint preset"),
    "predict": ("moelens_cli.predict", "performance-model prediction, no services needed"),
    "profile": ("moelens_cli.profile_cmd", "measure the hardware profile"),
    "bench": {
        "attention": ("moelens_cli.bench_attention", "CPU attention kernel vs memory bandwidth"),
        "experts": ("moelens_cli.bench_experts", "grouped expert GEMMs vs a per-token gather"),
        "throughput": ("moelens_cli.bench_throughput", "offline throughput (vLLM format)"),
        "serve": ("moelens_cli.bench_serve", "online latency under Poisson arrivals"),
        "validate": ("moelens_cli.bench_validate", "performance model vs measurement"),
    },
}


def _add(subparsers, name: str, spec: tuple[str, str]) -> None:
    module_name, help_text = spec
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if not err.name or not module_name.startswith(err.name):
            raise
        parser.set_defaults(_run=lambda args, m=module_name: _missing(m))
        return
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)


def _missing(module_name: str) -> int:
    print(f"moe-lens: this command is not available ({module_name} is not installed)",
          file=sys.stderr)
    return 2


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lens", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    wanted = [a for a in argv if not a.startswith("-")][:2]
    for name, spec in COMMANDS.items():
        if isinstance(spec, tuple):
            if not wanted or wanted[0] == name:
                _add(subparsers, name, spec)
            else:
                subparsers.add_parser(name, help=spec[1])
            continue
        group = subparsers.add_parser(name, help=f"{name} subcommands")
        group_sub = group.add_subparsers(dest="subcommand", required=True)
        for sub, sub_spec in spec.items():
            if wanted[:1] == [name] and (len(wanted) < 2 or wanted[1] == sub):
                _add(group_sub, sub, sub_spec)
            else:
                group_sub.add_parser(sub, help=sub_spec[1])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    default_openmp_spin()  # before any command imports torch
    keep_freed_memory()
    args = build_parser(argv).parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
