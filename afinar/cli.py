"""The `afinar` command line: demo, data check/split, config, train, ask.

Heavy imports (torch, transformers) happen inside commands, so `--help` is instant.
User mistakes (`AfinarError`) print one clear message and exit 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from afinar.errors import AfinarError

# Quiet the libraries' own progress bars and advice; afinar prints what matters.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF conversion and weight loading bars; ours are rich

app = typer.Typer(
    help="afinar: fine-tune an open LLM on your own Q&A data (LoRA / QLoRA), measure it, and answer in JSON.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect and split JSONL datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (see configs/).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="A preset from configs/ by name, or 'auto' to pick by hardware.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one key, e.g. --set train.max_steps=200 (repeatable).")]


def user_errors(json_errors: bool = False):
    """Turn AfinarError into a clean message (or a JSON object on stderr) and exit code 2."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except AfinarError as e:
                if json_errors:
                    print(json.dumps({"error": {"message": str(e), "type": "user_error"}}, ensure_ascii=False), file=sys.stderr)
                else:
                    err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
                raise typer.Exit(getattr(e, "exit_code", 2)) from None
            except KeyboardInterrupt:
                err_console.print("[yellow]Interrupted.[/]")
                raise typer.Exit(130) from None

        return inner

    return wrap


def quiet_libraries() -> None:
    """transformers' own progress bars (GGUF conversion, weight loading) only clutter ours."""
    import logging as std_logging
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    # bitsandbytes announces an optional hub-downloaded CPU kernel we deliberately do without.
    std_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(std_logging.ERROR)
    # peft still calls a transformers API deprecated for v6; not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning)


def resolve_config(config: Path | None, preset: str | None, overrides: list[str] | None, quiet: bool = False):
    from afinar import config as C

    if config and preset:
        raise AfinarError("Pass either --config FILE or --preset NAME, not both.")
    if preset == "auto":
        from afinar import hardware

        hw = hardware.detect()
        preset, reason = hardware.pick_preset(hw)
        if not quiet:
            err_console.print(f"--preset auto: picked [bold]{preset}[/] ({reason}).")
    path = C.preset_path(preset) if preset else config
    return C.load_config(path, overrides or [])


# ---------------------------------------------------------------- commands


@app.command()
@user_errors()
def demo(
    output: Annotated[Path, typer.Option(help="Run folder to (re)write.")] = Path("runs/demo"),
    set_: SetOpt = None,
    full: Annotated[bool, typer.Option(help="Train the cpu preset's full schedule instead of the short demo one.")] = False,
):
    """QLoRA-tune the embedded SmolLM2-135M-Instruct on the bundled Farense data, then answer and score it."""
    from afinar.demo import run_demo

    quiet_libraries()
    run_demo(output, set_ or [], console, full=full)


@app.command()
@user_errors()
def train(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder to write (must not exist unless --overwrite).")] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder (only once the new run is complete).")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the unfinished run RUN (RUN.partial/) from its newest checkpoint.")] = None,
    force: Annotated[bool, typer.Option(help="With --resume: continue even if the config differs from the run's.")] = False,
):
    """Fine-tune with LoRA or QLoRA and write a self-contained run folder."""
    from afinar.progress import TrainingDisplay
    from afinar.train import run_training

    quiet_libraries()
    if resume is not None:
        if output is not None and output != resume:
            raise AfinarError(f"--resume {resume} and --output {output} name different runs: give one, or the same.")
        output = resume
        saved = resume.with_name(resume.name + ".partial") / "training_config.json"
        if not (config or preset or set_) and saved.is_file():
            from afinar.config import build_config

            cfg = build_config(json.loads(saved.read_text(encoding="utf-8")), source=str(saved))
        else:
            cfg = resolve_config(config, preset, set_)
    elif output is None:
        raise AfinarError("Missing --output RUN: the folder to write the run into.")
    else:
        cfg = resolve_config(config, preset, set_)
    path = run_training(cfg, output, overwrite, on_event=TrainingDisplay(err_console, cfg.train.log_every),
                        resume=resume is not None, force=force)
    stopped = json.loads((path / "metadata.json").read_text()).get("stopped")
    if stopped and stopped["reason"] == "diverged":
        raise typer.Exit(3)


@app.command()
@user_errors(json_errors=True)
def ask(
    run: Annotated[Path, typer.Argument(help="A run folder written by `afinar train`.")],
    question: Annotated[Optional[str], typer.Argument(help="The question (omit with --stdin).")] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Read JSONL questions ({\"question\": ...} or a JSON string) from stdin; one JSON line out each.")] = False,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most new tokens per answer.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy (default, reproducible).")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: int = 0,
):
    """Answer a question with a trained run; prints one JSON object."""
    if stdin == (question is not None):
        raise AfinarError("Give a question, or --stdin, but not both.")
    from afinar.inference import Predictor

    quiet_libraries()
    predictor = Predictor(run)
    opts = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if not stdin:
        print(json.dumps(predictor.ask(question, **opts), ensure_ascii=False))
        return
    failed = False
    for lineno, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            q = item.get("question") if isinstance(item, dict) else item
            if not isinstance(q, str) or not q.strip():
                raise ValueError('expected {"question": "..."} or a JSON string')
        except ValueError as e:
            failed = True
            print(json.dumps({"error": {"message": f"stdin:{lineno}: {e}", "type": "user_error"}}), file=sys.stderr)
            continue
        print(json.dumps(predictor.ask(q, **opts), ensure_ascii=False), flush=True)
    if failed:
        raise typer.Exit(2)


@app.command("config")
@user_errors()
def show_config(
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    reference: Annotated[bool, typer.Option(help="List every key with its default and meaning.")] = False,
):
    """Print the resolved config (defaults + file + --set), or the reference of every key."""
    import yaml

    from afinar.config import describe_fields

    if reference:
        table = Table("key", "default", "meaning", show_lines=False)
        for key, default, desc in describe_fields():
            table.add_row(key, default, desc)
        console.print(table)
        return
    cfg = resolve_config(config, preset, set_)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="", highlight=False)


@data_app.command("check")
@user_errors()
def data_check(
    path: Annotated[Path, typer.Argument(help="A JSONL file, or a folder with train.jsonl / val.jsonl.")],
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Validate data and report counts, token lengths, truncation, duplicates and train/val overlap."""
    from afinar import data as D
    from afinar import datacheck, models

    cfg = resolve_config(config, preset, set_, quiet=as_json)
    # Read (and so validate) every file before loading a tokenizer: data errors come first, and fast.
    read = {name: (file, D.read_jsonl(file)) for name, file in datacheck.find_files(path).items()}
    from transformers import AutoTokenizer

    resolved = models.resolve(cfg.model.base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except OSError as e:
        raise models.hub_load_error(cfg.model.base, e) from None
    report = datacheck.check(read, cfg, tokenizer)
    report["tokenizer"] = cfg.model.base
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    files = report["files"]
    table = Table("", *(r["split"] for r in files.values()))
    rows = [("file", lambda f, r: f), ("examples", lambda f, r: r["examples"]), ("shape", lambda f, r: r["shape"]),
            ("with keywords", lambda f, r: r["with_keywords"])]
    rows += [(f"tokens {k}", lambda f, r, k=k: r["tokens"][k]) for k in ("min", "mean", "p50", "p95", "max", "total")]
    rows += [("answer tokens (mean)", lambda f, r: r["answer_tokens_mean"]),
             (f"truncated at {cfg.train.max_seq_length}", lambda f, r: r["truncated"]),
             ("no answer token left", lambda f, r: r["no_answer_within_max"]),
             ("duplicate pairs", lambda f, r: r["duplicates"]),
             ("questions with 2+ answers", lambda f, r: r["conflicting_answers"])]
    for label, get in rows:
        table.add_row(label, *(escape(str(get(f, r))) for f, r in files.items()))
    console.print(table)
    console.print(f"Tokenizer: {cfg.model.base}; train.max_seq_length={cfg.train.max_seq_length}.")
    if "train_val_overlap" in report:
        console.print(f"Questions in both train and val: {report['train_val_overlap']}")
    for w in datacheck.warnings(report):
        console.print(f"[yellow]warning:[/] {escape(w)}")
    if not datacheck.warnings(report):
        console.print("[green]OK[/]")


@data_app.command("split")
@user_errors()
def data_split(
    file: Annotated[Path, typer.Argument(help="JSONL file to split.")],
    val_fraction: Annotated[float, typer.Option(help="Share of distinct questions for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Same seed, same split.")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where to write train.jsonl and val.jsonl (default: beside FILE).")] = None,
):
    """Deterministic train/val split; the same question never lands on both sides."""
    from afinar.data import split_file

    train_path, val_path, n_train, n_val = split_file(file, val_fraction, seed, out_dir)
    console.print(escape(f"Wrote {train_path} ({n_train} examples) and {val_path} ({n_val} examples)."))


if __name__ == "__main__":
    app()
