"""What a run trained on, fingerprinted: its data files (sha256) and a local base model (config and file sizes).

A run records them when it starts (`inputs.json` in `<output>.partial/`); a resume compares them
like the config, so a training file edited at the same path, or another model copied into the
base's folder, is refused (or, with --force, recorded in metadata as what the first steps saw).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from afinar import data, models
from afinar.config import Config

KIND = {"model.base": "fingerprint of config.json and the weight files' sizes"}  # else sha256 of the file


def fingerprints(cfg: Config, model: models.ResolvedModel) -> dict:
    """{"data.train" | "data.val" | "model.base": {setting, path, sha256 | fingerprint}} of a run."""
    found = {f"data.{split}": {"setting": value, "path": str(data.resolve_path(value).resolve()),
                               "sha256": data.content_sha256(data.resolve_path(value))}
             for split, value in (("train", cfg.data.train), ("val", cfg.data.val)) if value}
    found["model.base"] = {"setting": cfg.model.base, "path": model.path, "fingerprint": model_fingerprint(model)}
    return found


def model_fingerprint(model: models.ResolvedModel) -> str | None:
    """sha256 of a local model's config.json and weight index, and of its weight files' names and sizes: not
    their bytes (models.content_hash reads those, once, for metadata.json), so resuming stays instant while a
    swapped or re-downloaded model still shows. None for a hub id (the hub cache pins no revision here)."""
    folder = Path(model.path)
    if not model.is_local or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json" or path.name.endswith(".index.json"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        elif path.suffix in (".safetensors", ".bin", ".gguf"):
            digest.update(f"{path.name}:{path.stat().st_size}\0".encode())
    return digest.hexdigest()


def _hash(entry: dict) -> str | None:
    value = entry.get("sha256") or entry.get("fingerprint")
    return value if isinstance(value, str) else None


def replaced(before: dict, after: dict) -> list[tuple[str, dict, str, str]]:
    """(name, entry now, old hash, new hash) for each input whose setting is unchanged but content is not.

    A changed setting (another data.train) is a config change, named as such.
    """
    found = []
    for name, entry in after.items():
        old = before.get(name)
        if not (isinstance(entry, dict) and isinstance(old, dict)) or old.get("setting") != entry.get("setting"):
            continue
        if (a := _hash(old)) and (b := _hash(entry)) and a != b:
            found.append((name, entry, a, b))
    return found


def read(path: Path) -> dict | None:
    """inputs.json, or None when the run has none (started by an older afinar) or it is unreadable."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict):
        return None
    found["replaced"] = [h for h in found.get("replaced") or []
                         if isinstance(h, dict) and isinstance(h.get("until_step"), int)]
    return found
