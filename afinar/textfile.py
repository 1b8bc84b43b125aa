"""A path -> its lines of text: UTF-8, with a clear refusal for everything that is not.

A leading byte-order mark is skipped and LF, CRLF or lone CR end a line (as in Python's
text mode, but decoding each line apart, so an encoding error names its line). Binary,
compressed and UTF-16 files are refused up front with what they are and how to convert them.
`read_text` gives a whole file (a JSON document) under the same rules.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterator

from afinar.errors import AfinarError

BOM = b"\xef\xbb\xbf"
# (leading bytes, what the file is, how to fix it)
MAGIC = (
    (b"\x1f\x8b", "gzip-compressed", "Decompress it first: gunzip -k FILE"),
    (b"BZh", "bzip2-compressed", "Decompress it first: bunzip2 -k FILE"),
    (b"\xfd7zXZ\x00", "xz-compressed", "Decompress it first: unxz -k FILE"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "Decompress it first: unzstd FILE"),
    (b"PK\x03\x04", "a ZIP archive (or an .xlsx/.docx document)", "Extract or export the JSONL file and pass that"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image", "Pass the JSONL data file"),
    (b"\xff\xd8\xff", "a JPEG image", "Pass the JSONL data file"),
    (b"GIF8", "a GIF image", "Pass the JSONL data file"),
    (b"%PDF-", "a PDF document", "Pass the JSONL data file"),
    (b"SQLite format 3\x00", "an SQLite database", "Export the rows to JSONL first"),
    (b"\xff\xfe", "UTF-16 text", "Re-save it as UTF-8, e.g. iconv -f utf-16 -t utf-8 FILE > OUT.jsonl"),
    (b"\xfe\xff", "UTF-16 text", "Re-save it as UTF-8, e.g. iconv -f utf-16 -t utf-8 FILE > OUT.jsonl"),
)


def sniff(path: Path, head: bytes) -> None:
    """Refuse binary, compressed and UTF-16 files with what they are, before reading lines."""
    for magic, what, fix in MAGIC:
        if head.startswith(magic):
            raise AfinarError(f"{path} is {what}, not UTF-8 JSONL text. {fix.replace('FILE', str(path))}.")
    if b"\x00" not in head:
        return
    if head[1::2].count(0) > len(head) // 4 or head[0::2].count(0) > len(head) // 4:
        raise AfinarError(f"{path} looks like UTF-16 text (every other byte is 0); afinar reads UTF-8. "
                          f"Re-save it as UTF-8, e.g. iconv -f utf-16 -t utf-8 {path} > data.jsonl.")
    text = head.decode("utf-8", "replace")
    odd = sum(c == "\ufffd" or (c < " " and c not in "\t\n\r\f") for c in text)
    if odd > len(text) // 10:
        raise AfinarError(f"{path} is a binary file, not JSONL text ({odd} of its first {len(text)} characters are "
                          f"not text). Pass a UTF-8 file with one JSON object per line.")


def lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, blank ones included: UTF-8, BOM skipped, LF/CRLF/CR endings."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise AfinarError(f"Cannot read {path}: {e.strerror}. Check the file's permissions.") from None
    with f:
        sniff(path, f.read(4096))
        f.seek(0)
        lineno = 0
        for chunk in f:
            chunk = chunk.removesuffix(b"\n").removesuffix(b"\r")
            for raw in chunk.split(b"\r"):  # a lone CR ends a line too, as in Python's text mode
                lineno += 1
                if lineno == 1:
                    raw = raw.removeprefix(BOM)
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise AfinarError(f"{path}:{lineno}: {_decode_error(e, raw, path)}") from None


def read_text(path: Path) -> str:
    """The whole file as text (BOM skipped), read once; the same refusals as `lines`, naming the line of a bad byte."""
    try:
        with open(path, "rb") as f:
            sniff(path, f.read(4096))
    except OSError as e:
        raise AfinarError(f"Cannot read {path}: {e.strerror}. Check the file's permissions.") from None
    try:
        # Read and decoded once (the JSON is then parsed item by item from it); newline="" keeps it as written.
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError:
        for _ in lines(path):  # raises at the first line that is not UTF-8, naming it
            pass
        raise


def _decode_error(e: UnicodeDecodeError, raw: bytes, path: Path) -> str:
    col = len(raw[: e.start].decode("utf-8", "replace")) + 1
    around = raw[max(0, e.start - 8): e.start + 24]
    near = around.decode("utf-8", "backslashreplace")
    as_latin = around.decode("cp1252", "replace")
    return (f"not UTF-8: byte 0x{raw[e.start]:02x} at column {col}, in {near} (read as Latin-1/Windows-1252: "
            f"{as_latin}). Re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > fixed.jsonl")


def check_path(path: Path) -> None:
    """A regular file, or an error saying what the path is instead (a near name when it does not exist)."""
    if path.is_file():
        return
    if path.exists():
        raise AfinarError(f"{path} is not a regular file. Pass a data file.")
    near = []
    if path.parent.is_dir():
        near = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1, cutoff=0.6)
    mean = f" Did you mean {path.parent / near[0]}?" if near else ""
    where = "" if path.is_absolute() else f" (a relative path is read from the current folder, {Path.cwd()}, not from the config file's)"
    raise AfinarError(f"Data file not found: {path}{where}.{mean} Check data.train / data.val or the path you passed.")
