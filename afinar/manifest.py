"""A folder's manifest: each file's size and sha256, written last, so later damage is found and named.

    manifest.json   {"format": 1, "files": {"optimizer.pt": {"bytes": 51531, "sha256": "..."}, ...}}

`write()` is the last write into a folder being built (atomically, like every other file): a
folder whose manifest matches holds exactly the bytes its writer produced. `verify()` says
which file is missing, empty, truncated, grown or changed since. Hashing reads every byte
once (about 1 GB/s), cheap next to writing or loading the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from afinar import atomic

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass(frozen=True)
class Damage:
    """One file that does not match its manifest entry."""

    file: str  # relative to the folder, with "/" separators
    kind: str  # missing | empty | truncated | grown | changed | unreadable | unlisted
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.file} {self.kind}" + (f": {self.detail}" if self.detail else "")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            rel = Path(root, name).relative_to(folder).as_posix()
            if rel != MANIFEST:
                found.append(rel)
    return found


def write(folder: str | Path, files: Iterable[str] | None = None) -> dict:
    """Record `files` (relative paths; default: every file under `folder`) in `folder/manifest.json`.

    Call it after everything else in `folder` is written: the manifest vouches for those bytes.
    """
    folder = Path(folder)
    entries = {}
    for rel in sorted(files) if files is not None else _files(folder):
        path = folder / rel
        entries[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": FORMAT, "files": entries}
    atomic.write_json(folder / MANIFEST, manifest)
    return manifest


def exists(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def verify(folder: str | Path, only: Iterable[str] | None = None) -> list[Damage]:
    """Every way `folder` differs from its manifest (empty list: it matches).

    `only` limits the check to those files (each must be listed). Files the manifest does not
    list are not damage (a later `eval.json`, say) and are ignored.
    """
    folder = Path(folder)
    try:
        raw = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        entries = raw["files"]
        if not isinstance(entries, dict):
            raise ValueError("'files' is not an object")
    except FileNotFoundError:
        return [Damage(MANIFEST, "missing")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [Damage(MANIFEST, "unreadable", f"{type(e).__name__}: {e}")]
    names = list(entries) if only is None else list(only)
    return [d for d in (_check(folder, rel, entries.get(rel)) for rel in names) if d is not None]


def _check(folder: Path, rel: str, entry: dict | None) -> Damage | None:
    if not isinstance(entry, dict):
        return Damage(rel, "unlisted", f"not recorded in {MANIFEST}")
    path = folder / rel
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Damage(rel, "missing")
    except OSError as e:
        return Damage(rel, "unreadable", str(e))
    expected = entry.get("bytes")
    if size != expected:
        if size == 0:
            return Damage(rel, "empty", f"0 of {expected} bytes")
        return Damage(rel, "truncated" if isinstance(expected, int) and size < expected else "grown",
                      f"{size} of {expected} bytes")
    try:
        digest = sha256_file(path)
    except OSError as e:
        return Damage(rel, "unreadable", str(e))
    if digest != entry.get("sha256"):
        return Damage(rel, "changed", "same size, different sha256")
    return None
