"""Small pieces: fact recall, model resolution, hardware and memory reporting, atomic writes."""

from __future__ import annotations

import json

import pytest

from afinar import atomic, datacheck, evaluate, hardware, models
from afinar.data import Example
from afinar.errors import AfinarError


def test_fold_and_recalls():
    assert evaluate.fold("  São   LUÍS ") == "sao luis"
    assert evaluate.recalls("Joga no Estádio de São Luís, em Faro.", ["sao luis", "FARO"])
    assert not evaluate.recalls("Joga em Faro.", ["São Luís", "Faro"])
    assert evaluate.recalls("qualquer coisa", [])


def test_fact_recall_counts_only_examples_with_keywords():
    ex = lambda kw: Example([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], None, kw)
    score = evaluate.fact_recall([ex(["1910"]), ex(["Faro"]), ex([])], ["Em 1910.", "Em Lisboa.", "nada"])
    assert score == {"fact_recall": 0.5, "hits": 1, "scored": 2}
    assert evaluate.fact_recall([ex([])], ["x"])["fact_recall"] is None


def test_resolve_sources(tiny_model, tmp_path):
    r = models.resolve(str(tiny_model))
    assert (r.source, r.path, r.is_local) == ("folder", str(tiny_model), True)
    hub = models.ResolvedModel("org/model", "org/model", "hub")
    assert not hub.is_local and models.content_hash(hub) is None
    # offline (the suite sets HF_HUB_OFFLINE=1) and not cached: a clear error, at once
    with pytest.raises(AfinarError) as info:
        models.resolve("afinar-tests/not-a-cached-model")
    assert "afinar-tests/not-a-cached-model" in str(info.value)
    assert "--set model.base=smollm2-135m-instruct" in str(info.value)
    with pytest.raises(AfinarError, match="without config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(AfinarError, match="GGUF file not found"):
        models.resolve(str(tmp_path / "model.gguf"))
    with pytest.raises(AfinarError, match="no such folder"):
        models.resolve(str(tmp_path / "missing"))


def test_content_hash_is_stable_and_tracks_weights(tiny_model, tmp_path):
    import shutil

    h = models.content_hash(models.resolve(str(tiny_model)))
    assert len(h) == 64 and h == models.content_hash(models.resolve(str(tiny_model)))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert models.content_hash(models.resolve(str(copy))) == h  # same weights, same hash
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert models.content_hash(models.resolve(str(copy))) != h


def test_pick_preset():
    gb = lambda device, mem: hardware.Hardware(device, "x", mem, 8)
    assert hardware.pick_preset(gb("cuda", 80))[0] == "cuda-80gb"
    assert hardware.pick_preset(gb("cuda", 24))[0] == "cuda-24gb"
    assert hardware.pick_preset(gb("mps", 32))[0] == "mac-32gb"
    assert hardware.pick_preset(gb("mps", 16))[0] == "mac-16gb"
    assert hardware.pick_preset(gb("mps", 8))[0] == "mac-8gb"
    assert hardware.pick_preset(gb("cpu", 16))[0] == "cpu"


def test_process_memory_peak_is_not_below_current():
    before_now, before_peak = hardware.process_memory_mb()
    block = bytearray(64 * 2**20)  # touch 64 MiB
    block[:: 4096] = b"x" * len(block[:: 4096])
    now, peak = hardware.process_memory_mb()
    # (RSS need not grow by 64 MiB: the allocator may reuse pages freed by earlier tests.)
    assert now > 0 and before_now > 0
    assert peak >= now, f"peak {peak} MiB below current {now} MiB"
    assert peak >= before_peak
    del block


def test_atomic_write_json(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic.write_json(target, {"a": "ção"})
    atomic.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]  # no temporary file left


def test_datacheck_find_files(tmp_path):
    with pytest.raises(AfinarError, match="no train.jsonl"):
        datacheck.find_files(tmp_path)
    (tmp_path / "train.jsonl").write_text("{}\n")
    assert datacheck.find_files(tmp_path) == {"train": tmp_path / "train.jsonl"}
    assert datacheck.find_files(tmp_path / "train.jsonl") == {"train": tmp_path / "train.jsonl"}
