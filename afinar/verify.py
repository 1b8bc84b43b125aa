"""Is a run folder still what training wrote? Checked before ask, serve, eval, export and compare load it.

In order, each failure an AfinarError naming the file and the fix:
  1. the config files parse: training_config.json, metadata.json, adapter_config.json
  2. adapter_model.safetensors: not empty or cut short (size in metadata.json), its header
     parses, every tensor is half of a LoRA A/B pair, with the rank of adapter_config.json
  3. adapter_config.json agrees with those tensors (target_modules, r) and with the
     training config (lora.rank, lora.alpha, lora.target_modules)
  4. against the base model's config.json (a model built on the meta device: no weights are
     read): every adapted module exists, A is (r, in_features), B is (out_features, r), and
     every module target_modules names in the base has its matrices
  5. checksums: the adapter's sha256 in metadata.json, and manifest.json where the run has one
Checksums are what `--no-verify` skips (`checksums=False`): a file edited on purpose; the
structure checks stay, since a folder that fails them would only fail later, less clearly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afinar import adapters, manifest, runlock
from afinar import targets as lora_targets
from afinar.config import Config, build_config
from afinar.errors import AfinarError
from afinar.runpaths import partial

TRAINING_CONFIG = "training_config.json"
METADATA = "metadata.json"
ADAPTER = adapters.PEFT_WEIGHTS
ADAPTER_CONFIG = adapters.PEFT_CONFIG
# What afinar reads from a run (ask/serve/eval load the first four; export copies mlx/ too):
# the files whose manifest entries are checked.
READ_FILES = (TRAINING_CONFIG, METADATA, ADAPTER_CONFIG, ADAPTER,
              f"{adapters.MLX_SUBDIR}/{adapters.MLX_WEIGHTS}", f"{adapters.MLX_SUBDIR}/{adapters.MLX_CONFIG}")
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")
NO_VERIFY = "pass --no-verify if you changed it on purpose"


class RunDamaged(AfinarError):
    """A run folder that is not what training wrote; `file` is the one at fault."""

    exit_code = 2

    def __init__(self, file: Path, message: str):
        super().__init__(message)
        self.file = file


@dataclass
class RunInfo:
    """What `verify_run` read and checked, for the caller to load without reading it again."""

    path: Path
    cfg: Config
    metadata: dict
    adapter_config: dict
    rank: int
    modules: list[str]  # adapted module paths, e.g. model.layers.0.self_attn.q_proj
    checked: list[str] = field(default_factory=list)  # what was verified
    notes: list[str] = field(default_factory=list)  # what could not be, and why


def verify_run(run: str | Path, *, check_base: bool = True, checksums: bool = True) -> RunInfo:
    """Check the run folder `run` before anything loads it; raise RunDamaged (exit 2) naming the file.

    `check_base` compares the adapter with the base model's config.json (no weights are read);
    `checksums=False` (the CLI's --no-verify) accepts files that changed after training.
    """
    run = Path(run)
    if not run.is_dir():
        raise run_not_found(run)
    missing = [name for name in (TRAINING_CONFIG, ADAPTER_CONFIG, ADAPTER, METADATA) if not (run / name).is_file()]
    if missing:
        raise RunDamaged(run / missing[0], f"{run} is not a complete afinar run: missing {', '.join(missing)}. "
                                           "Restore the files, or train the run again.")
    raw = read_json(run / TRAINING_CONFIG)
    cfg = build_config(raw, source=str(run / TRAINING_CONFIG))
    metadata = read_json(run / METADATA)
    adapter_cfg = read_json(run / ADAPTER_CONFIG)
    rank = _rank(run / ADAPTER_CONFIG, adapter_cfg)
    info = RunInfo(run, cfg, metadata, adapter_cfg, rank, [])
    recorded = metadata.get("adapter") if isinstance(metadata.get("adapter"), dict) else None
    shapes = _adapter_shapes(run / ADAPTER, recorded if checksums else None)
    info.modules = _check_pairs(run / ADAPTER, shapes, rank, adapter_cfg, info)
    _check_against_training_config(run, cfg, adapter_cfg, rank, info.modules)
    info.checked.append("adapter structure")
    if check_base:
        _check_base(run, cfg, adapter_cfg, shapes, info)
    if checksums:
        _check_checksums(run, recorded, info)
    else:
        info.notes.append("checksums not checked (--no-verify)")
    return info


def run_not_found(run: str | Path) -> AfinarError:
    """The error for a run folder that is not there, saying what its siblings hold: a run still training
    (`RUN.partial` and a live lock holder), one that did not finish, an --overwrite cut between its renames."""
    run = Path(run)
    unfinished, old = partial(run), run.with_name(run.name + ".old")
    holder = runlock.live_holder(run)
    if holder is not None:
        return AfinarError(f"Run folder not found: {run}: it is being trained now by PID {holder.get('pid')} "
                           f"({holder.get('command', '?')}, since {holder.get('started', '?')}) in {unfinished}, "
                           "and appears when that finishes. Wait for it, or stop it and continue later with: "
                           f"afinar train --resume {run}")
    notes = []
    resumable = (unfinished / TRAINING_CONFIG).is_file()
    if resumable:
        notes.append(f"{unfinished} holds a run that did not finish")
    elif unfinished.is_dir():  # stopped before it wrote its config: nothing to resume, --output starts it again
        notes.append(f"{unfinished} holds a run that did not finish, stopped before it saved anything to resume")
    if old.is_dir():
        notes.append(f"{old} holds the run it replaces, whole: an --overwrite stopped between its two renames; "
                     f"rename it back to {run} to use it" + (", or resume, which then deletes it" if resumable else ""))
    where = f" ({'; '.join(notes)})" if notes else ""
    if resumable:
        return AfinarError(f"Run folder not found: {run}{where}. Continue it with: afinar train --resume {run}")
    return AfinarError(f"Run folder not found: {run}{where}. Train one with: afinar train --output {run}")


def _fail(path: Path, problem: str, fix: str = "Restore it from a copy, or train the run again.") -> RunDamaged:
    return RunDamaged(path, f"{path} {problem}. {fix}")


def read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(path, f"cannot be read ({e})") from None
    if not text.strip():
        raise _fail(path, f"is empty ({path.stat().st_size} bytes)")
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise _fail(path, f"is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"holds a JSON {type(obj).__name__}, not an object")
    return obj


def _rank(path: Path, cfg: dict) -> int:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(path, f"describes a {cfg.get('peft_type')!r} adapter; afinar runs hold LoRA adapters")
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _fail(path, f"has r={rank!r}; the LoRA rank must be a positive integer")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise _fail(path, f"has target_modules={targets!r}; expected a list of module names")
    return rank


def _adapter_shapes(path: Path, recorded: dict | None) -> dict[str, list[int]]:
    """{tensor name: shape} from the safetensors header (no tensor data is read)."""
    from safetensors import safe_open

    size = path.stat().st_size
    expected = recorded.get("bytes") if recorded else None
    if size == 0:
        raise _fail(path, "is empty (0 bytes" + (f"; metadata.json records {expected})" if expected else ")"))
    try:
        with safe_open(str(path), framework="numpy") as f:
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        if isinstance(expected, int) and size < expected:
            raise _fail(path, f"is truncated: {size} of {expected} bytes (the size metadata.json records)") from None
        raise _fail(path, f"is not a readable safetensors file ({e})") from None
    if not shapes:
        raise _fail(path, "holds no tensors")
    return shapes


def _check_pairs(path: Path, shapes: dict, rank: int, adapter_cfg: dict, info: RunInfo) -> list[str]:
    """The adapted module paths; each has a 2-D A (r, in) and B (out, r) with r = adapter_config.json's r."""
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        match = _PEFT_KEY.match(name)
        if not match:
            raise _fail(path, f"holds {name!r}, which is not a LoRA A/B matrix (base_model.model.<module>.lora_A/B.weight)")
        pairs.setdefault(match["path"], {})[match["which"]] = shape
    patterns = adapter_cfg.get("rank_pattern") or {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            half = "lora_B" if "A" in pair else "lora_A"
            raise _fail(path, f"has no {half} matrix for {module}")
        a, b = pair["A"], pair["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise _fail(path, f"holds lora_A {a} and lora_B {b} for {module}: not a LoRA pair (A is (r, in), B is (out, r))")
        if a[0] != rank and not patterns:
            raise _fail(path, f"holds rank-{a[0]} matrices ({module}), but {ADAPTER_CONFIG} says r={rank}: the two files "
                              "come from different runs", "Restore both from the same run, or train the run again.")
    if patterns:
        info.notes.append(f"{ADAPTER_CONFIG} has a rank_pattern: per-module ranks not checked")
    modules = sorted(pairs)
    targets = adapter_cfg["target_modules"]
    if isinstance(targets, list):
        unmatched = [m for m in modules if not _targeted(m, targets)]
        if unmatched:
            leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
            raise _fail(path.with_name(ADAPTER_CONFIG),
                        f"has target_modules={sorted(targets)}, but {ADAPTER} holds LoRA matrices for {leaves} "
                        f"(e.g. {unmatched[0]}): PEFT would silently drop those. The file was edited or comes from "
                        f"another run", "Restore it from the same run (target_modules as trained), or train the run again.")
    else:
        info.notes.append(f"{ADAPTER_CONFIG} target_modules is a pattern ({targets!r}): not compared with the tensors")
    return modules


def _targeted(module: str, targets: list[str]) -> bool:
    """Whether lora.target_modules selects `module`, as targets.py resolves it: PEFT's rule for names (the
    path is one of them or ends with '.' + one), 'all-linear' (any layer of a decoder block), and a
    fused layer (qkv_proj) standing for the separate names a preset gives (q_proj, k_proj, v_proj)."""
    if lora_targets.ALL_LINEAR in targets and lora_targets.in_block(module) is not None:
        return True
    leaf = module.rsplit(".", 1)[-1]
    names = set(targets) | ({leaf} if set(lora_targets.FUSED.get(leaf, ())) & set(targets) else set())
    return any(module == t or module.endswith("." + t) for t in names)


def _check_against_training_config(run: Path, cfg: Config, adapter_cfg: dict, rank: int, modules: list[str]) -> None:
    """adapter_config.json must say what training_config.json trained (the MLX backend builds from the latter)."""
    lora = cfg.lora
    problems = []
    if lora.rank != rank:
        problems.append(f"lora.rank={lora.rank} but r={rank}")
    alpha = adapter_cfg.get("lora_alpha")
    if isinstance(alpha, (int, float)) and abs(float(alpha) - lora.alpha) > 1e-6 * max(1.0, lora.alpha):
        problems.append(f"lora.alpha={lora.alpha:g} but lora_alpha={alpha}")
    extra = sorted({m.rsplit(".", 1)[-1] for m in modules if not _targeted(m, lora.target_modules)})
    if extra:
        problems.append(f"lora.target_modules={lora.target_modules} but the adapter also adapts {extra}")
    if problems:
        raise _fail(run / ADAPTER_CONFIG, f"does not match {TRAINING_CONFIG} ({'; '.join(problems)}): one of them was "
                                          "edited, or they come from different runs",
                    "Restore the files from the same run, or train the run again.")


def _check_base(run: Path, cfg: Config, adapter_cfg: dict, shapes: dict, info: RunInfo) -> None:
    """Every adapted module exists in the base with fitting shapes; every targeted base module is adapted."""
    from afinar import models

    resolved = models.resolve(cfg.model.base)  # an AfinarError here is the one loading would give
    model = _meta_model(resolved.path)
    if model is None:
        info.notes.append(f"the config.json of {cfg.model.base} could not be read: adapter shapes not checked against it")
        return
    adapter = run / ADAPTER
    fix = (f"The adapter does not belong to model.base={cfg.model.base!r} ({TRAINING_CONFIG}): put back this run's "
           "adapter, or point model.base at the model it was trained on.")
    for name, shape in shapes.items():
        match = _PEFT_KEY.match(name)
        module, which = match["path"], match["which"]
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise _fail(adapter, f"adapts {module}, which {cfg.model.base} does not have", fix) from None
        fan_in, fan_out = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if fan_in is None or fan_out is None:
            info.notes.append(f"{module} is a {type(layer).__name__}: its shape was not checked")
            continue
        want = [shape[0], fan_in] if which == "A" else [fan_out, shape[1]]
        if shape != want:
            raise _fail(adapter, f"holds lora_{which} {shape} for {module}, but that layer of {cfg.model.base} is "
                                 f"{fan_in} -> {fan_out} (expected {want})", fix)
    targets = adapter_cfg["target_modules"]
    if isinstance(targets, list) and not adapter_cfg.get("layers_to_transform"):
        adapted = set(info.modules)
        linear = [n for n, m in model.named_modules() if hasattr(m, "in_features") and _targeted(n, targets)]
        missing = [n for n in linear if n not in adapted]
        if missing:
            raise _fail(run / ADAPTER_CONFIG,
                        f"has target_modules={sorted(targets)}, but {ADAPTER} holds no matrices for {len(missing)} such "
                        f"layers of the base (e.g. {missing[0]}): the file was edited or comes from another run",
                        "Restore it from the same run (target_modules as trained), or train the run again.")
    info.checked.append(f"shapes against {cfg.model.base}")


def _meta_model(path: str) -> Any | None:
    """The base architecture with no weights (meta device), from config.json alone; None if unreadable."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from afinar.backends.torch_model import lm_class

    try:
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights():
            return lm_class(config.model_type).from_config(config)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_checksums(run: Path, recorded: dict | None, info: RunInfo) -> None:
    adapter = run / ADAPTER
    if recorded and isinstance(recorded.get("sha256"), str):
        size = adapter.stat().st_size
        if recorded.get("bytes") not in (None, size):
            raise _fail(adapter, f"is {size} bytes, but metadata.json records {recorded['bytes']}: the file changed "
                                 "after training", f"Restore it, retrain, or {NO_VERIFY}.")
        if manifest.sha256_file(adapter) != recorded["sha256"]:
            raise _fail(adapter, "does not match the sha256 in metadata.json: the file changed after training",
                        f"Restore it, retrain, or {NO_VERIFY}.")
        info.checked.append("adapter sha256")
    else:
        info.notes.append("metadata.json records no adapter sha256 (an older run): the adapter's bytes are not checked")
    if manifest.exists(run):
        damage = manifest.verify(run, only=[name for name in READ_FILES if (run / name).exists()])
        damage = [d for d in damage if d.kind != "unlisted"]  # a file the run's manifest does not cover
        if damage:
            first = damage[0]
            raise _fail(run / first.file, f"does not match {manifest.MANIFEST} ({'; '.join(map(str, damage))}): "
                                          "the run changed after training", f"Restore it, retrain, or {NO_VERIFY}.")
        info.checked.append(manifest.MANIFEST)
