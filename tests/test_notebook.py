"""notebooks/qlora_training.ipynb runs top to bottom (nbclient) on the tiny model, a few steps."""

from __future__ import annotations

import json

import nbformat
from nbclient import NotebookClient

from conftest import QA, REPO, qa_rows, write_jsonl

NOTEBOOK = REPO / "notebooks" / "qlora_training.ipynb"


def test_notebook_runs_on_the_tiny_model(tiny_model, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "data" / "train.jsonl", qa_rows(QA[:6]))
    val = write_jsonl(tmp_path / "data" / "val.jsonl", qa_rows(QA[6:]))
    out = tmp_path / "nb"
    # The kernel inherits this environment: the notebook's parameters cell reads it.
    for key, value in {
        "AFINAR_NB_PRESET": "cpu", "AFINAR_NB_BASE": str(tiny_model), "AFINAR_NB_STEPS": "2",
        "AFINAR_NB_SET": f"data.train={train};data.val={val};train.batch_size=2;train.max_seq_length=128;"
                         "train.warmup_steps=1;train.eval_every=1;lora.rank=4;lora.alpha=8",
        "AFINAR_NB_OUTPUT": str(out), "AFINAR_NB_MAX_TOKENS": "4", "AFINAR_NB_LATENCY_SAMPLES": "1",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Detected:" in text and "train/val overlap: 0" in text and "Q: " in text
    # The live plot was drawn, the evaluation shown, and the comparison rendered as tables and charts.
    kinds = [k for c in nb.cells if c.cell_type == "code" for o in c.outputs for k in o.get("data", {})]
    assert kinds.count("image/png") >= 4 and "text/markdown" in kinds
    assert json.loads((out / "qlora" / "metadata.json").read_text())["steps"] == 2
    assert json.loads((out / "lora" / "metadata.json").read_text())["method"] == "lora"
    assert (out / "qlora" / "eval.json").is_file()
    results = json.loads((out / "comparison" / "comparison_results.json").read_text())
    assert [e["method"] for e in results["runs"]] == ["lora", "qlora"] and results["ratios"] is not None
