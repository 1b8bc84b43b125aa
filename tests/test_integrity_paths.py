"""A run's history survives a damaged line, and a bad output path is named before the work, not after.

metrics.jsonl: a torn last line (a crash mid-write, possibly inside a UTF-8 character) is dropped
silently; a bad line before it is skipped with a warning naming it, and the records after it are
kept, also by the rewrite a resume does. Output paths of `eval`, `compare` and `export` (a folder
where a file goes, a regular file above, a folder nobody may write) are clean errors before the
evaluation or the merge; a write the machine refuses at the end is a clean error naming the path.

Tests marked xfail need a change outside the files this suite's fixes touch (see each reason);
they are strict, so they fail once that change lands: then drop the mark.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from afinar import atomic, evaluate, events, oserrors
from afinar.cli import app
from afinar.runs import RunWriter
from afinar.train import run_training

from conftest import crash, tiny_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], prog_name="afinar")


def clean_exit_2(result, *needles: str) -> None:
    said = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    for needle in needles:
        assert needle in said, said


@pytest.fixture(scope="module")
def cfg(tiny_model, data_files):
    return tiny_config(tiny_model, "train.max_steps=4", "train.save_every=2", "train.eval_every=2",
                       "train.log_every=1", train=data_files[0], val=data_files[1])


@pytest.fixture(scope="module")
def crashed(cfg, tmp_path_factory) -> Path:
    """`.partial/` of a run that crashed at step 3, with a checkpoint at step 2."""
    return crash(cfg, tmp_path_factory.mktemp("crashed") / "run", 3)


@pytest.fixture(scope="module")
def finished(cfg, tmp_path_factory) -> Path:
    return run_training(cfg, tmp_path_factory.mktemp("finished") / "run").output


@pytest.fixture
def partial(crashed, tmp_path) -> Path:
    copy = tmp_path / "run.partial"
    shutil.copytree(crashed, copy)
    return copy


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file where an output's parent folder would go (`echo hi > bfile`)."""
    path = tmp_path / "bfile"
    path.write_text("hi\n")
    return path


def step(n: int) -> events.Step:
    return events.Step(step=n, epoch=0.5, loss=1.0 / n, lr=1e-3, grad_norm=1.0, tokens=10, tokens_per_s=5.0,
                       elapsed_s=n, memory_mb=1.0, peak_memory_mb=1.0)


def lines(*records: events.Event) -> bytes:
    return "".join(events.to_json(e) + "\n" for e in records).encode()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "afinar" and r.levelno == logging.WARNING]


def steps_in(path: Path) -> list[int]:
    return [e.step for e in events.read_metrics(path) if isinstance(e, events.Step)]


# ---------------------------------------------------------------- A, B: metrics.jsonl with a damaged line


def test_a_bad_middle_line_is_skipped_with_a_warning_and_later_records_kept(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(step(1), step(2)) + b'{"event": "step", "ste\n' + lines(step(3), events.Notice("café"))
                     + b'{"event": "st')
    with caplog.at_level(logging.WARNING, logger="afinar"):
        got = events.read_metrics(path)
    assert got == [step(1), step(2), step(3), events.Notice("café")]
    (warning,) = warnings_of(caplog)
    assert f"{path}: line 3 is not a metrics record" in warning and '{"event": "step", "ste' in warning
    assert "line 6" not in warning  # the torn last line is a crash's, dropped without a word


def test_a_torn_utf8_last_line_is_dropped_silently(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(step(1), events.Notice("aplicação")) + '{"event": "notice", "text": "aplica'.encode()
                     + b"\xc3")
    with caplog.at_level(logging.WARNING, logger="afinar"):
        assert events.read_metrics(path) == [step(1), events.Notice("aplicação")]
    assert warnings_of(caplog) == []


def test_an_undecodable_middle_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(step(1)) + b'{"event": "notice", "message": "aplica\xc3\xa7\xc3"}\n'
                     + b'{"event": "step"}\n' + lines(step(2)))
    with caplog.at_level(logging.WARNING, logger="afinar"):
        assert events.read_metrics(path) == [step(1), step(2)]
    (warning,) = warnings_of(caplog)
    assert f"{path}: lines 2, 3 are not metrics records" in warning


def test_a_message_with_a_unicode_line_separator_is_one_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(events.Notice("um\u2028dois"), step(1)))
    assert events.read_metrics(path) == [events.Notice("um\u2028dois"), step(1)]


def test_resume_keeps_the_records_after_a_bad_middle_line(cfg, partial, caplog):
    metrics = partial / "metrics.jsonl"
    records = metrics.read_bytes().split(b"\n")
    first_step = next(i for i, line in enumerate(records) if b'"event": "step"' in line)
    metrics.write_bytes(b"\n".join([*records[:first_step + 1], b"{damaged", *records[first_step + 1:]]))
    with caplog.at_level(logging.WARNING, logger="afinar"):
        run = run_training(cfg, partial.with_name("run"), resume=True).output
    assert steps_in(run / "metrics.jsonl") == [1, 2, 3, 4]  # step 2 came after the bad line: kept
    assert any(f"{metrics}: line {first_step + 2} is not a metrics record" in w for w in warnings_of(caplog))


def test_cli_resume_after_a_torn_utf8_last_line(partial):
    with open(partial / "metrics.jsonl", "ab") as f:
        f.write('{"event": "notice", "text": "aplica'.encode() + b"\xc3")
    result = invoke("train", "--resume", partial.with_name("run"))
    assert result.exit_code == 0, result.output
    assert steps_in(partial.with_name("run") / "metrics.jsonl") == [1, 2, 3, 4]


# ---------------------------------------------------------------- C: output paths, checked before the work


def test_check_writable_names_what_stops_the_write(tmp_path, blocker):
    oserrors.check_writable(tmp_path / "new" / "deeper" / "eval.json", file_name="eval.json")  # created when written
    with pytest.raises(oserrors.AfinarError) as err:
        oserrors.check_writable(tmp_path, file_name="eval.json")
    assert f"{tmp_path} is a folder, but --output names the file to write" in str(err.value)
    assert f"e.g. {tmp_path / 'eval.json'}" in str(err.value)
    for path in (blocker / "x.json", blocker / "sub" / "deeper"):
        with pytest.raises(oserrors.EnvironmentFailure) as err:
            oserrors.check_writable(path)
        assert (err.value.reason, err.value.path, err.value.exit_code) == (oserrors.NOT_A_FOLDER, path, 2)
        assert f"{blocker} is a regular file, not a folder" in str(err.value)


def refuse_writes_in(monkeypatch, folder: Path, read_only: bool) -> None:
    """`folder` as a user without write permission, or on a read-only filesystem, sees it (tests run as root)."""
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: not (Path(p) == folder and mode & os.W_OK)
                        and real_access(p, mode, **kw))

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly() if read_only and Path(p) == folder else real_statvfs(p))


@pytest.mark.parametrize("read_only,reason,words", [
    (True, oserrors.READ_ONLY, "its filesystem is read-only. Choose another --output on a writable disk"),
    (False, oserrors.NO_PERMISSION, "No permission to write"),
], ids=["read-only", "no-permission"])
def test_check_writable_refuses_a_folder_that_cannot_be_written(tmp_path, monkeypatch, read_only, reason, words):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text("{}")  # a second evaluation: the folder is the problem, not the old file
    refuse_writes_in(monkeypatch, run, read_only)
    with pytest.raises(oserrors.EnvironmentFailure) as err:
        evaluate.check_output(run / "eval.json")
    assert err.value.reason == reason and words in str(err.value) and str(run / "eval.json") in str(err.value)
    if not read_only:
        assert f"Fix the permissions of {run}," in str(err.value)


def test_eval_results_are_kept_when_the_final_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "run" / "eval.json"
    result = {"run": "run", "quality": {"fact_recall": 0.5}, "answers": [{"answer": "Faro, São Luís"}]}

    def refuse(path, obj):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(atomic, "write_json", refuse)
    with pytest.raises(oserrors.EnvironmentFailure, match="A copy of the results is kept in ") as err:
        evaluate.write_results(target, result)
    assert err.value.reason == oserrors.READ_ONLY and f"Cannot write {target}" in str(err.value)
    kept = Path(str(err.value).split("A copy of the results is kept in ")[1].rstrip("."))
    try:
        assert json.loads(kept.read_text(encoding="utf-8")) == result
    finally:
        kept.unlink()


def test_compare_output_under_a_file_fails_before_evaluating(finished, blocker, monkeypatch):
    from afinar import compare

    monkeypatch.setattr(compare, "evaluate_in_process", lambda *a, **k: pytest.fail("evaluated before the check"))
    result = invoke("compare", finished, finished, "-o", blocker / "sub")
    clean_exit_2(result, f"{blocker} is a regular file", "Choose another --output")


def no_merge(monkeypatch) -> None:
    import afinar.backends

    monkeypatch.setattr(afinar.backends, "answering_backend", lambda cfg: pytest.fail("merged before the check"))


@pytest.mark.parametrize("args,flag", [
    (("--to", "mlx", "-o", "{b}/sub"), "--output"),
    (("--merged", "{b}/sub"), "--merged"),
    (("--to", "gguf", "{b}/sub.gguf"), "OUT.gguf"),
], ids=["mlx", "merged", "gguf"])
def test_export_output_under_a_file_fails_before_the_work(finished, blocker, monkeypatch, args, flag):
    no_merge(monkeypatch)
    result = invoke("export", finished, *(a.format(b=blocker) for a in args))
    clean_exit_2(result, f"{blocker} is a regular file", f"Choose another {flag}")


def test_export_gguf_onto_a_folder_is_named(finished, tmp_path, monkeypatch):
    no_merge(monkeypatch)
    folder = tmp_path / "model.gguf"
    folder.mkdir()
    result = invoke("export", finished, "--to", "gguf", folder, "--overwrite")
    clean_exit_2(result, f"{folder} is a folder, but OUT.gguf names the file to write", str(folder / "run.gguf"))


def test_export_disk_full_at_the_end_is_a_clean_error(finished, tmp_path, monkeypatch):
    from afinar import adapters

    def full(source, output):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapters, "peft_to_mlx", full)
    out = tmp_path / "mlx"
    result = invoke("export", finished, "--to", "mlx", "-o", out)
    clean_exit_2(result, f"No space left on the disk holding {out}", "Free some space")


@pytest.mark.parametrize("case", ["folder", "under-a-file", "read-only-run"])
def test_eval_output_is_checked_before_evaluating(finished, blocker, tmp_path, monkeypatch, case):
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: pytest.fail("evaluated before the check"))
    args, needle = {"folder": (["-o", tmp_path], f"e.g. {tmp_path / 'eval.json'}"),
                    "under-a-file": (["-o", blocker / "x.json"], f"{blocker} is a regular file"),
                    "read-only-run": ([], "its filesystem is read-only")}[case]
    if case == "read-only-run":
        refuse_writes_in(monkeypatch, finished, read_only=True)
    clean_exit_2(invoke("eval", finished, *args), needle)


def test_eval_write_failure_at_the_end_keeps_the_results(finished, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: {"run": str(finished), "answers": []})

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_json", full)
    result = invoke("eval", finished, "--json")
    clean_exit_2(result, f"No space left on the disk holding {finished / 'eval.json'}", "A copy of the results is kept in")
    Path(" ".join(result.output.split()).split("A copy of the results is kept in ")[1].split()[0].rstrip(".")).unlink()


# ---------------------------------------------------------------- D: a full disk when a resume rewrites metrics.jsonl


def test_resume_on_a_full_disk_is_a_clean_error(cfg, partial, monkeypatch):
    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    writer = RunWriter.reopen(partial.with_name("run"), cfg)
    monkeypatch.setattr(atomic, "write_text", full)
    try:
        with pytest.raises(oserrors.EnvironmentFailure, match="Free some space") as err:
            writer.truncate(2)
    finally:
        writer.release()
    assert err.value.reason == oserrors.NO_SPACE and err.value.path == partial / "metrics.jsonl"


def test_eval_of_a_run_replaced_meanwhile_is_not_written_into_it(finished, tmp_path, monkeypatch):
    copy = shutil.copytree(finished, tmp_path / "run")
    before = (copy / "eval.json").read_bytes() if (copy / "eval.json").exists() else None
    metadata = json.loads((copy / "metadata.json").read_text())

    def evaluated_then_replaced(run, *a, **k):  # `train --overwrite` published a new run during the evaluation
        replaced = {**metadata, "adapter": {**metadata["adapter"], "sha256": "f" * 64}}
        (copy / "metadata.json").write_text(json.dumps(replaced))
        return {"run": str(run), "answers": [], "adapter_sha256": metadata["adapter"]["sha256"]}

    monkeypatch.setattr(evaluate, "evaluate_run", evaluated_then_replaced)
    result = invoke("eval", copy)
    clean_exit_2(result, "was replaced while it was evaluated", "A copy of the results is kept in", f"afinar eval {copy}")
    assert ((copy / "eval.json").read_bytes() if (copy / "eval.json").exists() else None) == before
    Path(" ".join(result.output.split()).split("A copy of the results is kept in ")[1].split()[0].rstrip(".")).unlink()
    # an unchanged run takes its results as before
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run, *a, **k: {"run": str(run), "answers": [],
                                                                        "adapter_sha256": "f" * 64})
    assert invoke("eval", copy, "--json").exit_code == 0 and json.loads((copy / "eval.json").read_text())["adapter_sha256"] == "f" * 64
