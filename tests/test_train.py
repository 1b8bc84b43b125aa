"""The training loop and the run folder, on the tiny random Mistral."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
from safetensors.torch import load_file

from afinar import data, events as E, models, runs
from afinar.backends.torch_train import TorchTrainer
from afinar.config import load_config, preset_path
from afinar.errors import AfinarError
from afinar.runs import file_sha256, load_run
from afinar.schedule import lr_at, prepare, total_steps
from afinar.train import Trainer, run_training

from conftest import QA, Boom, crash_on_step, qa_rows, tiny_config, write_jsonl

# The run folder's top level: the contract's files, plus the method's config, the plot and the checkpoints.
RUN_FILES = {name.split("/")[0] for name in runs.RUN_FILES} | {"lora_config.json", runs.LOSS_PLOT, runs.MANIFEST, "checkpoints"}
STEP_KEYS = {"event", "step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "memory_mb",
             "peak_memory_mb"}
EVAL_KEYS = {"event", "step", "val_loss", "best_val_loss"}
RUN_OVERRIDES = ("train.max_steps=4", "train.eval_every=2", "train.warmup_steps=1")


@pytest.fixture(scope="module")
def small_run(tiny_model, tmp_path_factory):
    """One finished 4-step run, shared by the run-folder tests: (cfg, run folder, events)."""
    root = tmp_path_factory.mktemp("small_run")
    train = write_jsonl(root / "train.jsonl", qa_rows(QA[:6]))
    val = write_jsonl(root / "val.jsonl", qa_rows(QA[6:]))
    cfg = tiny_config(tiny_model, *RUN_OVERRIDES, train=train, val=val)
    seen: list[E.Event] = []
    run = run_training(cfg, root / "run", on_event=seen.append).output
    return cfg, run, seen


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run) -> dict:
    return load_file(str(run / "adapter_model.safetensors"))


def leftovers(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


# ---------------------------------------------------------------- the run folder


def test_run_folder_has_exactly_the_expected_files(small_run):
    cfg, run, _ = small_run
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert leftovers(run) == ["run"]  # no run.partial, no run.old
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    guide = (run / "INTEGRATION_GUIDE.md").read_text()
    assert f"afinar ask {run}" in guide and "PeftModel.from_pretrained" in guide
    adapter_cfg = json.loads((run / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == cfg.lora.rank and sorted(adapter_cfg["target_modules"]) == sorted(cfg.lora.target_modules)
    method = json.loads((run / "lora_config.json").read_text())
    assert method["method"] == "lora" and method["quantization"] == "none" and method["rank"] == cfg.lora.rank


def test_metrics_lines(small_run):
    _, run, seen = small_run
    lines = metrics(run)
    steps = [r for r in lines if r["event"] == "step"]
    evals = [r for r in lines if r["event"] == "eval"]
    kinds = [r["event"] for r in lines]
    assert kinds[0] == "start" and set(kinds) == {"start", "step", "eval", "checkpoint"}  # best/ saved at each new best
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]  # eval_every=2, and at the end
    for r in steps:
        assert set(r) == STEP_KEYS
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["memory_mb"] > 0
        assert r["peak_memory_mb"] >= r["memory_mb"], "the peak cannot be below the current memory"
    assert [r["tokens"] for r in steps] == sorted({r["tokens"] for r in steps})  # cumulative, growing
    for r in evals:
        assert set(r) == EVAL_KEYS
    assert evals[-1]["best_val_loss"] == min(r["val_loss"] for r in evals)
    # one reader turns the lines back into the records the callback saw, which end with `done`
    assert E.read_metrics(run / "metrics.jsonl") == [e for e in seen if not isinstance(e, (E.Status, E.Done))]
    assert isinstance(seen[-1], E.Done) and seen[-1].output == str(run)
    start = next(e for e in seen if not isinstance(e, E.Status))  # after the loading and tokenizing stages
    assert isinstance(start, E.Start) and start.total_steps == 4 and start.train_examples == 6 and start.val_examples == 2
    assert sum(start.device["trainable_parameters_by_module"].values()) == start.device["trainable_parameters"]
    stages = [(e.stage, e.done) for e in seen if isinstance(e, E.Status)]
    assert [s for s in stages if s[0] == "validation"] == [("validation", False), ("validation", True)] * 2
    assert len(stages) % 2 == 0 and all(stages.count((name, True)) == stages.count((name, False)) for name, _ in stages)


def test_metadata(small_run):
    cfg, run, _ = small_run
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["method"] == "lora"
    base = meta["base_model"]
    assert base["name"] == cfg.model.base and base["source"] == "folder"
    assert base["sha256"] == models.content_hash(models.resolve(cfg.model.base))
    assert len(base["sha256"]) == 64
    for split, path, count in (("train", cfg.data.train, 6), ("val", cfg.data.val, 2)):
        assert meta["data"][split] == {"setting": path, "path": str(os.path.abspath(path)), "examples": count,
                                       "sha256": file_sha256(path)}
    versions = meta["device"]["versions"]
    assert {"torch", "transformers", "peft"} <= set(versions)
    assert meta["device"]["device"] == "cpu" and meta["device"]["compute_dtype"] == "float32"
    assert meta["wall_time_s"] >= meta["train_time_s"] > 0
    lines = metrics(run)
    assert meta["tokens_seen"] == [r for r in lines if r["event"] == "step"][-1]["tokens"]
    assert meta["steps"] == meta["adapter_step"] == 4
    assert meta["peak_memory_mb"] > 0
    evals = [r for r in lines if r["event"] == "eval"]
    assert meta["final_val_loss"] == evals[-1]["val_loss"]
    assert meta["best_val_loss"] == min(r["val_loss"] for r in evals)
    assert meta["adapter"]["sha256"] == file_sha256(run / "adapter_model.safetensors")
    state = json.loads((run / "training_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == 4
    assert state["log_history"] == lines


def test_training_config_reloads_equal(small_run):
    cfg, run, _ = small_run
    loaded, meta = load_run(run)
    assert loaded == cfg
    assert meta["steps"] == 4


def test_run_files_are_readable_by_others(small_run):
    """Runs are served by other processes (a web server's user): files must not be owner-only."""
    _, run, _ = small_run
    # The fixture wrote the run under the test process's umask; compare against it.
    umask = os.umask(0)
    os.umask(umask)
    if umask & 0o044:
        pytest.skip(f"umask {umask:03o} hides files from others anyway")
    private = [p.name for p in run.iterdir() if not stat.S_IMODE(p.stat().st_mode) & 0o044]
    assert not private, f"owner-only files in a run folder: {private}"


def test_load_run_errors(tmp_path):
    with pytest.raises(AfinarError, match="Run folder not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "half.partial").mkdir()
    with pytest.raises(AfinarError, match="did not finish"):
        load_run(tmp_path / "half")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AfinarError, match="missing training_config.json"):
        load_run(tmp_path / "empty")


# ---------------------------------------------------------------- reproducibility


def test_same_seed_same_adapter_other_seed_other_adapter(make_cfg, qa_files, tmp_path):
    train, val = qa_files
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        cfg = make_cfg("train.max_steps=3", "train.eval_every=10", f"train.seed={seed}", train=train, val=val)
        runs[name] = adapter(run_training(cfg, tmp_path / name).output)
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a.keys() == b.keys() == c.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype
        assert (a[k] == b[k]).all(), f"{k} differs between two runs with the same seed"
    assert any(not (a[k] == c[k]).all() for k in a), "another seed gave the same adapter"
    # the logged losses and norms match too (timings and memory may differ)
    timing = {"tokens_per_s", "elapsed_s", "memory_mb", "peak_memory_mb", "seconds", "device", "memory_estimate_mb"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert strip(metrics(tmp_path / "a")) == strip(metrics(tmp_path / "b"))


# ---------------------------------------------------------------- output folder handling


def test_existing_output_needs_overwrite(make_cfg, qa_files, tmp_path):
    train, _ = qa_files
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("old run")
    (out / "metadata.json").write_text("{}")  # an earlier run: --overwrite replaces only runs
    cfg = make_cfg("train.max_steps=1", train=train)
    with pytest.raises(AfinarError, match="already exists"):
        run_training(cfg, out)
    assert (out / "keep.txt").read_text() == "old run"
    assert leftovers(out) == ["run"]
    run_training(cfg, out, overwrite=True)
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert leftovers(out) == ["run"]




def test_failure_leaves_nothing(make_cfg, qa_files, tmp_path, monkeypatch):
    train, val = qa_files
    out = tmp_path / "run"
    calls = crash_on_step(monkeypatch, 3)
    with pytest.raises(Boom):
        run_training(make_cfg("train.max_steps=4", "train.eval_every=1", train=train, val=val), out)
    assert calls["n"] == 3  # it did train (and write metrics into .partial) before failing
    assert not out.exists()
    assert not out.with_name("run.partial").exists()
    assert leftovers(out) == []


def test_failure_with_overwrite_keeps_the_old_run(make_cfg, qa_files, tmp_path, monkeypatch):
    train, _ = qa_files
    out = tmp_path / "run"
    run_training(make_cfg("train.max_steps=1", train=train), out)
    before = file_sha256(out / "adapter_model.safetensors")
    crash_on_step(monkeypatch, 2)
    with pytest.raises(Boom):
        run_training(make_cfg("train.max_steps=3", "train.seed=5", train=train), out, overwrite=True)
    assert file_sha256(out / "adapter_model.safetensors") == before
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert leftovers(out) == ["run"]


def test_non_finite_loss_stops_with_advice(make_cfg, qa_files, tmp_path, monkeypatch):
    train, _ = qa_files
    original = TorchTrainer.forward_backward
    monkeypatch.setattr(TorchTrainer, "forward_backward", lambda self, b, scale: (float("nan"), original(self, b, scale)[1]))
    out = tmp_path / "run"
    with pytest.raises(AfinarError, match="learning_rate"):
        run_training(make_cfg("train.max_steps=2", train=train), out)
    assert leftovers(out) == []


def test_a_preset_without_data_is_refused_before_anything_loads(tmp_path):
    """Only the cpu preset names data (the bundled sample): a 7B preset must not train on it silently."""
    cfg = load_config(preset_path("cuda-80gb"))
    assert cfg.data.train is None
    with pytest.raises(AfinarError, match=r"data.train is not set: name your training file with --set data.train="):
        Trainer(cfg, tmp_path / "run").run()
    assert not list(tmp_path.iterdir())
    assert load_config(preset_path("cpu")).data.train == "bundled:farense/train.jsonl"


def test_bad_inputs_fail_before_any_folder(make_cfg, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", qa_rows(QA[:1]))
    out = tmp_path / "run"
    with pytest.raises(AfinarError, match=r"fewer than train.batch_size=\d+\. Add examples, or lower it: --set train.batch_size="):
        run_training(make_cfg("train.batch_size=2", train=one), out)
    with pytest.raises(AfinarError, match="not found"):
        run_training(make_cfg(train=tmp_path / "missing.jsonl"), out)
    assert leftovers(out) == []


# ---------------------------------------------------------------- schedule and loss


def test_lr_schedule():
    cfg = load_config(None, ["train.learning_rate=1e-3", "train.warmup_steps=4", "train.min_lr_ratio=0.1"])
    lr, total = 1e-3, 20
    # linear warmup from lr/warmup to lr
    assert [lr_at(s, total, cfg) for s in (1, 2, 3, 4)] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr])
    # cosine decay to min_lr_ratio * lr at the last step
    after = [lr_at(s, total, cfg) for s in range(4, total + 1)]
    assert all(x > y for x, y in zip(after, after[1:]))
    assert lr_at(total, total, cfg) == pytest.approx(0.1 * lr)
    assert lr_at(12, total, cfg) == pytest.approx(0.1 * lr + 0.9 * lr * 0.5)  # halfway: the midpoint
    assert lr_at(total + 5, total, cfg) == pytest.approx(0.1 * lr)  # never below the floor
    no_warmup = load_config(None, ["train.learning_rate=1e-3", "train.warmup_steps=0"])
    assert lr_at(1, 10, no_warmup) < 1e-3 and lr_at(1, 10, no_warmup) > lr_at(2, 10, no_warmup)


def test_total_steps():
    assert total_steps(load_config(None, ["train.max_steps=7"]), 1000) == 7
    cfg = load_config(None, ["train.epochs=2", "train.batch_size=4", "train.grad_accumulation=2"])
    assert total_steps(cfg, 100) == 25  # 25 batches an epoch, 2 epochs, 2 batches a step
    assert total_steps(load_config(None, ["train.epochs=0.01"]), 3) == 1


def test_prepare_drops_examples_without_answer_tokens(tiny_tokenizer, tiny_model):
    long_q = [("Pergunta muito longa " * 20 + "?", "Sim.", [])]
    examples = lambda items: [data.Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}], None)
                              for q, a, _ in items]
    cfg = tiny_config(tiny_model, "train.max_seq_length=32")
    prepared = prepare(cfg, tiny_tokenizer, examples(QA[:2] + long_q), examples(long_q))
    assert len(prepared.train) == 2 and prepared.dropped == 1 and prepared.truncated >= 1
    assert prepared.val == []
    with pytest.raises(AfinarError, match="max_seq_length"):
        prepare(cfg, tiny_tokenizer, examples(long_q), [])


def test_step_loss_is_mean_over_all_answer_tokens(make_cfg, tiny_model, tmp_path, monkeypatch):
    """batch 1 x accumulation 2: each micro-batch's loss sum is scaled by 1 / (targets of the whole step)."""
    rows = qa_rows([QA[2], QA[3]])  # a short and a long answer
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg("train.batch_size=1", "train.grad_accumulation=2", "train.max_steps=1", "lora.dropout=0", train=train)

    seen = []
    original = TorchTrainer.forward_backward

    def spy(self, batch, scale):
        s, n = original(self, batch, scale)
        seen.append((s, n, scale))
        return s, n

    monkeypatch.setattr(TorchTrainer, "forward_backward", spy)
    records = []
    run_training(cfg, tmp_path / "run", on_event=records.append)
    step = next(e for e in records if isinstance(e, E.Step) and e.step == 1)

    # the same two examples, measured independently with a fresh backend (same seed: same adapter)
    backend = TorchTrainer(cfg)
    tok = backend.load(models.resolve(cfg.model.base))
    encoded = [data.encode(e, tok, cfg.train.max_seq_length) for e in data.read_jsonl(train)]
    sums = [backend.loss_sum([e]) for e in encoded]
    total = sum(n for _, n in sums)
    assert total == sum(e.n_targets for e in encoded)
    assert len({n for _, n in sums}) == 2  # the two examples have different answer lengths
    expected = sum(s.item() for s, _ in sums) / total

    assert len(seen) == 2
    assert all(scale == pytest.approx(1.0 / total) for _, _, scale in seen)
    assert sorted(n for _, n, _ in seen) == sorted(n for _, n in sums)
    assert step.loss == pytest.approx(expected, abs=1e-5)
    assert step.tokens == sum(len(e.input_ids) for e in encoded)


def test_gradient_does_not_depend_on_micro_batching(make_cfg, tmp_path):
    """One step over the same two examples: 1 batch of 2, or 2 accumulated batches of 1."""
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows([QA[2], QA[3]]))
    records = {}
    for name, bs, acc in (("whole", 2, 1), ("accumulated", 1, 2)):
        cfg = make_cfg(f"train.batch_size={bs}", f"train.grad_accumulation={acc}", "train.max_steps=1",
                       "lora.dropout=0", "train.max_grad_norm=0", train=train)
        seen = []
        run_training(cfg, tmp_path / name, on_event=seen.append)
        records[name] = next(e for e in seen if isinstance(e, E.Step) and e.step == 1)
    whole, accumulated = records["whole"], records["accumulated"]
    assert accumulated.loss == pytest.approx(whole.loss, abs=2e-5)
    assert accumulated.grad_norm == pytest.approx(whole.grad_norm, rel=1e-3)
    assert accumulated.tokens == whole.tokens  # same tokens, padding not counted
    a, b = adapter(tmp_path / "whole"), adapter(tmp_path / "accumulated")
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k


# ---------------------------------------------------------------- inference on a run


def test_predictor_answers_from_a_run(small_run):
    from afinar.evaluate import recall_on
    from afinar.inference import Predictor

    cfg, run, _ = small_run
    predictor = Predictor(run)
    assert predictor.cfg == cfg
    assert not predictor.backend.model.training
    questions = [QA[0][0], QA[1][0]]
    batch = predictor.ask_many(questions, max_tokens=6)
    assert len(batch) == 2
    for q, r in zip(questions, batch):
        assert set(r) == {"answer", "model", "adapter", "prompt_tokens", "completion_tokens", "latency_ms", "tokens_per_s"}
        assert r["model"] == cfg.model.base and r["adapter"] == str(run)
        assert r["prompt_tokens"] == len(data.prompt_ids(predictor.tokenizer, q))
        assert 0 < r["completion_tokens"] <= 6
        assert isinstance(r["answer"], str)
    # batching does not change greedy answers
    assert [predictor.ask(q, max_tokens=6)["answer"] for q in questions] == [r["answer"] for r in batch]
    score, answers = recall_on(predictor, data.read_jsonl(cfg.data.val), batch_size=1, max_tokens=4)
    assert score["scored"] == 2 and score["hits"] == 0 and len(answers) == 2  # a random model recalls nothing
