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

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from afinar import adapters, atomic, checkpoints, events, manifest, oserrors, runlock
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

    @property
    def tmp(self) -> Path:
        return partial(self.output)

    @classmethod
    def create(cls, output: str | Path, overwrite: bool = False, cfg: Config | None = None) -> "RunWriter":
        output = Path(output)
        lock = runlock.acquire(output)  # first: a second writer stops here, before it reads or deletes anything
        try:
            with oserrors.writing(output):
                return cls._create(output, overwrite, cfg, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _create(cls, output: Path, overwrite: bool, cfg: Config | None, lock: runlock.RunLock) -> "RunWriter":
        atomic.refuse_existing(output, overwrite)
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
        return writer

    @classmethod
    def reopen(cls, output: str | Path, cfg: Config, force: bool = False) -> "RunWriter":
        """The unfinished run at `<output>.partial/`, checked against `cfg`."""
        output = Path(output)
        lock = runlock.acquire(output)
        try:
            return cls._reopen(output, cfg, force, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _reopen(cls, output: Path, cfg: Config, force: bool, lock: runlock.RunLock) -> "RunWriter":
        writer = cls(output, lock=lock)
        saved_cfg = writer.tmp / TRAINING_CONFIG
        if not saved_cfg.is_file():
            done = " It has finished already." if (output / METADATA).is_file() else ""
            raise AfinarError(f"Nothing to resume: {writer.tmp} does not hold an unfinished run.{done}")
        before = _flatten(read_json(saved_cfg))
        after = _flatten(cfg.model_dump(mode="json"))
        differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if differ and not force:
            changes = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in differ)
            raise AfinarError(f"The config differs from the run being resumed ({changes}). "
                              "Resume with the same settings, or pass --force to continue anyway.")
        if differ:
            atomic.write_json(saved_cfg, cfg.model_dump(mode="json"))
        return writer

    def truncate(self, step: int) -> None:
        """Forget records logged after `step` (work lost with the crash) and reload the rest."""
        path = self.tmp / METRICS
        kept = [e for e in events.read_metrics(path) if getattr(e, "step", 0) <= step and not isinstance(e, events.Done)]
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
        # Last: each file's size and sha256, so ask/serve/eval/export can tell a run changed after training.
        manifest.write(tmp, [*RUN_FILES, method_config_name(cfg)])
        atomic.make_readable(tmp)
        atomic.fsync_tree(tmp)
        old = None
        if self.output.exists():  # --overwrite: swap, then delete the old run
            old = self.output.with_name(self.output.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.output, old)
        os.replace(tmp, self.output)
        atomic.fsync_dir(self.output.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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
