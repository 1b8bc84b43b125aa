"""Data beyond plain JSONL: ShareGPT, JSON documents, Parquet, saved Hugging Face datasets; `data check` / `data split`.

Each format is checked against the same rows written as plain JSONL (the reference reader), and
the Parquet files and dataset folders are written by pyarrow and by `datasets` themselves.
"""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
from typer.testing import CliRunner

from afinar import datacheck
from afinar.cli import app
from afinar.data import SHAPE_NAMES, content_sha256, read_examples, read_jsonl, split_file
from afinar.errors import AfinarError

from conftest import QA, qa_rows, tiny_config, write_jsonl

runner = CliRunner()
SYSTEM = "Responde em português europeu."


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(AfinarError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def same_examples(got, want) -> None:
    assert [(e.messages, e.text, e.keywords) for e in got] == [(e.messages, e.text, e.keywords) for e in want]


def messages_rows(items=QA) -> list[dict]:
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}], "keywords": k} for q, a, k in items]


def sharegpt_rows(items=QA) -> list[dict]:
    return [{"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": q},
                               {"from": "gpt", "value": a}], "keywords": k} for q, a, k in items]


def alpaca_rows(items=QA) -> list[dict]:
    return [{"instruction": "Responde à pergunta sobre o Farense.", "input": q, "output": a, "keywords": k} for q, a, k in items]


def write_json(path, value, indent=2):
    path.write_text(json.dumps(value, ensure_ascii=False, indent=indent), encoding="utf-8")
    return path


def pyarrow_or_skip():
    return pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'afinar[data]')")


def datasets_or_skip():
    return pytest.importorskip("datasets", reason="the `datasets` library writes these folders (pip install 'afinar[test]')")


# ---------------------------------------------------------------- ShareGPT


def test_sharegpt_jsonl_reads_as_chat_with_one_notice(tmp_path):
    path = write_jsonl(tmp_path / "sg.jsonl", sharegpt_rows())
    data = read_examples(path)
    assert (data.format, data.shape) == ("jsonl", "sharegpt")
    # one notice for the file, not one per line
    assert data.notices == [f"{path}: read as ShareGPT (conversations/from/value -> messages/role/content; "
                            "roles human -> user, gpt -> assistant)"]
    same_examples(data.examples, read_jsonl(write_jsonl(tmp_path / "plain.jsonl", messages_rows())))
    assert data.examples[1].source == f"{path}:2"


def test_sharegpt_variants(tmp_path):
    """"messages" with from/value, roles in other spellings, a top-level "system" field."""
    rows = [{"messages": [{"from": "Human", "value": "Onde joga o Farense?"}, {"from": "bot", "value": "Em Faro."}]},
            {"messages": [{"from": "user", "value": "E a cor?"}, {"from": "model", "value": "Branco e preto."}]},
            {"system": SYSTEM, "messages": [{"from": "human", "value": "Alcunha?"}, {"from": "assistant", "value": "Leões."}]}]
    data = read_examples(write_jsonl(tmp_path / "sg.jsonl", rows))
    assert data.shape == "sharegpt"
    assert data.examples[0].messages == [{"role": "user", "content": "Onde joga o Farense?"}, {"role": "assistant", "content": "Em Faro."}]
    assert data.examples[2].messages[0] == {"role": "system", "content": SYSTEM}
    (notice,) = data.notices
    for said in ("messages/from/value -> messages/role/content", "Human -> user", "bot -> assistant", "model -> assistant",
                 '"system" -> a first system turn'):
        assert said in notice
    assert "user -> " not in notice  # names only what was renamed


def test_messages_data_keeps_strict_roles(tmp_path):
    """Plain {"role", "content"} messages are not ShareGPT: a foreign role stays an error naming the fix."""
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "gpt", "content": "b"}]}])
    msg = error_of(read_examples, path)
    assert f"{path}:1 messages[1]" in msg and 'Rename it to "assistant"' in msg


def test_sharegpt_json_array(tmp_path):
    path = write_json(tmp_path / "sg.json", sharegpt_rows())
    data = read_examples(path)
    assert (data.format, data.shape) == ("json", "sharegpt")
    assert len(data.notices) == 1 and "read as ShareGPT" in data.notices[0]
    same_examples(data.examples, read_jsonl(write_jsonl(tmp_path / "plain.jsonl", messages_rows())))
    assert [e.source for e in data.examples[:2]] == [f"{path} item 1", f"{path} item 2"]


def test_sharegpt_errors_name_the_turn(tmp_path):
    rows = sharegpt_rows(QA[:1]) + [{"conversations": [{"from": "human", "value": "Olá"}, {"from": "gpt", "value": ""}]}]
    msg = error_of(read_examples, write_json(tmp_path / "sg.json", rows))
    assert "sg.json item 2 conversations[1]" in msg and '"value" is empty' in msg
    rows = [{"conversations": [{"from": "human", "value": "Olá"}]}]
    assert "no assistant message" in error_of(read_examples, write_jsonl(tmp_path / "sg.jsonl", rows))


# ---------------------------------------------------------------- JSON documents


def test_alpaca_json_array(tmp_path):
    path = write_json(tmp_path / "alpaca.json", alpaca_rows())
    data = read_examples(path)
    assert (data.format, data.shape, data.notices) == ("json", "instruction", [])
    same_examples(data.examples, read_jsonl(write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())))
    assert data.examples[0].messages[0]["content"] == f"Responde à pergunta sobre o Farense.\n\n{QA[0][0]}"
    assert data.examples[-1].source == f"{path} item {len(QA)}"
    # the old name every caller uses reads it too
    same_examples(read_jsonl(path), data.examples)


def test_json_object_holding_one_list(tmp_path):
    path = write_json(tmp_path / "wrapped.json", {"version": 2, "data": qa_rows()})
    data = read_examples(path)
    assert data.shape == "question_answer" and len(data.examples) == len(QA)
    assert data.notices == [f'{path}: read the list under "data"']
    assert data.examples[2].source == f"{path} item 3"


def test_json_lines_named_json(tmp_path):
    """Many datasets ship JSON Lines as .json: read as JSONL, and said so."""
    path = write_jsonl(tmp_path / "lines.json", qa_rows())
    data = read_examples(path)
    assert data.format == "jsonl" and len(data.examples) == len(QA)
    assert data.notices == [f"{path}: read as JSON Lines (one object per line), not one JSON document"]
    assert data.examples[1].source == f"{path}:2"


def test_json_one_example_and_crlf_bom(tmp_path):
    path = tmp_path / "one.json"
    text = json.dumps({"question": "Onde?", "answer": "Em Faro."}, indent=2).replace("\n", "\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    (ex,) = read_examples(path).examples
    assert ex.question == "Onde?" and ex.source == f"{path} item 1"


@pytest.mark.parametrize("text, needles", [
    ('[{"question": "a", "answer": "b"}, {"question": "c"}]', ["item 2", '"question" needs "answer"', "each item an object"]),
    ('[{"question": "a", "answer": "b"}, "c"]', ["item 2", "expected a JSON object", 'got a string "c"']),
    ('[{"question": "a", "answer": "b"}, {"text": "c"}]', ["item 2", "shape 'text' but item 1 has shape 'question_answer'"]),
    ('[\n  {"question": "a", "answer": "b"},\n  {"question": "c" "answer": "d"}\n]', [":3 (item 2)", "Expecting ',' delimiter"]),
    ('[\n  {"question": "a", "answer": "b"}\n  {"question": "c", "answer": "d"}\n]', [":3 (item 1)", "Expecting ',' delimiter or ']'"]),
    ("[{'question': 'a', 'answer': 'b'}]", [":1 (item 1)", "double quotes", "Python dict"]),
    ('[{"question": "a", "answer": "b"}] []', [":1:", "Extra data after the array"]),
    ('[]', ["no examples", "the array is empty"]),
    ('  \n', ["no examples", "only whitespace"]),
    ('"perguntas"', ['expected a JSON array of examples, got a string "perguntas"']),
    ('{"version": 1, "name": "x"}', ['no list field (keys: "version", "name")']),
    ('[' * 5000 + ']' * 5000, ["nested too deeply"]),
], ids=["bad_item", "not_object", "mixed_shapes", "syntax", "missing_comma", "single_quotes", "extra_data", "empty_array",
        "blank", "string", "no_list", "too_deep"])
def test_json_errors(tmp_path, text, needles):
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    msg = error_of(read_examples, path)
    assert msg.startswith(str(path))
    for needle in needles:
        assert needle in msg, msg


def test_json_refusals_come_from_the_text_reader(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b'[\n{"question": "Onde?", "answer": "S\xe3o Lu\xeds"}\n]')
    msg = error_of(read_examples, tmp_path / "latin1.json")
    assert f"{tmp_path / 'latin1.json'}:2: not UTF-8" in msg and "iconv" in msg
    (tmp_path / "gz.json").write_bytes(b"\x1f\x8b\x08\x00rest")
    assert "gzip-compressed" in error_of(read_examples, tmp_path / "gz.json")


# ---------------------------------------------------------------- Parquet


def test_parquet_written_by_pyarrow(tmp_path):
    pa = pyarrow_or_skip()
    import pyarrow.parquet as pq

    rows = alpaca_rows()
    path = tmp_path / "alpaca.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # several row groups, read in order
    data = read_examples(path)
    assert (data.format, data.shape) == ("parquet", "instruction")
    same_examples(data.examples, read_jsonl(write_jsonl(tmp_path / "alpaca.jsonl", rows)))
    assert data.examples[4].source == f"{path} row 5"
    # found by its bytes, whatever the name
    (tmp_path / "renamed.data").write_bytes(path.read_bytes())
    assert read_examples(tmp_path / "renamed.data").format == "parquet"


def test_parquet_bad_row_and_bad_file(tmp_path):
    pa = pyarrow_or_skip()
    import pyarrow.parquet as pq

    rows = qa_rows(QA[:3])
    rows[1]["question"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    msg = error_of(read_examples, tmp_path / "d.parquet")
    assert f"{tmp_path / 'd.parquet'} row 2" in msg and '"question" is null' in msg
    (tmp_path / "fake.parquet").write_text("not parquet")
    assert "not a readable Parquet file" in error_of(read_examples, tmp_path / "fake.parquet")


@pytest.mark.parametrize("kind", ["parquet", "hf-dataset"])
def test_missing_pyarrow_says_how_to_install(tmp_path, monkeypatch, kind):
    if kind == "parquet":
        path = tmp_path / "d.parquet"
        path.write_bytes(b"PAR1" + b"\x00" * 16 + b"PAR1")
    else:
        path = tmp_path / "saved"
        path.mkdir()
        (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        (path / "data-00000-of-00001.arrow").write_bytes(b"\xff\xff\xff\xff")
    for module in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)  # `import pyarrow` now raises ImportError
    msg = error_of(read_examples, path)
    assert str(path) in msg and "needs pyarrow" in msg and "pip install 'afinar[data]'" in msg


# ---------------------------------------------------------------- saved Hugging Face datasets


def test_hf_dataset_folder_written_by_datasets(tmp_path):
    datasets = datasets_or_skip()
    rows = qa_rows()
    folder = tmp_path / "saved"
    # shuffled and cut (an indices mapping), in two shards: the order must be the one `datasets` reads back
    datasets.Dataset.from_list(rows).shuffle(seed=1).select(range(7)).save_to_disk(str(folder), num_shards=2)
    data = read_examples(folder)
    assert (data.format, data.shape, data.path) == ("hf-dataset", "question_answer", folder)
    assert len(list(folder.glob("*.arrow"))) == 2
    expected = datasets.load_from_disk(str(folder)).to_list()
    same_examples(data.examples, read_jsonl(write_jsonl(tmp_path / "ref.jsonl", expected)))
    assert data.examples[6].source == f"{folder} row 7"


def test_hf_dataset_dict_reads_train_unless_a_split_is_named(tmp_path):
    datasets = datasets_or_skip()
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sharegpt_rows(QA[:6])),
                          "validation": datasets.Dataset.from_list(sharegpt_rows(QA[6:]))}).save_to_disk(str(folder))
    train = read_examples(folder)
    assert (train.format, train.shape, len(train.examples)) == ("hf-dataset", "sharegpt", 6)
    assert train.notices[0] == (f"{folder}: a saved Hugging Face DatasetDict: read its 'train' split (splits: train, "
                                f"validation); pass {folder / 'validation'} to read another")
    assert any("read as ShareGPT" in n for n in train.notices)
    same_examples(train.examples, read_jsonl(write_jsonl(tmp_path / "ref.jsonl", messages_rows(QA[:6]))))
    val = read_examples(folder / "validation")
    assert len(val.examples) == 2 and f"{folder / 'validation'}: split 'validation'" in val.notices[0]
    assert datacheck.find_files(folder) == {"train": folder, "val": folder / "validation"}


def test_hf_dataset_dict_without_train(tmp_path):
    datasets = datasets_or_skip()
    datasets.DatasetDict({"test": datasets.Dataset.from_list(qa_rows())}).save_to_disk(str(tmp_path / "dd"))
    msg = error_of(read_examples, tmp_path / "dd")
    assert "without a 'train' split (splits: test)" in msg and f"e.g. {tmp_path / 'dd' / 'test'}" in msg


def test_folder_and_shard_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "all.jsonl").write_text("{}")
    msg = error_of(read_examples, tmp_path)
    assert "is a folder, not a data file" in msg and "nor a saved Hugging Face dataset" in msg
    assert "It holds all.jsonl: pass it" in msg
    shard = tmp_path / "saved" / "data-00000-of-00001.arrow"
    shard.parent.mkdir()
    shard.write_bytes(b"\xff\xff\xff\xff")
    assert f"pass its folder, {shard.parent}" in error_of(read_examples, shard)
    (shard.parent / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00001-of-00002.arrow"}]}))
    assert "missing files: data-00001-of-00002.arrow" in error_of(read_examples, shard.parent)


def test_content_sha256(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows())
    assert content_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    (folder / "data-00000-of-00001.arrow").write_bytes(b"a")
    before = content_sha256(folder)
    (folder / "data-00000-of-00001.arrow").write_bytes(b"b")
    assert content_sha256(folder) != before


# ---------------------------------------------------------------- data check


def test_data_check_names_every_shape_and_format(tmp_path, tiny_tokenizer, make_cfg):
    pyarrow_or_skip()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(alpaca_rows()), tmp_path / "alpaca.parquet")
    files = {
        "question_answer": write_jsonl(tmp_path / "qa.jsonl", qa_rows()),
        "prompt_completion": write_json(tmp_path / "pc.json", [{"prompt": q, "completion": a} for q, a, _ in QA]),
        "instruction": tmp_path / "alpaca.parquet",
        "messages": write_jsonl(tmp_path / "chat.jsonl", messages_rows()),
        "sharegpt": write_json(tmp_path / "sg.json", sharegpt_rows()),
        "text": write_jsonl(tmp_path / "text.jsonl", [{"text": f"{q} {a}"} for q, a, _ in QA]),
    }
    assert set(files) == set(SHAPE_NAMES)
    read = {shape: read_examples(path) for shape, path in files.items()}
    report = datacheck.check(read, make_cfg(), tiny_tokenizer)
    got = {r["split"]: (r["shape"], r["format"]) for r in report["files"].values()}
    assert got == {"question_answer": ("question/answer", "jsonl"), "prompt_completion": ("prompt/completion", "json"),
                   "instruction": ("instruction", "parquet"), "messages": ("chat (messages)", "jsonl"),
                   "sharegpt": ("ShareGPT", "json"), "text": ("text", "jsonl")}
    assert report["files"][str(files["sharegpt"])]["notices"] == read["sharegpt"].notices


def test_data_check_cli_on_a_json_folder(tmp_path, tiny_model):
    """A folder with train.json (duplicates) and val.jsonl: format and shape rows, the notice, "repeats item N"."""
    write_json(tmp_path / "train.json", sharegpt_rows(QA[:5] + QA[:1]))
    write_jsonl(tmp_path / "val.jsonl", qa_rows(QA[5:]))
    result = runner.invoke(app, ["data", "check", str(tmp_path), "--set", f"model.base={tiny_model}"])
    assert result.exit_code == 0, result.output
    out = "".join(result.stdout.split())  # the console wraps at its width
    assert "format│json│jsonl" in out and "shape│ShareGPT│question/answer" in out
    assert f"note:{tmp_path / 'train.json'}:readasShareGPT" in out
    assert f"{tmp_path / 'train.json'}item6repeatsitem1" in out


def test_find_files_refuses_two_train_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", qa_rows())
    write_json(tmp_path / "train.json", qa_rows())
    assert "holds train.jsonl and train.json: keep one train file" in error_of(datacheck.find_files, tmp_path)


# ---------------------------------------------------------------- data split


def split(*args):
    return runner.invoke(app, ["data", "split", *map(str, args)])


def test_split_refuses_to_overwrite_without_flag(tmp_path):
    src = write_jsonl(tmp_path / "all.jsonl", qa_rows())
    out = tmp_path / "out"
    assert split(src, "--out-dir", out, "--val-fraction", "0.25").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = split(src, "--out-dir", out, "--val-fraction", "0.25", "--seed", "5")
    assert result.exit_code == 2 and "Traceback" not in result.output
    said = " ".join(result.stderr.split())
    assert f"{out / 'train.jsonl'} and {out / 'val.jsonl'} already exist" in said and "--overwrite" in said
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # one of the two is enough to refuse
    (out / "train.jsonl").unlink()
    said = " ".join(split(src, "--out-dir", out).stderr.split())
    assert f"{out / 'val.jsonl'} already exists: pass --overwrite to replace it" in said
    # --overwrite replaces both, and leaves nothing else behind
    result = split(src, "--out-dir", out, "--val-fraction", "0.25", "--seed", "5", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl", "val.jsonl"]
    assert (out / "val.jsonl").read_bytes() != before["val.jsonl"]
    lines = sorted((out / "train.jsonl").read_text().splitlines() + (out / "val.jsonl").read_text().splitlines())
    assert lines == sorted(src.read_text().splitlines())


def test_split_never_overwrites_its_input_even_with_the_flag(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", qa_rows())
    result = split(src, "--overwrite")
    assert result.exit_code == 2 and "would overwrite the input" in result.stderr
    assert read_jsonl(src) and not (tmp_path / "val.jsonl").exists()


def test_split_other_formats_writes_their_records_as_jsonl(tmp_path):
    path = write_json(tmp_path / "sg.json", sharegpt_rows())
    result = split_file(path, 0.25, 0, tmp_path / "out")
    assert result.notices == read_examples(path).notices
    written = [json.loads(line) for p in (result.train_path, result.val_path) for line in p.read_text().splitlines()]
    key = lambda row: json.dumps(row, sort_keys=True)
    assert sorted(written, key=key) == sorted(sharegpt_rows(), key=key)
    assert result.n_train + result.n_val == len(QA) and result.n_val == 2
    assert read_examples(result.val_path).shape == "sharegpt"


def test_split_hf_dataset(tmp_path):
    datasets = datasets_or_skip()
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(qa_rows()).save_to_disk(str(folder))
    result = split(folder, "--val-fraction", "0.25")
    assert result.exit_code == 0, result.output
    back = read_jsonl(tmp_path / "train.jsonl") + read_jsonl(tmp_path / "val.jsonl")
    assert sorted(e.question for e in back) == sorted(q for q, _, _ in QA)


# ---------------------------------------------------------------- training reads them too


def test_training_config_takes_json_and_parquet(tmp_path, tiny_model):
    pa = pyarrow_or_skip()
    import pyarrow.parquet as pq

    from afinar.train import run_training

    train = write_json(tmp_path / "train.json", alpaca_rows(QA[:6]))
    pq.write_table(pa.Table.from_pylist(sharegpt_rows(QA[6:])), tmp_path / "val.parquet")
    cfg = tiny_config(tiny_model, "train.max_steps=1", "train.save_every=100", train=train, val=tmp_path / "val.parquet")
    run = run_training(cfg, tmp_path / "run").output
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["data"]["train"]["examples"] == 6 and metadata["data"]["val"]["examples"] == 2


def test_training_config_takes_a_saved_dataset_folder(tmp_path, tiny_model):
    datasets = datasets_or_skip()
    from afinar.train import run_training

    datasets.DatasetDict({"train": datasets.Dataset.from_list(qa_rows(QA[:6])),
                          "validation": datasets.Dataset.from_list(qa_rows(QA[6:]))}).save_to_disk(str(tmp_path / "dd"))
    cfg = tiny_config(tiny_model, "train.max_steps=1", "train.save_every=100", train=tmp_path / "dd", val=tmp_path / "dd" / "validation")
    run = run_training(cfg, tmp_path / "run").output
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["data"]["train"] == {"setting": str(tmp_path / "dd"), "path": str(tmp_path / "dd"), "examples": 6,
                                         "sha256": content_sha256(tmp_path / "dd")}
