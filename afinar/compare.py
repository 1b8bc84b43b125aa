"""`afinar compare`: the same questions through several runs, side by side, measured alike.

Each run is evaluated in its own process (`afinar eval`), so its memory figures and peak
are its own: a process's peak resident memory never goes down, and a second model loaded
in the same process would inherit the first one's. `train_variants` trains the LoRA and
QLoRA variants of one config the same way, one process each, with the same seed and data.

`DIR/comparison_results.json` holds every figure; `DIR/comparison.md` and `DIR/*.png`
are rendered from it (and the runs' metrics) by `afinar.report`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Callable

from afinar import __version__, atomic, evaluate, events, oserrors, plots, report
from afinar.config import load_config, preset_names, preset_path
from afinar.errors import AfinarError
from afinar import runs as runs_contract
from afinar.status import status
from afinar.runs import load_run

VARIANTS = (("lora", "none"), ("qlora", "nf4"))  # (run name, model.quantization)


def _afinar(*args: str) -> list[str]:
    """The command line of an afinar sub-command in a fresh interpreter (the same venv)."""
    return [sys.executable, "-m", "afinar.cli", *args]


def _run(cmd: list[str], echo: Callable[[str], None] | None, stdout: bool = True) -> int:
    """Run a sub-command; its output goes to ours, or line by line to `echo` (a notebook cell has no file descriptor).

    `stdout=False` drops what it prints on stdout (results we read from its file), keeping stderr (progress, errors).
    """
    if echo is None:
        return subprocess.run(cmd, stdout=None if stdout else subprocess.DEVNULL).returncode
    with subprocess.Popen(cmd, stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                          stderr=subprocess.STDOUT if stdout else subprocess.PIPE, text=True, bufsize=1) as proc:
        for line in proc.stdout if stdout else proc.stderr:
            echo(line.rstrip("\n"))
    return proc.returncode


def resolve_config_path(config: str | Path) -> Path:
    """A YAML file, or a preset name (`--train cpu`)."""
    path = Path(config)
    if not path.exists() and str(config) in preset_names():
        return preset_path(str(config))
    return path


def train_variants(config: str | Path, overrides: list[str], runs_dir: Path, overwrite: bool = False,
                   say: Callable[[str], None] = print, only: tuple[str, ...] = ("lora", "qlora"),
                   echo: Callable[[str], None] | None = None) -> list[Path]:
    """Train the LoRA and QLoRA variants of `config` (same seed, data and schedule) into `runs_dir/<name>`.

    One process per variant: a process's peak memory never goes down, so a second training in
    the same process would report the first one's peak. `only` picks some of the variants.
    """
    config = resolve_config_path(config)
    variants = [(name, q) for name, q in VARIANTS if name in only]
    # Validate every variant and destination before the first (long) training starts.
    for name, quantization in variants:
        load_config(config, [*overrides, f"model.quantization={quantization}"])
        atomic.refuse_existing(runs_dir / name, overwrite)
    runs = []
    for name, quantization in variants:
        out = runs_dir / name
        cmd = _afinar("train", "--config", str(config), "--output", str(out),
                      *(a for o in overrides for a in ("--set", o)), "--set", f"model.quantization={quantization}",
                      *(["--overwrite"] if overwrite else []))
        say(f"Training the {name.upper()} variant: afinar {' '.join(cmd[3:])}")
        code = _run(cmd, echo)
        if code != 0:
            raise AfinarError(f"Training the {name.upper()} variant failed (exit {code}); its message is above. "
                              f"Command: afinar {' '.join(cmd[3:])}")
        runs.append(out)
    return runs


def evaluate_in_process(run: Path, data_file: str | Path, out_json: Path, max_tokens: int, latency_samples: int,
                        batch_size: int, echo: Callable[[str], None] | None = None, verify: bool = True) -> dict:
    # --json: no table and no "Written: <scratch file>" line from the sub-process; the comparison shows the figures.
    cmd = _afinar("eval", str(run), "--data", str(data_file), "--output", str(out_json), "--max-tokens", str(max_tokens),
                  "--latency-samples", str(latency_samples), "--batch-size", str(batch_size), "--json",
                  *([] if verify else ["--no-verify"]))
    code = _run(cmd, echo, stdout=False)
    if code != 0:
        raise AfinarError(f"Evaluating {run} failed (exit {code}); its message is above. Command: afinar "
                          f"{' '.join(cmd[3:]).replace(str(out_json), 'RESULT.json')}")
    return json.loads(out_json.read_text(encoding="utf-8"))


def run_names(runs: list[Path]) -> list[str]:
    """Folder names, made unique ('a', 'a-2') so every run has its own column."""
    names: list[str] = []
    for run in runs:
        name, n = run.name, 2
        while name in names:
            name, n = f"{run.name}-{n}", n + 1
        names.append(name)
    return names


def compare_runs(runs: list[str | Path], output: str | Path, prompts: str | Path | None = None, max_tokens: int = 128,
                 latency_samples: int = 10, batch_size: int = 16, overwrite: bool = False, command: str = "",
                 say: Callable[[str], None] = print, echo: Callable[[str], None] | None = None,
                 warn: Callable[[str], None] | None = None, verify: bool = True) -> dict:
    """Evaluate every run on the same questions and write the comparison folder `output`.

    What makes the runs' figures not comparable (different base models, data, validation files or
    step counts) is said through `warn` (default: `say`, prefixed "warning: ") and in comparison.md.
    """
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise AfinarError(f"Give at least two runs to compare (got {len(runs)}), or --train CONFIG to train them.")
    output = Path(output)
    atomic.refuse_existing(output, overwrite)
    oserrors.check_writable(output)  # now, not after every run was evaluated
    loaded = [load_run(r, verify=verify) for r in runs]  # every run is whole before anything is evaluated
    prompts = Path(prompts) if prompts else None
    if prompts is None:
        prompts = evaluate.run_data_file(runs[0], *loaded[0], "val")
        if prompts is None:
            raise AfinarError(f"{runs[0]} has no validation file to ask from: pass --prompts FILE.")
    evaluate.read_questions(prompts)  # a bad prompts file fails here, once, not in every sub-process
    names = run_names(runs)
    evals = []
    with tempfile.TemporaryDirectory(prefix="afinar-compare-") as scratch:
        for name, run in zip(names, runs):
            say(f"Evaluating {name} ({run}) on {prompts}")
            evals.append(evaluate_in_process(run, prompts, Path(scratch) / f"{name}.json", max_tokens, latency_samples,
                                             batch_size, echo, verify))
    results = build_results(names, runs, loaded, evals, prompts, max_tokens, latency_samples, command)
    histories = {name: events.read_metrics(run / runs_contract.METRICS) for name, run in zip(names, runs)}
    with status(f"Writing {output}"), oserrors.writing(output), atomic.folder(output) as tmp:
        atomic.write_json(tmp / "comparison_results.json", results)
        plots.comparison_charts(results, histories, tmp)
        atomic.write_text(tmp / "comparison.md", report.comparison_markdown(results))
    for line in results["warnings"]:
        (warn or (lambda msg: say(f"warning: {msg}")))(line)
    return results


def build_results(names: list[str], runs: list[Path], loaded: list[tuple], evals: list[dict], prompts: Path,
                  max_tokens: int, latency_samples: int, command: str) -> dict:
    entries = [run_entry(name, run, cfg, meta, ev) for name, run, (cfg, meta), ev in zip(names, runs, loaded, evals)]
    questions = []
    for i, first in enumerate(evals[0]["answers"]):
        answers = {name: ev["answers"][i]["answer"] for name, ev in zip(names, evals)}
        questions.append({
            "question": first["question"], "reference": first["reference"], "keywords": first["keywords"],
            "answers": answers,
            "recalled": {name: ev["answers"][i]["recalled"] for name, ev in zip(names, evals)},
            "agreement": [{"a": a, "b": b, "exact": answers[a] == answers[b],
                           "chrf": round(evaluate.chrf(answers[b], answers[a]), 2)} for a, b in combinations(names, 2)],
        })
    agreement = []
    for k, (a, b) in enumerate(combinations(names, 2)):
        pairs = [q["agreement"][k] for q in questions]
        agreement.append({"a": a, "b": b, "questions": len(pairs),
                          "exact_share": sum(p["exact"] for p in pairs) / len(pairs) if pairs else None,
                          "chrf_mean": round(sum(p["chrf"] for p in pairs) / len(pairs), 2) if pairs else None})
    return {
        "afinar_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "prompts": str(prompts),
        "max_tokens": max_tokens,
        "latency_samples": latency_samples,
        "runs": entries,
        "warnings": report.warnings(entries),
        "ratios": report.ratios(entries),
        "agreement": agreement,
        "questions": questions,
    }


def run_entry(name: str, run: Path, cfg, meta: dict, ev: dict) -> dict:
    adapter = run / "adapter_model.safetensors"
    return {
        "name": name,
        "path": str(run),
        "base_model": cfg.model.base,
        "base_sha256": (meta.get("base_model") or {}).get("sha256"),
        "method": cfg.method,
        "quantization": cfg.model.quantization,
        "compute_dtype": (meta.get("device") or {}).get("compute_dtype", cfg.model.compute_dtype),
        "lora": cfg.lora.model_dump(mode="json"),
        "seed": cfg.train.seed,
        "data": {split: (info or {}).get("sha256") for split, info in (meta.get("data") or {}).items()},
        "adapter_bytes": adapter.stat().st_size,
        "memory": {
            # parameter storage of the frozen base as loaded for training (4-bit for QLoRA)
            "base_weights_mb": (meta.get("memory_estimate_mb") or {}).get("weights"),
            "training_peak_mb": meta.get("peak_memory_mb"),
            "loaded_for_answers_mb": ev["memory"]["model_mb"],
            "eval_peak_mb": ev["memory"]["peak_mb"],
        },
        "training": {k: meta.get(k) for k in ("steps", "epochs_completed", "train_time_s", "wall_time_s", "tokens_per_s",
                                              "tokens_seen", "best_val_loss", "best_val_step", "final_val_loss")},
        "validation": ev["validation"],
        "quality": ev["quality"],
        "speed": ev["speed"],
        "device": {k: ev["device"].get(k) for k in ("backend", "device", "device_name", "compute_dtype", "threads")},
    }
