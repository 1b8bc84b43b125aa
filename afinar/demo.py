"""`afinar demo`: the whole job on the embedded model, on a laptop CPU, in a few minutes.

QLoRA-tunes SmolLM2-135M-Instruct on the bundled Farense data with the `cpu` preset and
a shorter schedule, then answers validation questions it never saw in those words and
scores fact recall over the whole validation file and, apart, over the held-out test file
(questions never used during training nor to choose any setting: the figure to quote).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from afinar import atomic, data, evaluate
from afinar.config import load_config, preset_path
from afinar.inference import Predictor
from afinar.progress import TrainingDisplay
from afinar.train import run_training

# One epoch at a higher rate instead of the preset's four, so `make demo` fits 10 minutes on
# 2 CPU cores; `afinar demo --full` trains the whole schedule (benchmarks/results/cpu-preset-sweep.json
# shows what each schedule reaches).
DEMO_OVERRIDES = ["train.epochs=1", "train.learning_rate=3e-3", "train.eval_every=45"]
SHOWN = 3


def run_demo(output: str | Path = "runs/demo", extra: list[str] = (), console: Console | None = None,
             full: bool = False) -> dict:
    """Train, answer, score. `full=True` keeps the cpu preset's whole schedule (slower, better)."""
    console = console or Console()
    started = time.time()
    cfg = load_config(preset_path("cpu"), [*([] if full else DEMO_OVERRIDES), *extra])
    console.rule("[bold]afinar demo: QLoRA on the embedded SmolLM2-135M-Instruct, bundled Farense data")
    run = run_training(cfg, output, overwrite=True, on_event=TrainingDisplay(console, log_every=10)).output

    console.rule("[bold]Answers to validation questions (JSON, as `afinar ask` prints them)")
    predictor = Predictor(run)
    val = data.read_setting(cfg.data.val).examples
    for ex in val[:SHOWN]:  # one at a time, so latency and tokens/s are those of a single `ask`
        console.print(f"[bold]Q:[/] {escape(ex.question)}")
        console.print_json(json.dumps(predictor.ask(ex.question), ensure_ascii=False))
        console.print(f"[dim]reference:[/] {escape(ex.answer)}\n")

    score, answers = evaluate.recall_on(predictor, val)  # batched: the whole validation file
    test = data.read_setting(cfg.data.test).examples
    test_score, test_answers = evaluate.recall_on(predictor, test)
    result = {
        "run": str(run),
        "fact_recall": score["fact_recall"],
        "hits": score["hits"],
        "scored": score["scored"],
        "test": {**test_score, "answers": _answers(test, test_answers)},
        "schedule": "cpu preset" if full else f"cpu preset + {' '.join(DEMO_OVERRIDES)}",
        "overrides": list(extra),
        "demo_wall_time_s": round(time.time() - started, 1),
        "answers": _answers(val, answers),
    }
    atomic.write_json(Path(run) / "fact_recall.json", result)
    console.rule("[bold]Result")
    console.print(
        f"Test fact recall (held out): [bold]{test_score['hits']}/{test_score['scored']} = {test_score['fact_recall']:.1%}[/]; "
        f"validation: {score['hits']}/{score['scored']} = {score['fact_recall']:.1%} "
        f"(answers containing every keyword of the reference; details in {run}/fact_recall.json)"
    )
    console.print(f"Demo wall time: {result['demo_wall_time_s']:.0f} s. Ask more: .venv/bin/afinar ask {run} \"...\"")
    return result


def _answers(examples, answers) -> list[dict]:
    return [{"question": ex.question, "reference": ex.answer, "keywords": ex.keywords, "answer": a["answer"],
             "recalled": evaluate.recalls(a["answer"], ex.keywords)} for ex, a in zip(examples, answers)]
