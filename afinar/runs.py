"""The run folder's contract: which files a run holds, how it is written, and how it is read back.

A run is written into `<output>.partial/` and renamed to `<output>/` only when complete,
so a crashed or interrupted run never leaves a folder that looks finished.

  adapter_model.safetensors, adapter_config.json   the adapter, PEFT format
  mlx/adapters.safetensors, mlx/adapter_config.json the same adapter in mlx-lm's format
  training_config.json                             the resolved config (reloads the run)
  qlora_config.json | lora_config.json             quantization + LoRA settings
  metadata.json                                    base model + hash, data paths + hashes, versions, device, timings, memory, losses
  training_state.json                              the final loop state and the whole log
  metrics.jsonl                                    one typed record a line (afinar/events.py), appended as it happens
  loss.png                                         train and validation loss curves (when matplotlib is installed)
  INTEGRATION_GUIDE.md                             how to call this run from the CLI, HTTP and Node
  checkpoints/step_NNNNNNN/, checkpoints/best/     resumable states and the best adapter (see checkpoints.py)

Presentation (the plot, the guide) lives in `plots.py` and `guide.py`; this module only decides
where each file goes and checks what it reads.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from afinar import adapters, atomic, checkpoints, events, manifest, oserrors, runlock
from afinar import inputs as run_inputs
from afinar.config import Config
from afinar.errors import AfinarError
from afinar.runpaths import partial
from afinar.verify import read_json, verify_run

ADAPTER = adapters.PEFT_WEIGHTS
ADAPTER_CONFIG = adapters.PEFT_CONFIG
TRAINING_CONFIG = "training_config.json"
METADATA = "metadata.json"
TRAINING_STATE = "training_state.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
GUIDE = "INTEGRATION_GUIDE.md"
MLX_ADAPTER = f"{adapters.MLX_SUBDIR}/{adapters.MLX_WEIGHTS}"
MLX_ADAPTER_CONFIG = f"{adapters.MLX_SUBDIR}/{adapters.MLX_CONFIG}"

# Every file a finished run holds (besides `<method>_config.json`, `checkpoints/`, and `loss.png`,
# which needs the optional matplotlib).
RUN_FILES = (ADAPTER, ADAPTER_CONFIG, MLX_ADAPTER, MLX_ADAPTER_CONFIG, TRAINING_CONFIG, METADATA,
             TRAINING_STATE, METRICS, GUIDE)
MANIFEST = manifest.MANIFEST  # written last: every file above with its size and sha256
# In `<output>.partial/` only: the fingerprints of the data and base model the run started on, which
# a resume must match like the config; the finished run records them in metadata.json instead.
INPUTS = "inputs.json"
# Config keys that shape the LoRA weights: a checkpoint saved under other values does not load.
SHAPING = {"lora.rank": "rank-{} weights", "lora.target_modules": "adapters of {}", "model.base": "weights trained on {!r}"}


def method_config_name(cfg: Config) -> str:
    return f"{cfg.method}_config.json"


file_sha256 = manifest.sha256_file


@dataclass
class RunWriter:
    """Collects a run in `<output>.partial/`; `finish()` makes it appear atomically.

    The writer holds the run's lock (runlock.py) from `create`/`reopen` until `finish`, `abandon`
    or `release`: a second process writing the same run stops with exit 2, naming the holder.
    """

    output: Path
    history: list[events.Event] = field(default_factory=list)
    lock: runlock.RunLock | None = None
    inputs: dict = field(default_factory=dict)  # what inputs.json holds, once `accept` ran on a resume
    notes: list[str] = field(default_factory=list)  # for the trainer to show (the writer emits no events)
    _pending: tuple | None = None  # (config, inputs, history, replaced) a resume writes once a checkpoint has loaded

    @property
    def tmp(self) -> Path:
        return partial(self.output)

    @classmethod
    def create(cls, output: str | Path, overwrite: bool = False, cfg: Config | None = None,
               inputs: dict | None = None) -> "RunWriter":
        """`inputs`: the fingerprints of the data and base model (see INPUTS) that a resume must match."""
        output = Path(output)
        _check_output(output)
        lock = runlock.acquire(output)  # first: a second writer stops here, before it reads or deletes anything
        try:
            with oserrors.writing(output):
                return cls._create(output, overwrite, cfg, lock, inputs)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _create(cls, output: Path, overwrite: bool, cfg: Config | None, lock: runlock.RunLock,
                inputs: dict | None = None) -> "RunWriter":
        if (output.exists() or output.is_symlink()) and not output.is_dir():
            # Not "pass --overwrite": a run never replaces a file, which is more likely a mistyped --output.
            raise AfinarError(f"--output {output} is a file, not a run folder: a run is a folder and never replaces a "
                              "file. Choose another --output, or move the file away first.")
        atomic.refuse_existing(output, overwrite)
        if overwrite and output.is_dir() and not is_run(output) and any(output.iterdir()):
            raise AfinarError(f"--overwrite replaces an afinar run, and {output} is not one (no {METADATA}): everything "
                              f"in it would be deleted. Choose another --output, or move {output} away first.")
        writer = cls(output, lock=lock)
        if writer.tmp.exists():
            saved = checkpoints.step_checkpoints(writer.tmp)
            if saved and not overwrite:
                raise AfinarError(
                    f"{writer.tmp} holds an unfinished run with a checkpoint at step {saved[-1][0]}. "
                    f"Continue it with: afinar train --resume {output}  (or pass --overwrite to start over)."
                )
            shutil.rmtree(writer.tmp)
        writer.tmp.mkdir(parents=True)
        checkpoints.folder(writer.tmp).mkdir()
        if cfg is not None:  # first thing written: what a resume must match
            atomic.write_json(writer.tmp / TRAINING_CONFIG, cfg.model_dump(mode="json"))
        if inputs is not None:
            writer.inputs = {**inputs, "replaced": []}
            atomic.write_json(writer.tmp / INPUTS, writer.inputs)
        return writer

    @classmethod
    def reopen(cls, output: str | Path, cfg: Config, force: bool = False, inputs: dict | None = None) -> "RunWriter":
        """The unfinished run at `<output>.partial/`, checked against `cfg` and `inputs` (see `create`).

        Nothing is written: with --force, the new config and inputs replace the saved ones only in
        `accept`, once a checkpoint has loaded under them; a resume that fails leaves the run as it was.
        """
        output = Path(output)
        _check_output(output)
        lock = runlock.acquire(output)
        try:
            return cls._reopen(output, cfg, force, lock, inputs)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _reopen(cls, output: Path, cfg: Config, force: bool, lock: runlock.RunLock,
                inputs: dict | None = None) -> "RunWriter":
        writer = cls(output, lock=lock)
        saved_cfg = writer.tmp / TRAINING_CONFIG
        if not saved_cfg.is_file():
            done = " It has finished already." if (output / METADATA).is_file() else ""
            raise AfinarError(f"Nothing to resume: {writer.tmp} does not hold an unfinished run.{done}")
        differ = config_changes(writer.tmp, cfg)
        saved_inputs = run_inputs.read(writer.tmp / INPUTS)
        replaced = run_inputs.replaced(saved_inputs, inputs) if saved_inputs is not None and inputs is not None else []
        if (differ or replaced) and not force:
            parts = []
            if differ:
                changes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differ.items())
                parts.append(f"The config differs from the run being resumed ({changes}).")
            for name, entry, old, new in replaced:
                parts.append(f"{name} {entry.get('path')} changed since the run started ({run_inputs.KIND.get(name, 'sha256')} "
                             f"{old[:12]}... -> {new[:12]}...): the steps so far trained on the old one.")
            restore = [str(entry.get("path")) for _, entry, _, _ in replaced]
            fix = "Resume with the same settings" + (f" and restore {', '.join(restore)}" if restore else "")
            raise AfinarError(" ".join(parts) + f" {fix}, or pass --force to continue anyway.")
        if saved_inputs is None and inputs is not None:
            writer.notes.append(f"{writer.tmp} records no fingerprints of its data and base model (started by an older "
                                "afinar): they are not checked against what the steps so far trained on.")
        writer._pending = (cfg.model_dump(mode="json") if differ else None, inputs,
                           (saved_inputs or {}).get("replaced", []), [(name, old) for name, _, old, _ in replaced])
        return writer

    def accept(self, step: int) -> None:
        """Make a resume's config and inputs the run's own: called once the checkpoint of `step` has loaded
        under them (or at step 0, with none to load)."""
        if self._pending is None:
            return
        cfg_dump, inputs, history, replaced = self._pending
        self._pending = None
        if cfg_dump is not None:
            atomic.write_json(self.tmp / TRAINING_CONFIG, cfg_dump)
        if inputs is None:
            return
        # Steps after `step` belonged to a timeline the resume discards, and so did the inputs they trained on.
        history = [{**h, "until_step": min(h["until_step"], step)} for h in history]
        history += [{"input": name, "hash": old, "until_step": step} for name, old in replaced]
        self.inputs = {**inputs, "replaced": [h for h in history if h["until_step"] > 0]}
        atomic.write_json(self.tmp / INPUTS, self.inputs)

    def truncate(self, step: int) -> None:
        """Forget records logged after `step` (work lost with the crash) and reload the rest."""
        path = self.tmp / METRICS
        kept = [e for e in events.read_metrics(path) if getattr(e, "step", 0) <= step and not isinstance(e, events.Done)]
        with oserrors.writing(path):
            atomic.write_text(path, "".join(events.to_json(e) + "\n" for e in kept))
        self.history = kept

    def release(self) -> None:
        """Let another process write this run (also done by finish and abandon; idempotent)."""
        if self.lock is not None:
            self.lock.release()

    def log(self, event: events.Event) -> None:
        """Append one record to metrics.jsonl."""
        self.history.append(event)
        path = self.tmp / METRICS
        with oserrors.writing(path, run=self.tmp, mid_run=True):
            if not self.tmp.is_dir():  # open(..., "a") would silently create a new folder's worth of nothing
                raise oserrors.run_removed(self.tmp, path)
            with open(path, "a", encoding="utf-8") as f:
                f.write(events.to_json(event) + "\n")

    def write_state(self, state: dict) -> None:
        path = self.tmp / TRAINING_STATE
        with oserrors.writing(path, run=self.tmp, mid_run=True):
            atomic.write_json(path, {**state, "log_history": [events.to_dict(e) for e in self.history]})

    def finish(self, cfg: Config, metadata: dict, state: dict, guide_question: str) -> Path:
        """Write the remaining files and publish the run (replacing an old one when --overwrite)."""
        with oserrors.writing(self.tmp, run=self.tmp, mid_run=True):
            path = self._finish(cfg, metadata, state, guide_question)
        self.release()
        return path

    def _finish(self, cfg: Config, metadata: dict, state: dict, guide_question: str) -> Path:
        from afinar import guide, plots

        tmp = self.tmp
        checkpoints.cleanup_partial_writes(tmp)  # temporary folders of interrupted writes never end up in a run
        atomic.write_json(tmp / TRAINING_CONFIG, cfg.model_dump(mode="json"))
        atomic.write_json(tmp / method_config_name(cfg), {
            "method": cfg.method,
            "quantization": cfg.model.quantization,
            "double_quant": cfg.model.double_quant if cfg.method == "qlora" else None,
            "compute_dtype": metadata.get("device", {}).get("compute_dtype", cfg.model.compute_dtype),
            **cfg.lora.model_dump(mode="json"),
        })
        self.write_state(state)
        adapter = tmp / ADAPTER
        adapters.peft_to_mlx(tmp, tmp / adapters.MLX_SUBDIR)  # same weights, for mlx_lm.load(adapter_path=)
        metadata = {**metadata, "adapter": {"file": ADAPTER, "bytes": adapter.stat().st_size, "sha256": file_sha256(adapter)}}
        atomic.write_json(tmp / METADATA, metadata)
        plots.loss_curves(self.history, tmp / LOSS_PLOT, title=self.output.name)
        atomic.write_text(tmp / GUIDE, guide.integration_guide(self.output, cfg, metadata, guide_question))
        missing = [name for name in RUN_FILES if not (tmp / name).is_file()]
        if missing:
            raise AssertionError(f"run folder incomplete before publishing, missing {missing}")
        (tmp / INPUTS).unlink(missing_ok=True)  # metadata.json records the inputs now
        # Last: each file's size and sha256, so ask/serve/eval/export can tell a run changed after training.
        manifest.write(tmp, [*RUN_FILES, method_config_name(cfg)])
        atomic.make_readable(tmp)
        atomic.fsync_tree(tmp)
        old = self.output.with_name(self.output.name + ".old")
        if self.output.exists():  # --overwrite: swap, then delete the old run
            _remove(old)
            os.replace(self.output, old)
        os.replace(tmp, self.output)
        atomic.fsync_dir(self.output.parent)
        # Also the one an --overwrite killed between its two renames left: kept until now, when a
        # complete run is in place, since until now it was the only one.
        _remove(old)
        return self.output

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.release()


class NullWriter(RunWriter):
    """The writer of a process that must not write (ranks other than 0 under torchrun): it reads the
    run folder like the writer does (to resume from its checkpoint) and keeps the log in memory."""

    def truncate(self, step: int) -> None:
        self.history = [e for e in events.read_metrics(self.tmp / METRICS) if getattr(e, "step", 0) <= step]

    def log(self, event: events.Event) -> None:
        self.history.append(event)

    def write_state(self, state: dict) -> None:
        pass

    def finish(self, cfg, metadata: dict, state: dict, guide_question: str) -> Path:
        return self.output

    def abandon(self) -> None:
        pass


def is_run(path: Path) -> bool:
    """A folder afinar wrote as a run (finished, or one whose files an interrupted delete left part of)."""
    return path.is_dir() and any((path / name).is_file() for name in (METADATA, MANIFEST, TRAINING_CONFIG))


def _check_output(output: Path) -> None:
    """`-o .` or `-o ..`: a run is published by renaming a folder beside it onto it, which cannot be
    done to the folder a process works in (and `.` has no name to put a `.partial` beside). And a
    `<output>.old` that afinar did not put there: publishing deletes it."""
    here = Path.cwd()
    if output.name in ("", ".", "..") or output.resolve() in (here, *here.parents):
        raise AfinarError(f"--output {output} is the current folder or one above it: a run is a folder of its own. "
                          "Give a new folder's name, e.g. --output runs/my-run")
    old = output.with_name(output.name + ".old")
    if old.exists() and not is_run(old):  # publishing deletes <output>.old: only ever a run afinar put there
        raise AfinarError(f"{old} exists and is not an afinar run; afinar keeps a replaced run there for a "
                          f"moment and deletes it. Rename {old}, or choose another --output.")


def _remove(path: Path) -> None:
    """Delete a folder or a file (rmtree of a file fails, and ignore_errors would hide that)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def config_changes(run_tmp: Path, cfg: Config) -> dict[str, tuple]:
    """{flattened key: (saved value, value in `cfg`)} for each setting `cfg` changes in the run at `run_tmp`."""
    before = _flatten(read_json(Path(run_tmp) / TRAINING_CONFIG))
    after = _flatten(cfg.model_dump(mode="json"))
    return {k: (before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def load_run(path: str | Path, verify: bool = True, check_base: bool = True) -> tuple[Config, dict]:
    """(config, metadata) of a finished run folder, verified first (verify.py): a damaged or edited run
    is a clear error naming the file. `verify=False` (the CLI's --no-verify) skips the checksums only."""
    info = verify_run(path, check_base=check_base, checksums=verify)
    return info.cfg, info.metadata
