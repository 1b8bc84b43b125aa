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
    metadata = path / "metadata.json"  # on rank 0's node only, under torchrun across nodes
    stopped = json.loads(metadata.read_text()).get("stopped") if metadata.is_file() else None
    if stopped and stopped["reason"] == "diverged":
        raise typer.Exit(3)


@app.command()
@user_errors(json_errors=True)
def ask(
    run: Annotated[Path, typer.Argument(help="A run folder written by `afinar train`.")],
    question: Annotated[Optional[str], typer.Argument(help="The question (omit with --stdin).")] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Read JSON lines ({\"question\": ..., \"id\": ...} or a JSON string) from stdin; exactly one JSON line out each, in order.")] = False,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most new tokens per answer.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="0 = greedy (default, reproducible).")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: int = 0,
):
    """Answer a question with a trained run; prints one JSON object (with --stdin: one JSON line per input line)."""
    if stdin == (question is not None):
        raise AfinarError("Give a question, or --stdin, but not both.")
    from afinar.inference import Predictor

    quiet_libraries()
    predictor = Predictor(run)
    opts = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if not stdin:
        print(json.dumps(predictor.ask(question, **opts), ensure_ascii=False))
        return
    from afinar.ask_lines import answer_lines

    if answer_lines(predictor, opts, sys.stdin, sys.stdout):
        raise typer.Exit(2)


@app.command("eval")
@user_errors()
def eval_run(
    run: Annotated[Path, typer.Argument(help="A run folder written by `afinar train`.")],
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="JSONL to evaluate on (default: the run's validation file); a .txt file: one question per line.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write the results (default: RUN/eval.json).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most new tokens per answer.")] = 128,
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per generate call when answering them all.")] = 16,
    latency_samples: Annotated[int, typer.Option(min=0, help="Questions asked one at a time for latency and tokens/s.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")] = False,
):
    """Validation loss, answer quality (fact recall, chrF), latency, tokens/s and memory of a run; writes eval.json."""
    from afinar import atomic, evaluate, report

    quiet_libraries()
    say = (lambda msg: None) if as_json else (lambda msg: err_console.print(f"[dim]{escape(msg)}[/]", highlight=False))
    result = evaluate.evaluate_run(run, data, max_tokens, batch_size, latency_samples, on_progress=say)
    target = output or run / "eval.json"
    atomic.write_json(target, result)
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    table = Table("", escape(str(run)))
    for label, value in report.eval_rows(result):
        table.add_row(label, value)
    console.print(table)
    q = result["quality"]
    console.print(escape(f"{len(result['answers'])} questions from {result['data']}; fact recall over {q['scored']} "
                         f"with keywords. Written: {target}"), highlight=False)


@app.command()
@user_errors()
def compare(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Two or more run folders (omit with --train).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for comparison_results.json, comparison.md and charts.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Questions for every run: JSONL data, or .txt one per line (default: the first run's validation file).")] = None,
    train_config: Annotated[Optional[str], typer.Option("--train", help="Train the LoRA and QLoRA variants of this config file (or preset name) first, then compare them.")] = None,
    set_: SetOpt = None,
    runs_dir: Annotated[Optional[Path], typer.Option(help="With --train: where the two runs go (default: runs/<output folder name>).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most new tokens per answer.")] = 128,
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per generate call when answering them all.")] = 16,
    latency_samples: Annotated[int, typer.Option(min=0, help="Questions asked one at a time for latency and tokens/s.")] = 10,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder (and, with --train, existing runs).")] = False,
):
    """Ask every run the same questions and report them side by side (LoRA vs QLoRA ratios, charts)."""
    import shlex

    from afinar import compare as C
    from afinar import report

    if output is None:
        raise AfinarError("Missing --output DIR: the folder to write the comparison into.")
    if output.exists() and not overwrite:
        raise AfinarError(f"Output folder {output} already exists. Choose another --output, or pass --overwrite to replace it.")
    if train_config and runs:
        raise AfinarError("Give run folders to compare, or --train CONFIG to train them, not both.")
    if set_ and not train_config:
        raise AfinarError("--set applies to --train only (it changes how the runs are trained).")
    say = lambda msg: err_console.print(f"[bold]{escape(msg)}[/]", highlight=False)
    args = ["afinar", "compare", *map(str, runs or [])]
    if train_config:
        args += ["--train", train_config, *(a for s in set_ or [] for a in ("--set", s))]
    args += ["--output", str(output)] + (["--prompts", str(prompts)] if prompts else [])
    if train_config:
        runs = C.train_variants(train_config, set_ or [], runs_dir or Path("runs") / output.name, overwrite, say)
    results = C.compare_runs(runs or [], output, prompts, max_tokens, latency_samples, batch_size, overwrite,
                             command=shlex.join(args), say=say)
    if results["ratios"]:
        table = Table("", f"{results['ratios']['lora']} (LoRA)", f"{results['ratios']['qlora']} (QLoRA)", "QLoRA / LoRA")
        for row in report.ratio_rows(results["ratios"]):
            table.add_row(*row)
        console.print(table)
    console.print(escape(f"Written: {output}/comparison.md, comparison_results.json, loss.png, speed.png, memory.png"))


@app.command()
@user_errors()
def serve(
    run: Annotated[Path, typer.Argument(help="A run folder written by `afinar train`.")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 opens it to the network (then set an API key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one (the URL is printed).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="AFINAR_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics.")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(help="Let browser pages from this origin call the API (repeatable); CORS is off without it.")] = None,
    set_: SetOpt = None,
):
    """Serve a run over HTTP: OpenAI's chat completions API (+ streaming) and /v1/ask, batching concurrent requests."""
    from afinar.config import build_config
    from afinar.runs import load_run

    cfg, _ = load_run(run)  # a wrong folder is a clean error before anything binds
    for assignment in set_ or []:
        if not assignment.strip().startswith("serve."):
            raise AfinarError(f"--set {assignment!r}: afinar serve takes serve.* settings only (see `afinar config --reference`); "
                              "the model and adapter come from the run folder.")
    serve_cfg = build_config(cfg.model_dump(mode="json"), set_ or [], source=f"{run}/training_config.json + --set").serve
    given = api_key if api_key is not None else os.environ.get("AFINAR_API_KEY")  # click reads '' as unset
    if given is not None and not given.strip():
        raise AfinarError("The API key is empty (AFINAR_API_KEY='' or --api-key ''): that would serve without "
                          "authentication. Set a real key (e.g. export AFINAR_API_KEY=$(openssl rand -hex 16)), "
                          "or unset AFINAR_API_KEY to serve without one on 127.0.0.1.")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err_console.print(f"[yellow]warning:[/] listening on {escape(host)} without an API key: anyone who reaches this port can use it.")
    quiet_libraries()
    from afinar.serve import create_app, run as run_server

    run_server(create_app(run, cfg=serve_cfg, api_key=api_key, cors_origins=cors_origin or []), host, port)


@app.command()
@user_errors()
def export(
    source: Annotated[Path, typer.Argument(help="A run folder, or an adapter folder (PEFT or mlx-lm).")],
    to: Annotated[Optional[str], typer.Option("--to", help="Adapter format to write: 'peft' or 'mlx'.")] = None,
    merged: Annotated[Optional[Path], typer.Option("--merged", help="Write base + adapter merged (dequantized, full precision) as a plain HF model folder here.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="With --to: the folder to write (default: SOURCE-peft or SOURCE-mlx).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="With --merged: 'torch' or 'mlx' (default: the run's backend).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
):
    """Convert an adapter between PEFT and mlx-lm, or merge it into its base for vLLM / transformers / mlx-lm."""
    from afinar import export as E

    if (to is None) == (merged is None):
        raise AfinarError("Give --to peft|mlx (convert the adapter) or --merged OUT (merge into the base), one of them.")
    if backend not in (None, "torch", "mlx"):
        raise AfinarError(f"--backend {backend!r}: choose 'torch' or 'mlx'.")
    quiet_libraries()
    if to is not None:
        path = E.export_adapter(source, to, output, overwrite)
        console.print(f"Adapter ({to}) written to {path}")
    else:
        if output is not None:
            raise AfinarError("--output goes with --to; with --merged, the folder is the value of --merged.")
        path = E.export_merged(source, merged, overwrite, backend)
        console.print(f"Merged model written to {path} (load it with AutoModelForCausalLM.from_pretrained, vLLM or mlx_lm.load)")


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
