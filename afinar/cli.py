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
from afinar.quiet import quiet_environment, quiet_libraries

quiet_environment()  # before any library is imported: their own bars and advice; afinar prints what matters

app = typer.Typer(
    help="afinar: fine-tune an open LLM on your own Q&A data (LoRA / QLoRA), measure it, and answer in JSON.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from afinar import __version__

        print(f"afinar {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print afinar's version and exit.")] = False) -> None:
    pass


data_app = typer.Typer(help="Inspect and split datasets (JSONL, JSON, Parquet, saved Hugging Face datasets).", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (see configs/).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="A preset from configs/ by name, or 'auto' to pick by hardware.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one key, e.g. --set train.max_steps=200 (repeatable).")]
NoVerifyOpt = Annotated[bool, typer.Option("--no-verify", help="Use the run even if its files changed after training "
                                           "(checksums); its structure is still checked.")]


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


def require_extra(extra: str, what: str, *modules: str) -> None:
    """Stop with the pip command when an optional dependency of `what` is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AfinarError(f"{what} needs {' and '.join(missing)}, not installed: pip install 'afinar[{extra}]'")


# ---------------------------------------------------------------- commands


@app.command()
@user_errors()
def demo(
    output: Annotated[Path, typer.Option(help="Run folder to (re)write.")] = Path("runs/demo"),
    set_: SetOpt = None,
    full: Annotated[bool, typer.Option(help="Train the cpu preset's full schedule instead of the short demo one.")] = False,
    questions: Annotated[Optional[int], typer.Option(min=1, help="Score only the first N validation and test questions (a quick check of an install).")] = None,
):
    """QLoRA-tune the embedded SmolLM2-135M-Instruct on the bundled Farense data, then answer and score it."""
    from afinar.demo import run_demo

    quiet_libraries()
    run_demo(output, set_ or [], console, full=full, questions=questions)


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
        partial = resume.with_name(resume.name + ".partial")
        saved = partial / "training_config.json"
        if config or preset:
            cfg = resolve_config(config, preset, set_)
        elif saved.is_file():  # the run's own settings, with --set's changes on top (then --force to accept them)
            from afinar.config import build_config

            cfg = build_config(json.loads(saved.read_text(encoding="utf-8")), set_ or [], source=f"{saved} + --set")
        else:
            done = (f" {resume} is a finished run: train a new one with --output NEW, or replace it with "
                    f"--output {resume} --overwrite.") if (resume / "metadata.json").is_file() else ""
            raise AfinarError(f"Nothing to resume: {partial} does not hold an unfinished run.{done}")
    elif output is None:
        raise AfinarError("Missing --output RUN: the folder to write the run into.")
    else:
        cfg = resolve_config(config, preset, set_)
    result = run_training(cfg, output, overwrite, on_event=TrainingDisplay(err_console, cfg.train.log_every),
                          resume=resume is not None, force=force)
    if result.diverged:
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
    no_verify: NoVerifyOpt = False,
):
    """Answer a question with a trained run; prints one JSON object (with --stdin: one JSON line per input line)."""
    if stdin == (question is not None):
        raise AfinarError("Give a question, or --stdin, but not both.")
    from afinar.inference import Predictor

    quiet_libraries()
    predictor = Predictor(run, verify=not no_verify)
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
    no_verify: NoVerifyOpt = False,
):
    """Validation loss, answer quality (fact recall, chrF), latency, tokens/s and memory of a run; writes eval.json."""
    from afinar import evaluate, report

    quiet_libraries()
    target = output or run / "eval.json"
    evaluate.check_output(target)  # a bad --output fails now, not after the evaluation
    result = evaluate.evaluate_run(run, data, max_tokens, batch_size, latency_samples,  # stages show on stderr
                                   verify=not no_verify)
    evaluate.write_results(target, result)
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
    no_verify: NoVerifyOpt = False,
):
    """Ask every run the same questions and report them side by side (LoRA vs QLoRA ratios, charts)."""
    import shlex

    from afinar import atomic, oserrors, report
    from afinar import compare as C

    if output is None:
        raise AfinarError("Missing --output DIR: the folder to write the comparison into.")
    atomic.refuse_existing(output, overwrite)
    oserrors.check_writable(output)  # before --train trains two runs
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
    warn = lambda msg: err_console.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False)
    results = C.compare_runs(runs or [], output, prompts, max_tokens, latency_samples, batch_size, overwrite,
                             command=shlex.join(args), say=say, warn=warn, verify=not no_verify)
    head, rows = report.figure_rows(results)
    table = Table(*head)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(escape(f"Written: {output}/ ({', '.join(sorted(p.name for p in output.iterdir()))})"))


@app.command()
@user_errors()
def serve(
    run: Annotated[Path, typer.Argument(help="A run folder written by `afinar train`.")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 opens it to the network (then set an API key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one (the URL is printed).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="AFINAR_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics.")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(help="Let browser pages from this origin call the API (repeatable); CORS is off without it.")] = None,
    set_: SetOpt = None,
    no_verify: NoVerifyOpt = False,
):
    """Serve a run over HTTP: OpenAI's chat completions API (+ streaming) and /v1/ask, batching concurrent requests."""
    require_extra("serve", "afinar serve", "fastapi", "uvicorn")
    from afinar.config import build_config
    from afinar.runs import load_run

    cfg, _ = load_run(run, verify=not no_verify)  # a wrong or damaged folder is a clean error before anything binds
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

    run_server(create_app(run, cfg=serve_cfg, api_key=api_key, cors_origins=cors_origin or [], verify=not no_verify),
               host, port)


@app.command()
@user_errors()
def export(
    source: Annotated[Path, typer.Argument(help="A run folder, or an adapter folder (PEFT or mlx-lm).")],
    gguf_file: Annotated[Optional[Path], typer.Argument(metavar="OUT.gguf", help="With --to gguf: the GGUF file to write.")] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="'peft' or 'mlx' (adapter format), or 'gguf' (merged model as one GGUF file for llama.cpp / Ollama / LM Studio).")] = None,
    merged: Annotated[Optional[Path], typer.Option("--merged", help="Write base + adapter merged (dequantized, full precision) as a plain HF model folder here.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="With --to peft|mlx: the folder to write (default: SOURCE-peft or SOURCE-mlx).")] = None,
    type_: Annotated[Optional[str], typer.Option("--type", help="With --to gguf: 'f16' (default) or 'q8_0' (about half the size).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="With --merged or --to gguf: 'torch' or 'mlx' (default: the run's backend).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder or file.")] = False,
    no_verify: NoVerifyOpt = False,
):
    """Convert an adapter between PEFT and mlx-lm, merge it into its base for vLLM / transformers / mlx-lm, or write a GGUF."""
    from afinar import export as E

    if (to is None) == (merged is None):
        raise AfinarError("Give --to peft|mlx (convert the adapter), --to gguf OUT.gguf (GGUF file) or --merged OUT (merge into the base), one of them.")
    if backend not in (None, "torch", "mlx"):
        raise AfinarError(f"--backend {backend!r}: choose 'torch' or 'mlx'.")
    if (to == "gguf") != (gguf_file is not None):
        raise AfinarError("--to gguf takes the file to write after the run: afinar export RUN --to gguf OUT.gguf "
                          "(and only --to gguf takes that second argument).")
    if type_ is not None and to != "gguf":
        raise AfinarError("--type goes with --to gguf.")
    quiet_libraries()
    if to == "gguf":
        if output is not None:
            raise AfinarError("--output goes with --to peft|mlx; with --to gguf, give the file after the run: afinar export RUN --to gguf OUT.gguf")
        path = E.export_gguf(source, gguf_file, type_ or "f16", overwrite, backend, verify=not no_verify)
        console.print(f"GGUF ({type_ or 'f16'}) written to {path} (llama-server -m {path} --jinja; Ollama needs a Modelfile with the chat template: see the GUIDE's GGUF section)")
    elif to is not None:
        path = E.export_adapter(source, to, output, overwrite, verify=not no_verify)
        console.print(f"Adapter ({to}) written to {path}")
    else:
        if output is not None:
            raise AfinarError("--output goes with --to; with --merged, the folder is the value of --merged.")
        path = E.export_merged(source, merged, overwrite, backend, verify=not no_verify)
        from afinar.models import auto_class_name

        console.print(f"Merged model written to {path} (load it with {auto_class_name(path)}.from_pretrained, vLLM or mlx_lm.load)")


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
    path: Annotated[Path, typer.Argument(help="A data file (.jsonl, .json, .parquet), a saved Hugging Face dataset folder, "
                                             "or a folder with train / val data.")],
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Validate data and report counts, token lengths, truncation, duplicates and train/val overlap."""
    from afinar import data as D
    from afinar import datacheck, models

    cfg = resolve_config(config, preset, set_, quiet=as_json)
    if str(path).startswith(D.BUNDLED):  # the names the presets use: bundled:farense/train.jsonl
        path = D.resolve_path(str(path))
    # Read (and so validate) every file before loading a tokenizer: data errors come first, and fast.
    read = {name: D.read_examples(file) for name, file in datacheck.find_files(path).items()}
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
    rows = [("file", lambda f, r: f), ("format", lambda f, r: r["format"]), ("shape", lambda f, r: r["shape"]),
            ("examples", lambda f, r: r["examples"]), ("with keywords", lambda f, r: r["with_keywords"])]
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
    for r in files.values():
        for notice in r["notices"]:
            console.print(f"[cyan]note:[/] {escape(notice)}", highlight=False)
    for w in datacheck.warnings(report):
        console.print(f"[yellow]warning:[/] {escape(w)}")
    if not datacheck.warnings(report):
        console.print("[green]OK[/]")


@data_app.command("split")
@user_errors()
def data_split(
    file: Annotated[Path, typer.Argument(help="Data file to split (.jsonl, .json, .parquet, or a saved Hugging Face dataset).")],
    val_fraction: Annotated[float, typer.Option(help="Share of distinct questions for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Same seed, same split.")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where to write train.jsonl and val.jsonl (default: beside FILE).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing train.jsonl / val.jsonl.")] = False,
):
    """Deterministic train/val split into JSONL; the same question never lands on both sides."""
    from afinar.data import split_file

    split = split_file(file, val_fraction, seed, out_dir, overwrite)
    for notice in split.notices:
        err_console.print(f"[cyan]note:[/] {escape(notice)}", highlight=False)
    console.print(escape(f"Wrote {split.train_path} ({split.n_train} examples) and {split.val_path} ({split.n_val} examples)."))


if __name__ == "__main__":
    app()
