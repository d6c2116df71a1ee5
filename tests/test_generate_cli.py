"""`moe-lens generate` input checking and job running (against the fake coordinator), and the
launcher's flag plumbing and start-up failure path."""

from __future__ import annotations

import json

import pytest

from fake_coordinator import serve_fake
from moelens.sampling import SamplingParams
from moelens_cli.generate import read_items, run_job
from moelens_cli.launch_options import LaunchOptions
from moelens_cli.launcher import ServiceStartError, start_local_services
from moelens_cli.main import main
from moelens_client import Client


@pytest.fixture(scope="module")
def address():
    fake, handle = serve_fake()
    yield f"127.0.0.1:{handle.port}"
    handle.stop(0)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_items_good_file(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [
        '{"prompt": "hi"}', "", '{"prompt_token_ids": [1, 2], "max_tokens": 4, "stop": ["x"]}',
        '{"prompt": "yo", "temperature": 0, "ignore_eos": true, "seed": 1}'])
    items = read_items(path, {"max_tokens": 8})
    assert [i.index for i in items] == [0, 1, 2]
    assert [i.line_number for i in items] == [1, 3, 4]
    assert items[1].prompt == [1, 2] and items[1].overrides == {"max_tokens": 4, "stop": ["x"]}
    assert items[2].overrides == {"temperature": 0, "ignore_eos": True, "seed": 1}


@pytest.mark.parametrize("line,problem", [
    ('{"prompt": "hi"', "not valid JSON"),
    ('["hi"]', "expected a JSON object"),
    ('{"text": "hi"}', "unknown key(s) ['text']"),
    ('{"prompt": "a", "prompt_token_ids": [1]}', "set exactly one of"),
    ('{"max_tokens": 3}', "got neither"),
    ('{"prompt": 5}', "\"prompt\" must be a string"),
    ('{"prompt_token_ids": "1 2"}', "must be a list of ints"),
    ('{"prompt_token_ids": [1, -1]}', "prompt must be"),
    ('{"prompt_token_ids": []}', "prompt must be"),
    ('{"prompt": ""}', "prompt must be non-empty"),
    ('{"prompt": "a", "temperature": "hot"}', "temperature must be a number"),
    ('{"prompt": "a", "stop": [""]}', "stop strings must be non-empty"),
])
def test_bad_line_names_file_and_line(tmp_path, line, problem):
    path = write_lines(tmp_path / "in.jsonl", ['{"prompt": "fine"}', "", line])
    with pytest.raises(ValueError) as err:
        read_items(path, {})
    assert str(err.value).startswith(f"{path}:3: ")
    assert problem in str(err.value)


def test_bad_override_gives_sampling_params_message(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", ['{"prompt": "a", "min_tokens": 9}'])
    with pytest.raises(ValueError) as expected:
        SamplingParams(max_tokens=4, min_tokens=9)
    with pytest.raises(ValueError) as got:
        read_items(path, {"max_tokens": 4})
    assert str(got.value) == f"{path}:1: {expected.value}"


def test_empty_input(tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        read_items(write_lines(tmp_path / "in.jsonl", ["", "  "]), {})


def test_run_job_in_order(tmp_path, address):
    lines = [json.dumps({"prompt_token_ids": [i], "max_tokens": 1 + i % 3}) for i in range(7)]
    items = read_items(write_lines(tmp_path / "in.jsonl", lines), {})
    with Client(address) as client:
        records = run_job(client, items, sampling={"max_tokens": 5}, concurrency=2,
                          progress=False)
    assert [r["index"] for r in records] == list(range(7))
    assert [r["token_ids"] for r in records] == [list(range(i, i + 1 + i % 3)) for i in range(7)]
    assert records[0] == {"index": 0, "token_ids": [0], "text": "", "finish_reason": "length",
                          "num_prompt_tokens": 1, "num_generated_tokens": 1}


def test_generate_command_with_coordinator(tmp_path, address, capsys):
    src = write_lines(tmp_path / "in.jsonl", ['{"prompt": "abc"}', '{"prompt_token_ids": [4]}'])
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--input", str(src), "--output", str(out), "--coordinator", address,
               "--max-tokens", "2", "--temperature", "0", "--no-progress"])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["token_ids"] for r in records] == [[3, 4], [4, 5]]
    assert records[0]["text"] == "<3><4>" and records[1]["text"] == "<4><5>"  # has_tokenizer
    summary = capsys.readouterr().err
    assert "requests: 2" in summary and "generated tokens: 4" in summary and "tok/s" in summary


def test_generate_command_fails_before_starting_anything(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", ['{"prompt": "ok"}', '{"prompt": 1}'])
    rc = main(["generate", "--input", str(src), "--output", str(tmp_path / "o.jsonl")])
    assert rc == 2
    assert f"{src}:2: " in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    rc = main(["generate", "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
               "--temperature", "-1"])
    assert rc == 2 and "--temperature must be >= 0" in capsys.readouterr().err


def test_launch_options_flags(tmp_path):
    options = LaunchOptions(transport="grpc", kv_cache_gb=1.5, expert_threads=1,
                            token_budget=512, pipeline="off", metrics_port=9400)
    addresses = {"attention": "127.0.0.1:1", "expert": "127.0.0.1:2"}
    attention = options.role_flags("attention", "/m", addresses)
    expert = options.role_flags("expert", "/m", addresses)
    coordinator = options.role_flags("coordinator", "/m", addresses)
    assert attention == ["--model", "/m", "--metrics-port", "9402", "--kv-cache-gb", "1.5",
                         "--block-size", "16", "--transport", "grpc", "--max-num-tokens", "512"]
    assert expert == ["--model", "/m", "--metrics-port", "9401", "--attention", "127.0.0.1:1",
                      "--device", "auto", "--transport", "grpc", "--num-threads", "1",
                      "--max-num-tokens", "512"]
    assert coordinator == ["--model", "/m", "--metrics-port", "9400", "--expert", "127.0.0.1:2",
                           "--attention", "127.0.0.1:1", "--token-budget", "512",
                           "--pipeline", "off"]
    with pytest.raises(ValueError, match="--kv-cache-gb"):
        LaunchOptions(kv_cache_gb=0)
    with pytest.raises(ValueError, match="no config.json"):
        LaunchOptions(model=str(tmp_path))


def test_start_failure_reports_log_tail(tmp_path):
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "not-a-moe"}')
    options = LaunchOptions(model=str(model), log_dir=tmp_path / "logs", startup_timeout_s=120)
    with pytest.raises(ServiceStartError) as err:
        start_local_services(options)
    message = str(err.value)
    assert "attention service exited with code" in message
    assert str(tmp_path / "logs" / "attention.log") in message
    assert "Traceback" in message or "Error" in message
