"""Charts: a run's loss curves (`loss.png`) and a comparison's loss, speed and memory charts.

matplotlib is optional (`pip install 'afinar[plots]'`): without it, runs and comparisons are
written without their PNG files and say so.
"""

from __future__ import annotations

import os
from pathlib import Path

from afinar import events
from afinar.report import LABEL, fmt, get


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _curves(history: list[events.Event]) -> tuple[list, list]:
    train = [(e.step, e.loss) for e in history if isinstance(e, events.Step)]
    val = [(e.step, e.val_loss) for e in history if isinstance(e, events.Eval)]
    return train, val


def loss_curves(history: list[events.Event], path: Path, title: str = "") -> bool:
    """Train and validation loss against the step; False (no file) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    train, val = _curves(history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per answer token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path, plt)
    return True


def comparison_charts(results: dict, histories: dict[str, list[events.Event]], folder: Path) -> bool:
    """loss.png (curves overlaid), speed.png and memory.png (bars per run); False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, (name, history) in enumerate(histories.items()):
        color = f"C{i}"
        train, val = _curves(history)
        if train:
            ax.plot(*zip(*train), color=color, linewidth=1, alpha=0.6, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), "o-", color=color, label=f"{name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per answer token)")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, folder / "loss.png", plt)

    entries = results["runs"]
    _bars(plt, entries, folder / "speed.png", "Speed (higher is faster)", "tokens/s",
          [("training", "training.tokens_per_s"), ("generation, one question", "speed.tokens_per_s"),
           ("generation, batched", "speed.batched_tokens_per_s")])
    _bars(plt, entries, folder / "memory.png", "Memory (lower is smaller)", "MiB",
          [("training peak", "memory.training_peak_mb"), ("base weights (training)", "memory.base_weights_mb"),
           ("loaded for answering", "memory.loaded_for_answers_mb")])
    return True


def _bars(plt, entries: list[dict], path: Path, title: str, unit: str, groups: list[tuple[str, str]]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    width = 0.8 / max(1, len(entries))
    for i, e in enumerate(entries):
        xs = [g + i * width for g in range(len(groups))]
        values = [get(e, path) or 0 for _, path in groups]
        bars = ax.bar(xs, values, width, label=f"{e['name']} ({LABEL.get(e['method'], e['method'])})", color=f"C{i}")
        ax.bar_label(bars, labels=[fmt(get(e, p), "{:,.0f}") for _, p in groups], fontsize=7)
    ax.set_xticks([g + width * (len(entries) - 1) / 2 for g in range(len(groups))], [label for label, _ in groups])
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path, plt)


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
