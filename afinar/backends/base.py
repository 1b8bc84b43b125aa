"""The small interface every backend provides: load, step, evaluate, save, generate.

Batches cross this boundary as plain Python lists (`data.Encoded`), losses and memory as
floats: the training loop never sees a tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from afinar.data import Encoded
from afinar.models import ResolvedModel


class Backend(Protocol):
    name: str

    def load(self, model: ResolvedModel, adapter_dir: str | Path | None = None, trainable: bool = True) -> Any:
        """Load (and quantize) the base, attach new LoRA weights or a saved adapter; return the tokenizer."""

    def forward_backward(self, batch: list[Encoded], scale: float) -> tuple[float, int]:
        """Accumulate gradients of `scale * sum of target-token losses`; return (loss sum, targets)."""

    def optimizer_step(self, lr: float) -> float:
        """Clip, step AdamW at `lr`, zero gradients; return the gradient norm before clipping."""

    def eval_loss(self, batch: list[Encoded]) -> tuple[float, int]:
        """(sum of target-token losses, number of targets) without gradients."""

    def save_adapter(self, folder: Path) -> None:
        """Write the adapter in PEFT format (adapter_model.safetensors + adapter_config.json)."""

    def is_out_of_memory(self, error: Exception) -> bool:
        """Whether `error` is the device running out of memory (then the loop splits the batch)."""

    def recover_from_out_of_memory(self) -> None:
        """Drop partial gradients and cached memory before the step is retried smaller."""

    def estimate_memory(self, batch_tokens: int, answer_tokens: int) -> dict[str, float]:
        """MiB for weights, LoRA, optimizer, activations, their total, and what the device has available."""

    def save_checkpoint(self, folder: Path) -> None:
        """Adapter, optimizer state and every RNG state (python, numpy, framework, device)."""

    def load_checkpoint(self, folder: Path) -> None:
        """Restore what `save_checkpoint` wrote into the loaded, trainable model."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0,
                 on_token: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[int], bool] | None = None) -> list[list[int]]:
        """New token ids for each prompt (batched), without the closing EOS.

        Serving streams and cancels through the two hooks: `on_token(row, token_id)` is called
        as each new token of a row is produced (never for EOS), and a row for which
        `should_stop(row)` returns True (client gone, stop string seen) ends early.
        """

    def save_merged(self, folder: Path) -> None:
        """Write the loaded base with the adapter folded in, dequantized, as a plain HF model folder."""

    def memory(self) -> dict[str, float]:
        """{'memory_mb': now, 'peak_memory_mb': peak} of the device (process RSS on CPU)."""

    def describe(self) -> dict[str, Any]:
        """Device, dtypes, library versions and parameter counts, for metadata.json."""

    # Optional: a backend with it trains under torchrun / accelerate launch (see afinar/distributed.py).
    def all_sum(self, values: list[float]) -> list[float]:
        """`values` summed element-wise over every process of the job."""
