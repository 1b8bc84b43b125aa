"""Any data path -> a validated `Dataset`: JSONL, a JSON document, Parquet, or a saved Hugging Face dataset.

`read_examples` chooses by what the path is: a folder saved by `datasets` (`save_to_disk`: a
Dataset, or a DatasetDict whose `train` split is read unless the path names a split), a
Parquet file (by its magic bytes or `.parquet`), a `.json` document (an array of objects, or an
object holding one list) or JSONL. Every record goes through `jsonl.Rows`, so every format gets
the same Example and the same messages, naming "FILE:LINE", "FILE item N" or "FILE row N".
Parquet and Arrow are read with pyarrow (`pip install 'afinar[data]'`), batch by batch.
`split_file` writes a deterministic train/val split of any of them as JSONL.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Iterator, NamedTuple

from afinar import jsonl, textfile
from afinar.errors import AfinarError
from afinar.jsonl import Dataset, Rows

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_WHITESPACE = json.decoder.WHITESPACE  # what json itself skips between values
_DECODER = json.JSONDecoder()


def read_examples(path: str | Path, keep_rows: bool = False) -> Dataset:
    """Read and validate every example at `path`; `keep_rows` also keeps each record as a JSON line."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, keep_rows)
    textfile.check_path(path)
    if path.suffix == ".parquet" or _head(path, 4) == b"PAR1":
        return _read_parquet(path, keep_rows)
    if path.suffix == ".arrow":
        raise AfinarError(f"{path} is one shard of a saved Hugging Face dataset: pass its folder, {path.parent}.")
    if path.suffix == ".json":
        return _read_json(path, keep_rows)
    return jsonl.read(path, keep_rows)


def is_hf_dataset(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def content_sha256(path: str | Path) -> str:
    """sha256 of a data file's bytes; of a folder (a saved dataset), of each file's relative path and bytes in order."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for file in files:
        if file != path:
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise AfinarError(f"Cannot read {path}: {e.strerror}. Check the file's permissions.") from None


# ---------------------------------------------------------------- JSON documents


def _read_json(path: Path, keep_rows: bool) -> Dataset:
    """A JSON array of objects, or an object holding one list ({"data": [...]}), or one example.

    The text is read once and the array decoded item by item, so the whole tree never sits in
    memory beside it. A .json file that holds JSON Lines is read as JSONL (and says so).
    """
    text = textfile.read_text(path)
    start = _WHITESPACE.match(text, 0).end()
    if start == len(text):
        raise AfinarError(f"{path}: no examples: the file is {'empty' if not text else 'only whitespace'}. "
                          'Expected a JSON array of objects, e.g. [{"question": "...", "answer": "..."}].')
    rows = Rows(path, "json", "item", keep_rows)
    if text[start] == "[":
        for n, obj in _array_items(text, start, path):
            rows.add(n, obj)
        return rows.done("the array is empty")
    obj, end = _decode(text, start, path, None)
    if not isinstance(obj, dict):
        raise AfinarError(f"{path}: expected a JSON array of examples, got {jsonl.describe(obj)}. "
                          'Write the examples as [{"question": "...", "answer": "..."}, ...].')
    if _WHITESPACE.match(text, end).end() < len(text):  # more after the first object: JSON Lines named .json
        del text
        data = jsonl.read(path, keep_rows)
        data.notices.insert(0, f"{path}: read as JSON Lines (one object per line), not one JSON document")
        return data
    if jsonl.detect(obj) is None:  # not itself an example: the object that holds the list, e.g. {"data": [...]}
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) != 1:
            q = lambda keys: ", ".join(json.dumps(k, ensure_ascii=False) for k in keys[:8])
            what = f"{len(lists)} list fields ({q(lists)})" if lists else f"no list field (keys: {q(list(obj))})"
            raise AfinarError(f"{path}: a JSON object with {what}. Expected a JSON array of examples, or an object "
                              'holding one list of them, e.g. {"data": [{"question": "...", "answer": "..."}]}: '
                              "put each list in a file of its own.")
        rows.notices.append(f"{path}: read the list under {json.dumps(lists[0], ensure_ascii=False)}")
        for n, item in enumerate(obj[lists[0]], 1):
            rows.add(n, item)
        return rows.done(f'the list under {json.dumps(lists[0], ensure_ascii=False)} is empty')
    rows.add(1, obj)
    return rows.done("")


def _array_items(text: str, start: int, path: Path) -> Iterator[tuple[int, object]]:
    """(item number, value) of the JSON array starting at text[start] ("["), decoded one at a time."""
    pos = _WHITESPACE.match(text, start + 1).end()
    if text.startswith("]", pos):
        n = 0
    else:
        n = 1
        while True:
            obj, pos = _decode(text, pos, path, n)
            yield n, obj
            pos = _WHITESPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WHITESPACE.match(text, pos + 1).end()
                if text.startswith("]", pos):  # name the item before the trailing comma, not one that is not there
                    raise _doc_error(json.JSONDecodeError("Expecting value", text, pos), text, path, n)
                n += 1
            elif text.startswith("]", pos):
                break
            else:
                raise _doc_error(json.JSONDecodeError("Expecting ',' delimiter or ']'", text, pos), text, path, n)
    end = _WHITESPACE.match(text, pos + 1).end()
    if end < len(text):
        raise _doc_error(json.JSONDecodeError("Extra data after the array's closing ']'", text, end), text, path, None)


def _decode(text: str, pos: int, path: Path, item: int | None):
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        raise _doc_error(e, text, path, item) from None
    except (RecursionError, ValueError) as e:
        line = text.count("\n", 0, pos) + 1
        raise AfinarError(f"{path}:{line}{f' (item {item})' if item else ''}: {jsonl.unreadable(e, 'item')}") from None


def _doc_error(e: json.JSONDecodeError, text: str, path: Path, item: int | None) -> AfinarError:
    """A syntax error in a JSON document: FILE:LINE (item N), what is wrong, the fix, the line."""
    start = text.rfind("\n", 0, e.pos) + 1
    end = text.find("\n", e.pos)
    line = text[start: end if end >= 0 else len(text)].removesuffix("\r")
    where = f"{path}:{e.lineno}" + (f" (item {item})" if item else "")
    around = text[max(0, e.pos - 200): e.pos + 1]
    return AfinarError(f"{where}: {jsonl.json_error(e, line, path, document=True, around=around)}")


# ---------------------------------------------------------------- Parquet and Arrow


def _pyarrow(path: Path, what: str):
    """pyarrow, or an error saying how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (the submodule, imported for the caller)
    except ImportError:
        raise AfinarError(f"{path} is {what}: reading it needs pyarrow. Install it with pip install 'afinar[data]' "
                          "(or pip install pyarrow).") from None
    return pyarrow


def _read_parquet(path: Path, keep_rows: bool) -> Dataset:
    pa = _pyarrow(path, "a Parquet file")
    rows = Rows(path, "parquet", "row", keep_rows)
    try:
        n = 0
        for batch in pa.parquet.ParquetFile(path).iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                n += 1
                rows.add(n, obj)
    except pa.ArrowException as e:
        raise AfinarError(f"{path}: not a readable Parquet file ({str(e)[:200]}). Write it again, "
                          "e.g. with pandas.DataFrame.to_parquet or pyarrow.parquet.write_table.") from None
    return rows.done("the file holds no rows")


def _read_folder(path: Path, keep_rows: bool) -> Dataset:
    if (path / "dataset_dict.json").is_file():
        splits = _json_file(path / "dataset_dict.json").get("splits") or []
        if "train" not in splits:
            named = ", ".join(map(str, splits)) or "none"
            other = f" Pass the split's folder, e.g. {path / str(splits[0])}." if splits else ""
            raise AfinarError(f"{path} is a saved Hugging Face DatasetDict without a 'train' split (splits: {named}).{other}")
        others = [s for s in splits if s != "train"]
        said = (f"{path}: a saved Hugging Face DatasetDict: read its 'train' split (splits: {', '.join(splits)})"
                + (f"; pass {path / others[0]} to read another" if others else ""))
        return _read_hf_dataset(path / "train", keep_rows, said)
    if (path / "state.json").is_file():
        return _read_hf_dataset(path, keep_rows)
    inside = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    files = [n for n in inside if n.endswith(DATA_SUFFIXES)]
    if files:
        listing = f"It holds {', '.join(files[:5])}: pass {'it' if len(files) == 1 else 'one of them'}."
    else:
        listing = f"It holds no data file ({', '.join(inside[:5]) or 'it is empty'})."
    raise AfinarError(f"{path} is a folder, not a data file (.jsonl, .json, .parquet) nor a saved Hugging Face dataset "
                      f"(no state.json or dataset_dict.json). {listing} Check data.train / data.val or the path you passed.")


def _read_hf_dataset(folder: Path, keep_rows: bool, said: str | None = None) -> Dataset:
    """A Dataset folder from `save_to_disk`: state.json lists its Arrow shards (IPC stream format), read in order.

    `said`: the notice of a DatasetDict read through its root, instead of naming the split here."""
    state = _json_file(folder / "state.json")
    shards = [folder / f["filename"] for f in state.get("_data_files", []) if isinstance(f, dict) and "filename" in f]
    missing = [s.name for s in shards if not s.is_file()]
    if not shards or missing:
        raise AfinarError(f"{folder}/state.json lists {'no data file' if not shards else 'missing files: ' + ', '.join(missing[:3])}: "
                          "the saved dataset is incomplete. Save it again with dataset.save_to_disk(...).")
    pa = _pyarrow(folder, "a saved Hugging Face dataset")
    rows = Rows(folder, "hf-dataset", "row", keep_rows)
    # A split folder of a DatasetDict: its name is the split (state.json's "_split" is often null).
    split = state.get("_split") or (folder.name if (folder.parent / "dataset_dict.json").is_file() else None)
    if not said and split:
        said = f"{folder}: split '{split}' of a saved Hugging Face dataset"
    if said:
        rows.notices.append(said)
    n = 0
    for shard in shards:
        try:
            with pa.memory_map(str(shard)) as source:
                for batch in pa.ipc.open_stream(source):
                    for obj in batch.to_pylist():
                        n += 1
                        rows.add(n, obj)
        except pa.ArrowException as e:
            raise AfinarError(f"{shard}: not a readable Arrow file ({str(e)[:200]}). Save the dataset again.") from None
    return rows.done("the dataset holds no rows")


def _json_file(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AfinarError(f"{path}: cannot read it ({str(e)[:150]}): the saved dataset is damaged. Save it again.") from None
    if not isinstance(obj, dict):
        raise AfinarError(f"{path}: expected a JSON object: the saved dataset is damaged. Save it again.")
    return obj


# ---------------------------------------------------------------- split


class Split(NamedTuple):
    train_path: Path
    val_path: Path
    n_train: int
    n_val: int
    notices: list[str]


def split_file(path: str | Path, val_fraction: float, seed: int, out_dir: str | Path | None = None,
               overwrite: bool = False) -> Split:
    """Deterministic train/val split into JSONL; examples with the same question land on the same side.

    JSONL lines are written as they are; records of other formats as one JSON object each.
    Existing train.jsonl / val.jsonl are replaced only with `overwrite`, never the input.
    """
    if not 0 < val_fraction < 1:
        raise AfinarError(f"--val-fraction {val_fraction}: must be between 0 and 1 (e.g. 0.1).")
    path = Path(path)
    out = Path(out_dir) if out_dir else path.parent
    train_path, val_path = out / "train.jsonl", out / "val.jsonl"
    if path.resolve() in (train_path.resolve(), val_path.resolve()):
        raise AfinarError(f"Splitting {path} into {out} would overwrite the input. Pass --out-dir.")
    existing = [p for p in (train_path, val_path) if p.exists()]
    if existing and not overwrite:
        names = " and ".join(map(str, existing))
        raise AfinarError(f"{names} already exist{'s' if len(existing) == 1 else ''}: pass --overwrite to replace "
                          f"{'it' if len(existing) == 1 else 'them'}, or --out-dir DIR to write elsewhere.")
    data = read_examples(path, keep_rows=True)  # validates every record first
    groups: dict[str, list[str]] = {}
    for ex, row in zip(data.examples, data.rows):
        groups.setdefault(jsonl.normalise(ex.question or ex.answer), []).append(row)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_val = max(1, round(len(keys) * val_fraction))
    if n_val >= len(keys):
        raise AfinarError(f"{path}: {len(keys)} distinct questions are too few to split with --val-fraction {val_fraction}.")
    val_keys = set(keys[:n_val])
    train_rows = [r for k in keys if k not in val_keys for r in groups[k]]
    val_rows = [r for k in keys if k in val_keys for r in groups[k]]
    _write_pair({train_path: train_rows, val_path: val_rows})
    return Split(train_path, val_path, len(train_rows), len(val_rows), data.notices)


def _write_pair(files: dict[Path, list[str]]) -> None:
    """Write every file aside in full, then rename them into place: an old file is never left half-replaced,
    and a failure while writing leaves the old pair untouched."""
    from afinar import atomic

    staged = []
    try:
        for target, rows in files.items():
            tmp = target.with_name(f".{target.name}.new")
            atomic.write_text(tmp, "\n".join(rows) + "\n")
            staged.append((tmp, target))
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
