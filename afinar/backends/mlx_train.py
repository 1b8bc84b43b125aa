"""Training with MLX (`base.TrainingBackend`): the shared core's loop drives these steps.

mlx-lm's trainer is not used: the loop, schedule, accumulation, validation, checkpoints and
resume are afinar's, the same as on torch; this module turns batches into MLX arrays and back
into floats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from afinar import distributed, hardware, memory
from afinar.backends.mlx_model import MLXModel
from afinar.config import Config
from afinar.data import Encoded
from afinar.models import ResolvedModel


class MLXTrainer(MLXModel):
    collective = distributed.SINGLE_PROCESS  # MLX trains in one process

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.optimizer = None
        self.grads = None
        self.micro_batches = 0  # dropout keys derive from it (see forward_backward)
        self._loss_and_grad = None

    def load(self, model: ResolvedModel):
        """The base (4-bit for QLoRA) with new LoRA layers, ready to train; returns the tokenizer."""
        mx = self.mx
        self._load(model, None, self.cfg.train.gradient_checkpointing)
        self.model.train()
        self.optimizer = self.optim.AdamW(learning_rate=self.cfg.train.learning_rate,
                                         weight_decay=self.cfg.train.weight_decay)
        self.optimizer.init(self.model.trainable_parameters())
        self._loss_and_grad = self.nn.value_and_grad(self.model, self._loss)
        mx.eval(self.model.parameters())
        if hasattr(mx, "reset_peak_memory"):
            mx.reset_peak_memory()
        return self.tokenizer

    def forward_backward(self, batch: list[Encoded], scale: float) -> tuple[float, int]:
        """Accumulate gradients of `scale * sum of target-token losses`; return (loss sum, targets)."""
        from mlx.utils import tree_map

        mx = self.mx
        ids, positions, targets = self._arrays(batch)
        # MLX's global RNG state cannot be saved and restored, so each micro-batch's dropout
        # draws from a key derived from a counter that checkpoints do save: exact resume.
        mx.random.seed(self.cfg.train.seed * 1_000_003 + self.micro_batches)
        self.micro_batches += 1
        loss, grads = self._loss_and_grad(self.model, ids, positions, targets)
        grads = tree_map(lambda g: g * scale, grads)
        self.grads = grads if self.grads is None else tree_map(lambda a, b: a + b, self.grads, grads)
        mx.eval(loss, self.grads)  # bound the graph to one micro-batch
        return float(loss), int(targets.size)

    def optimizer_step(self, lr: float) -> float:
        """Clip, step AdamW at `lr`, drop the gradients; return the gradient norm before clipping."""
        from mlx.optimizers import clip_grad_norm
        from mlx.utils import tree_flatten

        mx = self.mx
        max_norm = self.cfg.train.max_grad_norm
        if max_norm > 0:
            grads, norm = clip_grad_norm(self.grads, max_norm)
        else:
            grads = self.grads
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        self.optimizer.learning_rate = mx.array(lr, dtype=mx.float32)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.grads = None
        return float(norm)

    def is_out_of_memory(self, error: Exception) -> bool:
        text = str(error).lower()
        return isinstance(error, RuntimeError) and ("out of memory" in text or "[metal::malloc]" in text)

    def recover_from_out_of_memory(self) -> None:
        self.grads = None
        self.mx.clear_cache()

    def save_state(self, folder: Path) -> None:
        """A checkpoint's backend part: the adapter and the optimizer state."""
        from mlx.utils import tree_flatten

        self.save_adapter(folder)
        self.mx.save_safetensors(str(Path(folder) / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))

    def load_state(self, folder: Path) -> None:
        from mlx.utils import tree_unflatten

        mx = self.mx
        folder = Path(folder)
        self._load_peft(folder)
        self.optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
        mx.eval(self.model.parameters(), self.optimizer.state)

    def rng_state(self) -> dict[str, Any]:
        # MLX's global generator cannot be saved; dropout keys come from this counter instead.
        return {"micro_batches": self.micro_batches}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self.micro_batches = state["micro_batches"]

    def model_facts(self) -> memory.ModelFacts:
        from mlx.utils import tree_flatten

        mx = self.mx
        trainable = {k for k, _ in tree_flatten(self.model.trainable_parameters())}
        params = tree_flatten(self.model.parameters())
        in_use = self.memory()["memory_mb"] * 2**20
        if mx.default_device() == mx.gpu and hasattr(mx, "metal"):
            available = mx.metal.device_info()["memory_size"]
        else:
            available = hardware.available_memory_gb() * 2**30 + hardware.process_memory_mb()[0] * 2**20
        return memory.ModelFacts(
            in_use_bytes=int(in_use),
            weight_bytes=sum(v.nbytes for k, v in params if k not in trainable),
            lora_bytes=sum(v.nbytes for k, v in params if k in trainable),
            trainable_params=sum(v.size for k, v in params if k in trainable),
            hidden=self.hidden_size, layers=self.num_layers, vocab=self.vocab_size,
            activation_itemsize=self.dtype.size, available_bytes=int(available),
            lora_inputs=sum(m.lora_a.shape[0] for name, m in self._lora_modules().items()
                            if ".layers.0." in f".{name}."),
            lora_dropout=self.cfg.lora.dropout)

    def trainable_by_kind(self) -> dict[str, int]:
        from mlx.utils import tree_flatten

        from afinar.targets import count_by_kind

        return count_by_kind((n, v.size) for n, v in tree_flatten(self.model.trainable_parameters()))

    def describe(self) -> dict[str, Any]:
        from mlx.utils import tree_flatten

        info = super().describe()
        info["trainable_parameters"] = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        info["trainable_parameters_by_module"] = self.trainable_by_kind()
        return info
