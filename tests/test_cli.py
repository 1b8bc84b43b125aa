"""The command line, through typer's CliRunner: help, exit codes, clean user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import afinar
from afinar.cli import app

from conftest import QA, qa_rows, write_jsonl

runner = CliRunner()


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input, prog_name="afinar")


def assert_user_error(result, *needles: str):
    """Exit code 2, one clean message (no traceback), mentioning every needle."""
    text = result.stdout + result.stderr
    assert result.exit_code == 2, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


HELP = {
    (): ["demo", "train", "ask", "config", "data"],
    ("demo",): ["--output", "--set", "--full"],
    ("train",): ["--output", "--config", "--preset", "--set", "--overwrite"],
    ("ask",): ["--stdin", "--max-tokens", "--temperature", "--top-p", "--seed"],
    ("config",): ["--config", "--preset", "--set", "--reference"],
    ("data",): ["check", "split"],
    ("data", "check"): ["--config", "--preset", "--set", "--json"],
    ("data", "split"): ["--val-fraction", "--seed", "--out-dir", "--overwrite"],
}


@pytest.mark.parametrize("command", list(HELP), ids=lambda c: " ".join(c) or "afinar")
def test_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout
    for option in HELP[command]:
        assert option in result.stdout, f"{option} missing from `{' '.join(command)} --help`"


def test_config_error_exits_2_without_traceback(tmp_path):
    result = invoke("train", "--output", tmp_path / "X", "--set", "train.lerning_rate=1")
    assert_user_error(result, "train.lerning_rate", "train.learning_rate")
    assert not (tmp_path / "X").exists()


def test_config_file_error_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: 0\n")
    result = invoke("config", "--config", bad)
    assert_user_error(result, str(bad), "train.batch_size")


def test_config_and_preset_are_exclusive(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {max_steps: 3}\n")
    assert_user_error(invoke("config", "--config", cfg, "--preset", "cpu"), "not both")


def test_config_prints_resolved_yaml():
    import yaml

    result = invoke("config", "--set", "train.max_steps=200", "--set", "lora.rank=4")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["max_steps"] == 200 and resolved["lora"]["rank"] == 4
    assert resolved["model"]["base"] == "smollm2-135m-instruct"


def test_config_reference_lists_keys():
    result = invoke("config", "--reference")
    assert result.exit_code == 0, result.output
    for key in ("train.learning_rate", "model.quantization", "lora.rank", "data.system_prompt"):
        assert key in result.stdout


def test_data_check(tiny_model, qa_files):
    train, val = qa_files
    result = invoke("data", "check", train.parent, "--set", f"model.base={tiny_model}")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "examples" in out and "train" in out and "val" in out
    row = next(line for line in out.splitlines() if "examples" in line)
    assert "6" in row and "2" in row  # 6 training, 2 validation examples
    assert "Questions in both train and val: 0" in out


def test_data_check_takes_the_bundled_names_the_presets_use(tiny_model):
    result = invoke("data", "check", "bundled:farense/val.jsonl", "--set", f"model.base={tiny_model}", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"][str(Path(afinar.__file__).parent / "bundled/farense/val.jsonl")]["examples"] > 50
    assert_user_error(invoke("data", "check", "bundled:farense/nope.jsonl"), "no such bundled file", "bundled:farense/train.jsonl")


def test_version_and_python_dash_m():
    assert invoke("--version").stdout.strip() == f"afinar {afinar.__version__}"
    out = subprocess.run([sys.executable, "-m", "afinar", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"afinar {afinar.__version__}", out.stderr


def test_data_check_json(tiny_model, tiny_tokenizer, qa_files):
    train, _ = qa_files
    result = invoke("data", "check", train, "--set", f"model.base={tiny_model}", "--set", "train.max_seq_length=32", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    r = report["files"][str(train)]
    assert r["examples"] == 6 and r["with_keywords"] == 6 and (r["shape"], r["format"]) == ("question/answer", "jsonl")
    assert r["tokens"]["min"] <= r["tokens"]["p50"] <= r["tokens"]["max"]
    from afinar import data

    lengths = [len(data.encode(e, tiny_tokenizer, 10**9).input_ids) for e in data.read_jsonl(train)]
    assert r["truncated"] == sum(n > 32 for n in lengths) > 0
    assert (r["tokens"]["min"], r["tokens"]["max"], r["tokens"]["total"]) == (min(lengths), max(lengths), sum(lengths))
    assert report["max_seq_length"] == 32


def test_data_check_reports_duplicates_and_overlap(tiny_model, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", qa_rows(QA[:3] + QA[:1]))
    write_jsonl(tmp_path / "val.jsonl", qa_rows(QA[:1]))
    result = invoke("data", "check", tmp_path, "--set", f"model.base={tiny_model}", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["files"][str(tmp_path / "train.jsonl")]["duplicates"] == 1
    assert report["train_val_overlap"] == 1


def test_data_check_bad_line(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(QA[:2]))
    with open(path, "a") as f:
        f.write('{"question": "sem resposta"}\n')
    result = invoke("data", "check", path, "--set", f"model.base={tiny_model}")
    assert_user_error(result, f"{path}:3")


def test_data_check_bad_line_with_brackets(tiny_model, tmp_path):
    """Data text is printed verbatim: '[/INST]' or '[bold]' in a line is not console markup."""
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(QA[:1]))
    with open(path, "a") as f:
        f.write('{"question": "O que faz [/INST] e [bold]isto[/bold]?", "answer": \n')
    result = invoke("data", "check", path, "--set", f"model.base={tiny_model}")
    assert_user_error(result, f"{path}:2", "[/INST]", "[bold]isto[/bold]")


def test_data_check_missing_path(tmp_path):
    assert_user_error(invoke("data", "check", tmp_path / "nope.jsonl"), "not found")


def test_data_split(tmp_path):
    rows = [{"question": f"Pergunta {i}?", "answer": f"Resposta {i}."} for i in range(30)]
    src = write_jsonl(tmp_path / "all.jsonl", rows)
    out = tmp_path / "out"
    result = invoke("data", "split", src, "--val-fraction", "0.2", "--seed", "1", "--out-dir", out)
    assert result.exit_code == 0, result.output
    assert (out / "train.jsonl").is_file() and (out / "val.jsonl").is_file()
    assert len((out / "val.jsonl").read_text().splitlines()) == 6
    said = " ".join(result.stdout.split())  # the console wraps long lines
    assert "(24 examples)" in said and "(6 examples)" in said


def test_data_split_refuses_to_overwrite_input(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", [{"question": f"P{i}?", "answer": "R."} for i in range(10)])
    assert_user_error(invoke("data", "split", src), "overwrite")


def test_data_split_bad_fraction(tmp_path):
    src = write_jsonl(tmp_path / "all.jsonl", [{"question": f"P{i}?", "answer": "R."} for i in range(10)])
    assert_user_error(invoke("data", "split", src, "--val-fraction", "1.5", "--out-dir", tmp_path / "o"), "--val-fraction")


@pytest.mark.parametrize("make", [lambda p: p, lambda p: p / "missing"], ids=["not_a_run", "missing"])
def test_ask_on_non_run_prints_json_error(tmp_path, make):
    folder = make(tmp_path)
    result = invoke("ask", folder, "Quando foi fundado o Farense?")
    assert result.exit_code == 2
    assert result.stdout.strip() == ""
    err = json.loads(result.stderr.strip().splitlines()[-1])
    assert set(err) == {"error"}
    assert str(folder) in err["error"]["message"] and err["error"]["type"] == "user_error"


def test_ask_needs_exactly_one_source_of_questions(tmp_path):
    for args in (("ask", tmp_path), ("ask", tmp_path, "pergunta?", "--stdin")):
        result = invoke(*args)
        assert result.exit_code == 2
        assert "error" in json.loads(result.stderr.strip())


# ---------------------------------------------------------------- train and ask on the tiny model


@pytest.fixture(scope="module")
def cli_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_run")
    train = write_jsonl(root / "train.jsonl", qa_rows(QA[:4]))
    out = root / "run"
    result = invoke(
        "train", "--output", out, "--set", f"model.base={tiny_model}", "--set", "model.quantization=none",
        "--set", f"data.train={train}", "--set", "data.val=null", "--set", "train.max_steps=2",
        "--set", "train.warmup_steps=1", "--set", "train.log_every=1",
    )
    return out, result


def test_train_writes_a_run(cli_run):
    out, result = cli_run
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file() and (out / "metadata.json").is_file()
    progress = " ".join(result.stderr.split())
    assert "step 2/2" in progress and f"Run written to {out}" in progress


def test_train_refuses_existing_output(cli_run, tiny_model):
    out, _ = cli_run
    before = (out / "adapter_model.safetensors").read_bytes()
    result = invoke("train", "--output", out, "--set", f"model.base={tiny_model}", "--set", "model.quantization=none",
                    "--set", "data.train=bundled:farense/train.jsonl")
    assert_user_error(result, "already exists", "--overwrite")
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_ask_prints_one_json_object(cli_run):
    out, _ = cli_run
    result = invoke("ask", out, "Quando foi fundado o Farense?", "--max-tokens", "5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    reply = json.loads(lines[0])
    assert set(reply) == {"answer", "model", "adapter", "prompt_tokens", "completion_tokens", "latency_ms", "tokens_per_s"}
    assert reply["adapter"] == str(out) and 0 < reply["completion_tokens"] <= 5


def test_ask_stdin_answers_good_lines_and_reports_bad_ones(cli_run):
    out, _ = cli_run
    lines = [json.dumps({"question": "Onde joga o Farense?", "id": 1}), "not json", json.dumps("Qual é a cor do Farense?"), "",
             json.dumps({"q": 1, "id": "x"})]
    result = invoke("ask", out, "--stdin", "--max-tokens", "3", input="\n".join(lines) + "\n")
    assert result.exit_code == 2  # some lines failed
    replies = [json.loads(line) for line in result.stdout.strip().splitlines()]  # one line out per line in, in order
    assert ["answer" in r for r in replies] == [True, False, True, False, False]
    assert replies[0]["id"] == 1 and replies[4]["id"] == "x"
    errors = [r["error"]["message"] for r in replies if "error" in r]
    assert errors[0].startswith("stdin:2:") and errors[1].startswith("stdin:4:") and errors[2].startswith("stdin:5:")