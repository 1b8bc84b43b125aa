"""What the core asks of a backend, one small protocol per lifecycle.

  TrainingBackend   base + new LoRA weights: steps, validation loss, checkpoints (the trainer)
  AnsweringBackend  base + a saved adapter: generation and scoring (ask, serve, eval)
  ExportBackend     the answering model folded into one plain Hugging Face folder (export --merged)

Batches cross these boundaries as plain Python lists (`data.Encoded`), losses and memory as
floats: the training loop never sees a tensor. Communication between processes is the
backend's `collective` (`distributed.Collective`); one process has `distributed.SINGLE_PROCESS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from afinar import distributed, memory
from afinar.data import Encoded
from afinar.models import ResolvedModel


class TrainingBackend(Protocol):
    name: str
    collective: distributed.Collective

    def load(self, model: ResolvedModel) -> Any:
        """Load (and quantize) the base and attach new LoRA weights; return the tokenizer."""

    def forward_backward(self, batch: list[Encoded], scale: float) -> tuple[float, int]:
        """Accumulate gradients of `scale * sum of target-token losses`; return (loss sum, targets)."""

    def optimizer_step(self, lr: float) -> float:
        """Clip, step AdamW at `lr`, zero gradients; return the gradient norm before clipping."""

    def eval_loss(self, batch: list[Encoded]) -> tuple[float, int]:
        """(sum of target-token losses, number of targets) without gradients."""

    def save_adapter(self, folder: Path) -> None:
        """Write the adapter in PEFT format (adapter_model.safetensors + adapter_config.json)."""

    def save_state(self, folder: Path) -> None:
        """A checkpoint's backend part: the adapter and the optimizer state."""

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote into the loaded, trainable model."""

    def rng_state(self) -> dict[str, Any]:
        """The framework's own random state (picklable); the core saves the host's beside it (rng.py)."""

    def set_rng_state(self, state: dict[str, Any]) -> None: ...

    def is_out_of_memory(self, error: Exception) -> bool:
        """Whether `error` is the device running out of memory (then the loop splits the batch)."""

    def recover_from_out_of_memory(self) -> None:
        """Drop partial gradients and cached memory before the step is retried smaller."""

    def model_facts(self) -> memory.ModelFacts:
        """Sizes and bytes of the loaded model, for the memory estimate (memory.py)."""

    def memory(self) -> dict[str, float]:
        """{'memory_mb': now, 'peak_memory_mb': peak} of the device (process RSS on CPU)."""

    def describe(self) -> dict[str, Any]:
        """Device, dtypes, library versions and parameter counts (also per adapted layer name), for metadata.json."""


class AnsweringBackend(Protocol):
    name: str
    tokenizer: Any

    def load(self, model: ResolvedModel, adapter_dir: str | Path) -> Any:
        """Load the base with the saved adapter (merged where that answers faster); return the tokenizer."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0,
                 on_token: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[int], bool] | None = None) -> list[list[int]]:
        """New token ids for each prompt (batched), without the closing EOS.

        Serving streams and cancels through the two hooks: `on_token(row, token_id)` is called
        as each new token of a row is produced (never for EOS), and a row for which
        `should_stop(row)` returns True (client gone, stop string seen) ends early.
        """

    def eval_loss(self, batch: list[Encoded]) -> tuple[float, int]:
        """(sum of target-token losses, number of targets): the training loss, on the loaded model."""

    def memory(self) -> dict[str, float]: ...

    def describe(self) -> dict[str, Any]: ...


class ExportBackend(Protocol):
    def save_merged(self, folder: Path) -> None:
        """Write the loaded base with the adapter folded in, dequantized, as a plain HF model folder."""
