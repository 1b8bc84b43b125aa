"""Render a comparison: the figures table, QLoRA/LoRA ratios, charts and the readable report.

Everything here reads the dict that `compare.py` writes as `comparison_results.json`, so a
report (and `docs/LORA_VS_QLORA.md`, via `scripts/docs.py`) can be rebuilt from that file.
"""

from __future__ import annotations

# (label, dotted path in a run entry, unit/format, better: "lower" | "higher" | "")
METRICS = [
    ("Training peak memory (MiB)", "memory.training_peak_mb", "{:,.0f}", "lower"),
    ("Base weights as loaded for training (MiB)", "memory.base_weights_mb", "{:,.1f}", "lower"),
    ("Model loaded for answering (MiB)", "memory.loaded_for_answers_mb", "{:,.0f}", "lower"),
    ("Adapter on disk (MiB)", "adapter_mib", "{:,.1f}", "lower"),
    ("Training time (s)", "training.train_time_s", "{:,.1f}", "lower"),
    ("Training tokens/s", "training.tokens_per_s", "{:,.1f}", "higher"),
    ("Generation tokens/s (one question)", "speed.tokens_per_s", "{:,.1f}", "higher"),
    ("Generation tokens/s (batched)", "speed.batched_tokens_per_s", "{:,.1f}", "higher"),
    ("Latency p50 (ms)", "speed.latency_ms_p50", "{:,.0f}", "lower"),
    ("Latency p95 (ms)", "speed.latency_ms_p95", "{:,.0f}", "lower"),
    ("Validation loss (eval)", "validation.loss", "{:.4f}", "lower"),
    ("Validation perplexity", "validation.perplexity", "{:.3f}", "lower"),
    ("Best validation loss (training)", "training.best_val_loss", "{:.4f}", "lower"),
    ("Fact recall", "quality.fact_recall", "{:.1%}", "higher"),
    ("chrF vs reference", "quality.chrf", "{:.1f}", "higher"),
    ("Empty answers", "quality.empty_share", "{:.1%}", "lower"),
    ("Truncated answers", "quality.truncated_share", "{:.1%}", "lower"),
]

LABEL = {"lora": "LoRA", "qlora": "QLoRA"}


def get(entry: dict, path: str):
    if path == "adapter_mib":
        return entry["adapter_bytes"] / 2**20
    node = entry
    for part in path.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def pair(entries: list[dict]) -> tuple[dict, dict] | None:
    """The first LoRA and the first QLoRA run, when there are both."""
    lora = next((e for e in entries if e["method"] == "lora"), None)
    qlora = next((e for e in entries if e["method"] == "qlora"), None)
    return (lora, qlora) if lora and qlora else None


def ratios(entries: list[dict]) -> dict | None:
    """QLoRA / LoRA for every metric both runs have (None without one of each)."""
    found = pair(entries)
    if not found:
        return None
    lora, qlora = found
    rows = []
    for label, path, _, better in METRICS:
        a, b = get(lora, path), get(qlora, path)
        rows.append({"metric": label, "key": path, "lora": a, "qlora": b, "better": better,
                     "ratio": round(b / a, 4) if a not in (None, 0) and b is not None else None})
    return {"lora": lora["name"], "qlora": qlora["name"], "metrics": rows}


def recall_text(q: dict) -> str:
    return "n/a" if q["fact_recall"] is None else f"{q['hits']}/{q['scored']} = {q['fact_recall']:.1%}"


def eval_rows(result: dict) -> list[tuple[str, str]]:
    """(label, value) rows of one `afinar eval` result, for its table."""
    v, q, s, m = result["validation"] or {}, result["quality"], result["speed"], result["memory"]
    test = result.get("test")
    held_out = [] if not test else [
        ("Test loss (held out)", fmt((test["validation"] or {}).get("loss"), "{:.4f}")),
        ("Test fact recall (held out)", recall_text(test["quality"])),
        ("Test chrF", fmt(test["quality"]["chrf"], "{:.1f}")),
    ]
    return [
        ("Validation loss (per answer token)", fmt(v.get("loss"), "{:.4f}")),
        ("Perplexity", fmt(v.get("perplexity"), "{:.3f}")),
        ("Fact recall", recall_text(q)),
        ("chrF vs reference", fmt(q["chrf"], "{:.1f}")),
        *held_out,
        ("Empty answers", fmt(q["empty_share"], "{:.1%}")),
        (f"Truncated answers (at {result['max_tokens']} tokens)", fmt(q["truncated_share"], "{:.1%}")),
        (f"Latency p50 / p95 (ms, {s['questions']} single questions)",
         f"{fmt(s['latency_ms_p50'], '{:,.0f}')} / {fmt(s['latency_ms_p95'], '{:,.0f}')}"),
        ("Generation tokens/s (one question / batched)",
         f"{fmt(s['tokens_per_s'], '{:,.1f}')} / {fmt(s['batched_tokens_per_s'], '{:,.1f}')}"),
        ("Memory of the loaded model (MiB)", fmt(m["model_mb"], "{:,.0f}")),
        ("Peak memory of this evaluation (MiB)", fmt(m["peak_mb"], "{:,.0f}")),
    ]


def ratio_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """(metric, LoRA, QLoRA, ratio) as text, from `ratios()`."""
    patterns = {label: pattern for label, _, pattern, _ in METRICS}
    return [(m["metric"], fmt(m["lora"], patterns[m["metric"]]), fmt(m["qlora"], patterns[m["metric"]]),
             "n/a" if m["ratio"] is None else f"{m['ratio']:.2f}x") for m in r["metrics"]]


# ---------------------------------------------------------------- markdown


def cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def figure_rows(results: dict, code: bool = False) -> tuple[list[str], list[list[str]]]:
    """(header, rows): metric rows, one column per run, and QLoRA/LoRA when both are present."""
    entries = results["runs"]
    r = results.get("ratios")
    quote = "`" if code else ""
    head = ["", *(f"{quote}{e['name']}{quote} ({LABEL.get(e['method'], e['method'])})" for e in entries)]
    head += ["QLoRA / LoRA"] if r else []
    rows = []
    for i, (label, path, pattern, _) in enumerate(METRICS):
        row = [label, *(fmt(get(e, path), pattern) for e in entries)]
        if r:
            ratio = r["metrics"][i]["ratio"]
            row.append("n/a" if ratio is None else f"{ratio:.2f}x")
        rows.append(row)
    return head, rows


def figures_table(results: dict) -> str:
    """The figures as a markdown table (see `figure_rows`)."""
    head, rows = figure_rows(results, code=True)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


# ---------------------------------------------------------------- what makes runs not comparable

# (what differs, the run-entry key holding it, what that means for the figures)
COMPARABLE = [
    ("base models", "base_model", "every figure compares different models, not only the fine-tuning"),
    ("base model weights", "base_sha256", "the same name holds different weights: every figure compares different models"),
    ("training data", "data.train", "differences in loss and answers may come from the data"),
    ("validation files", "data.val", "their training validation losses (best validation loss) are not comparable"),
    ("step counts", "training.steps", "training time, loss and answer quality compare unequal amounts of training"),
]


def warnings(entries: list[dict]) -> list[str]:
    """One sentence per way the runs differ besides their settings; a value a run lacks is not compared."""
    out = []
    for what, path, meaning in COMPARABLE:
        values = {e["name"]: get(e, path) for e in entries}
        known = {v for v in values.values() if v is not None}
        if None in values.values() or len(known) < 2:
            continue
        if what == "base model weights" and len({get(e, "base_model") for e in entries}) > 1:
            continue  # already said by "base models"
        shown = ", ".join(f"{name}: {_short(v)}" for name, v in values.items())
        out.append(f"The runs have different {what} ({shown}): {meaning}.")
    return out


def _short(value) -> str:
    """A sha256 shortened to 12 characters; anything else as it is."""
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def setup_lines(results: dict) -> str:
    lines = []
    for e in results["runs"]:
        lora = e["lora"]
        t = e["training"]
        lines.append(f"- `{e['name']}`: {LABEL.get(e['method'], e['method'])} on `{e['base_model']}` (quantization `{e['quantization']}`, "
                     f"compute {e['compute_dtype']}), LoRA rank {lora['rank']} alpha {lora['alpha']:g} on "
                     f"{', '.join(lora['target_modules'])}, seed {e['seed']}; {t.get('steps')} steps; "
                     f"device {e['device'].get('device')} ({e['device'].get('device_name')}, {e['device'].get('threads')} threads).")
    return "\n".join(lines)


def agreement_table(results: dict) -> str:
    lines = ["| runs | questions | identical answers | mean chrF between them |", "|---|---|---|---|"]
    for a in results["agreement"]:
        lines.append(f"| `{a['a']}` vs `{a['b']}` | {a['questions']} | {fmt(a['exact_share'], '{:.1%}')} | "
                     f"{fmt(a['chrf_mean'], '{:.1f}')} |")
    return "\n".join(lines)


def comparison_markdown(results: dict, answers_shown: int | None = None) -> str:
    names = [e["name"] for e in results["runs"]]
    parts = [
        "# Comparison: " + " vs ".join(f"`{n}`" for n in names),
        "",
        f"Made by afinar {results['afinar_version']} on {results['created_at']}"
        + (f" with `{results['command']}`" if results.get("command") else "") + ".",
        f"Questions: `{results['prompts']}` ({len(results['questions'])}), greedy answers of at most "
        f"{results['max_tokens']} tokens; latency over the first {results['latency_samples']} questions asked one at a time.",
        "",
        setup_lines(results),
        "",
        *[f"> **Warning:** {w}\n" for w in results.get("warnings") or []],
        "## Figures",
        "",
        figures_table(results),
        "",
        "Memory is the backend's measure: device memory on a GPU, process resident memory (RSS) on CPU. "
        "\"Base weights as loaded for training\" counts the frozen base's parameter storage (4-bit for QLoRA); "
        "\"model loaded for answering\" is the growth of memory when the run is loaded to answer (on CPU afinar "
        "dequantizes NF4 weights and merges the adapter to answer faster, so QLoRA answers from full-size weights there).",
        "",
        "## Agreement between runs",
        "",
        agreement_table(results),
        "",
        "## Charts",
        "",
        "![loss curves](loss.png)",
        "",
        "![speed](speed.png)",
        "",
        "![memory](memory.png)",
        "",
        "## Answers",
        "",
    ]
    shown = results["questions"] if answers_shown is None else results["questions"][:answers_shown]
    head = ["question", "reference", *(f"`{n}`" for n in names)]
    parts += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for q in shown:
        marks = {n: {True: " ✓", False: " ✗", None: ""}[q["recalled"].get(n)] for n in names}
        parts.append("| " + " | ".join([cell(q["question"]), cell(q["reference"] or ""),
                                        *(cell(q["answers"][n]) + marks[n] for n in names)]) + " |")
    parts += ["", "✓ / ✗: the answer holds every keyword of the reference, or not (fact recall).", ""]
    return "\n".join(parts)
