"""Rewrite the generated parts of docs/ from their sources, so a doc cannot drift from the code or a result.

    .venv/bin/python scripts/docs.py           # rewrite every generated section
    .venv/bin/python scripts/docs.py --check   # exit 1 and name the stale sections (tests/test_docs.py)

Sections sit between `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`:
- docs/GUIDE.md `config-reference`: every setting, its default and meaning, from afinar/config.py;
- docs/GUIDE.md `presets`: what each preset in configs/ sets, from the YAML files;
- docs/LORA_VS_QLORA.md `figures`: the measured comparison, from
  docs/results/lora-vs-qlora/comparison_results.json (written by `afinar compare`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "lora-vs-qlora" / "comparison_results.json"
FULL_COMMAND = "afinar compare --train configs/cpu.yaml --output docs/results/lora-vs-qlora"


def config_reference() -> str:
    from afinar.config import describe_fields

    out, section = [], None
    for key, default, meaning in describe_fields():
        head = key.split(".")[0] if "." in key else "(top level)"
        if head != section:
            section = head
            out += ["", f"#### `{head}`" if "." in key else "#### top level", "", "| key | default | meaning |", "|---|---|---|"]
        meaning = meaning.replace("|", "\\|")
        out.append(f"| `{key}` | `{default}` | {meaning} |")
    return "\n".join(out).strip()


def presets_table() -> str:
    from afinar.config import load_config, preset_names, preset_path

    rows = ["| preset | backend | base model | method | compute | LoRA rank / alpha / layers | batch x accumulation | learning rate | schedule | max length |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in preset_names():
        cfg = load_config(preset_path(name))
        t, lora = cfg.train, cfg.lora
        schedule = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
        extras = " + gradient checkpointing" if t.gradient_checkpointing else ""
        layers = "all linear" if len(lora.target_modules) == 7 else ", ".join(lora.target_modules)
        method = "QLoRA" if cfg.method == "qlora" else "LoRA"
        rows.append(f"| `{name}` | {cfg.backend} | `{cfg.model.base}` | {method} ({cfg.model.quantization}) | "
                    f"{cfg.model.compute_dtype}{extras} | {lora.rank} / {lora.alpha:g} / {layers} | "
                    f"{t.batch_size} x {t.grad_accumulation} | {t.learning_rate:g} | {schedule} | {t.max_seq_length} |")
    return "\n".join(rows)


def lora_vs_qlora(results_path: Path = RESULTS) -> str:
    from afinar import report

    if not results_path.is_file():
        return (f"*Not measured yet.* Run `.venv/bin/{FULL_COMMAND}`, then `.venv/bin/python scripts/docs.py` "
                "to fill this section from its `comparison_results.json`.")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    shown = os.path.relpath(results_path, REPO)  # as a reader at the repository root types it
    link = os.path.relpath(results_path.parent, REPO / "docs")  # from docs/, where this section lives
    lines = [
        f"Measured with `{results['command']}` (afinar {results['afinar_version']}, {results['created_at']}); "
        f"every figure below is read from [`{shown}`]({link}/{results_path.name}), "
        f"and the full report with every answer is [`comparison.md`]({link}/comparison.md).",
        "",
        report.setup_lines(results),
        "",
        f"Questions: `{results['prompts']}` ({len(results['questions'])}), greedy, at most {results['max_tokens']} new "
        f"tokens; latency over the first {results['latency_samples']} asked one at a time.",
        "",
        report.figures_table(results),
        "",
        report.agreement_table(results),
    ]
    r = results.get("ratios")
    if r:
        by_key = {m["key"]: m for m in r["metrics"]}
        pick = [("memory.training_peak_mb", "training peak memory"), ("memory.base_weights_mb", "base weights in memory"),
                ("training.tokens_per_s", "training tokens/s"), ("speed.tokens_per_s", "generation tokens/s"),
                ("validation.loss", "validation loss"), ("quality.fact_recall", "fact recall")]
        said = [f"{label} {by_key[k]['ratio']:.2f}x" for k, label in pick if by_key.get(k, {}).get("ratio") is not None]
        lines += ["", "QLoRA / LoRA in short: " + ", ".join(said) + "."]
    for chart in ("loss.png", "speed.png", "memory.png"):
        lines += ["", f"![{chart[:-4]}]({link}/{chart})"]
    return "\n".join(lines)


SECTIONS = {
    REPO / "docs" / "GUIDE.md": {"config-reference": config_reference, "presets": presets_table},
    REPO / "docs" / "LORA_VS_QLORA.md": {"figures": lora_vs_qlora},
}


def fill(text: str, name: str, content: str, path: Path) -> str:
    pattern = re.compile(rf"(<!-- generated: {re.escape(name)} -->\n)(?:.*?\n)?(<!-- end generated: {re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no '<!-- generated: {name} -->' ... '<!-- end generated: {name} -->' markers")
    return pattern.sub(lambda m: m.group(1) + content + "\n" + m.group(2), text)


def stale() -> list[str]:
    """The generated sections whose text differs from what their sources give now."""
    out = []
    for path, sections in SECTIONS.items():
        text = path.read_text(encoding="utf-8")
        for name, make in sections.items():
            if fill(text, name, make(), path) != text:
                out.append(f"{path.relative_to(REPO)}: {name}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale sections (exit 1 if any)")
    args = parser.parse_args()
    if args.check:
        found = stale()
        for s in found:
            print(f"stale: {s} (run: .venv/bin/python scripts/docs.py)")
        return 1 if found else 0
    from afinar import atomic

    for path, sections in SECTIONS.items():
        text = path.read_text(encoding="utf-8")
        for name, make in sections.items():
            text = fill(text, name, make(), path)
        atomic.write_text(path, text)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
