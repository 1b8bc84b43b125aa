"""The generated parts of docs/ match their sources (scripts/docs.py): the config reference cannot drift."""

from __future__ import annotations

import importlib.util

from conftest import REPO


def load_docs_script():
    spec = importlib.util.spec_from_file_location("docs_script", REPO / "scripts" / "docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_doc_sections_are_current():
    docs = load_docs_script()
    assert docs.stale() == [], "run: .venv/bin/python scripts/docs.py"


def test_config_reference_lists_every_key_with_its_default():
    from afinar.config import describe_fields

    docs = load_docs_script()
    guide = (REPO / "docs" / "GUIDE.md").read_text(encoding="utf-8")
    for key, default, _ in describe_fields():
        assert f"| `{key}` | `{default}` |" in guide
    # A changed default or description makes the section stale.
    tampered = guide.replace("| `train.seed` | `0` |", "| `train.seed` | `1` |")
    assert docs.fill(tampered, "config-reference", docs.config_reference(), REPO / "docs" / "GUIDE.md") == guide
    assert tampered != guide
