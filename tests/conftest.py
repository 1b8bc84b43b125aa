"""Shared fixtures: a tiny random Mistral (real tokenizer), small JSONL files, configs.

Everything runs on CPU and offline. The environment is set here, at import time, before
any afinar module resolves a model: AFINAR_HOME points at a cache that survives local runs
(the embedded model materialised from GGUF is reused), or at $AFINAR_TEST_HOME.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

os.environ["AFINAR_HOME"] = os.environ.get("AFINAR_TEST_HOME") or str(REPO / ".cache" / "test-home")
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

DATA_DIR = REPO / "data" / "farense"

# Short Portuguese Q&A pairs with answers of clearly different lengths.
QA = [
    ("Quando foi fundado o Farense?", "O Sporting Clube Farense foi fundado a 1 de abril de 1910.", ["1910"]),
    ("Onde joga o Farense?", "No Estádio de São Luís, em Faro.", ["São Luís"]),
    ("Qual é a cor do Farense?", "Branco e preto.", ["branco", "preto"]),
    ("Quem foi Hajry Redouane?", "Um avançado marroquino que se destacou no Farense nos anos 1990, muito querido pelos adeptos.", ["marroquino"]),
    ("Em que cidade fica o Farense?", "Em Faro, no Algarve.", ["Faro"]),
    ("Qual é a alcunha do Farense?", "Os Leões de Faro.", ["Leões"]),
    ("O Farense jogou na Taça UEFA?", "Sim, na época 1995/96, depois do quinto lugar no campeonato.", ["1995/96"]),
    ("Quem treinou o Farense nos anos 90?", "Paco Fortes foi o treinador mais marcante dessa década.", ["Paco Fortes"]),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(items=QA) -> list[dict]:
    return [{"question": q, "answer": a, "keywords": k} for q, a, k in items]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random MistralForCausalLM with Mistral's real tokenizer, built once."""
    from afinar.synthetic import make_random_model

    return make_random_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def qa_files(tmp_path) -> tuple[Path, Path]:
    """(train.jsonl, val.jsonl) with a few question/answer lines."""
    train = write_jsonl(tmp_path / "data" / "train.jsonl", qa_rows(QA[:6]))
    val = write_jsonl(tmp_path / "data" / "val.jsonl", qa_rows(QA[6:]))
    return train, val


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    """qa_files' (train.jsonl, val.jsonl), once per test module: for runs that module fixtures build."""
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder / "train.jsonl", qa_rows(QA[:6])), write_jsonl(folder / "val.jsonl", qa_rows(QA[6:]))


def tiny_config(model: Path, *overrides: str, train: Path | None = None, val: Path | None = None):
    """Config for the tiny model: plain fp32 LoRA, short schedule; `overrides` as --set strings."""
    from afinar.config import load_config

    base = [
        f"model.base={model}",
        "model.quantization=none",
        "model.compute_dtype=float32",
        "train.batch_size=2",
        "train.grad_accumulation=1",
        "train.max_seq_length=128",
        "train.warmup_steps=1",
        "train.learning_rate=1e-3",
    ]
    if train is not None:
        base.append(f"data.train={train}")
    base.append(f"data.val={val}" if val is not None else "data.val=null")
    return load_config(None, [*base, *overrides])


@pytest.fixture
def make_cfg(tiny_model):
    """`make_cfg(*overrides, train=..., val=...)`: a tiny-model config."""
    return lambda *overrides, train=None, val=None: tiny_config(tiny_model, *overrides, train=train, val=val)


class Boom(RuntimeError):
    """A simulated crash."""


# A schedule that checkpoints and validates every 2 steps (runs killed and resumed by the fault tests).
CHECKPOINTED = ("train.max_steps=8", "train.save_every=2", "train.eval_every=2", "train.keep_checkpoints=3",
                "lora.dropout=0.1", "train.divergence_factor=0")


def crash(cfg, out: Path, step: int) -> Path:
    """Train `out` until the `step`-th optimizer step raises; its `.partial/`."""
    from afinar.train import run_training

    with pytest.MonkeyPatch.context() as mp:
        crash_on_step(mp, step)
        with pytest.raises(Boom):
            run_training(cfg, out)
    return out.with_name(out.name + ".partial")


def crash_on_step(monkeypatch, step: int, backend_class=None) -> dict:
    """Make the `step`-th optimizer step raise Boom (torch backend unless given); returns the call counter."""
    from afinar.backends.torch_train import TorchTrainer

    backend_class = backend_class or TorchTrainer
    calls = {"n": 0}
    original = backend_class.optimizer_step

    def optimizer_step(self, lr):
        calls["n"] += 1
        if calls["n"] == step:
            raise Boom("simulated crash")
        return original(self, lr)

    monkeypatch.setattr(backend_class, "optimizer_step", optimizer_step)
    return calls
