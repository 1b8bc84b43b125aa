"""Answering (and merged export) with MLX (`base.AnsweringBackend`, `base.ExportBackend`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from afinar import targets as lora_targets
from afinar.backends import mlx_config
from afinar.backends.mlx_model import MLXModel
from afinar.models import ResolvedModel


class MLXAnswerer(MLXModel):
    def load(self, model: ResolvedModel, adapter_dir: str | Path | None):
        """The base (4-bit for QLoRA) with the saved adapter (None: the base alone), ready to answer; returns the tokenizer."""
        self._load(model, adapter_dir, checkpointing=False)
        self.model.eval()
        self.mx.eval(self.model.parameters())
        if hasattr(self.mx, "reset_peak_memory"):
            self.mx.reset_peak_memory()
        return self.tokenizer

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0,
                 on_token: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[int], bool] | None = None) -> list[list[int]]:
        """New token ids per prompt, through the serving engine (mlx-lm's BatchGenerator, a sampler per row)."""
        from afinar.engine import engine_for

        return engine_for(self).generate(prompts, max_new_tokens, temperature, top_p, seed, on_token, should_stop)

    def save_merged(self, folder: Path) -> None:
        """Base + adapter folded into full-precision weights, saved as a plain HF folder.

        Quantized layers are dequantized first and never re-quantized: rounding W + BA back to
        4 bits can erase the fine-tune. mlx-lm's module paths are the HF parameter names (a
        multimodal checkpoint's as its files name them, which transformers renames on load).
        """
        from mlx.utils import tree_flatten, tree_unflatten
        from mlx_lm.utils import dequantize_model

        mx = self.mx
        fused = [(name, m.fuse(dequantize=True)) for name, m in self._lora_modules().items()]
        self.model.update_modules(tree_unflatten(fused))
        dequantize_model(self.model)
        weights = dict(tree_flatten(self.model.parameters()))
        weights.update(self._tower_weights())
        mx.save_safetensors(str(Path(folder) / "model.safetensors"), weights, metadata={"format": "pt"})
        config = json.loads((self.base_path / "config.json").read_text())
        for key in ("quantization", "quantization_config"):
            config.pop(key, None)
        config["dtype"] = str(self.dtype).removeprefix("mlx.core.")
        (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))
        mlx_config.add_mlx_keys(Path(folder) / "config.json")  # plain mlx_lm.load(OUT) reads the rope right
        if (self.base_path / "generation_config.json").is_file():
            (Path(folder) / "generation_config.json").write_bytes((self.base_path / "generation_config.json").read_bytes())

    def _tower_weights(self) -> dict:
        """A multimodal base's vision tower and projector as saved: mlx-lm drops them at load (it runs the
        language model only), and the export must stay the complete checkpoint. Never adapted on MLX."""
        out = {}
        for file in sorted(self.base_path.glob("*.safetensors")):
            out.update({k: v for k, v in self.mx.load(str(file)).items() if lora_targets.in_tower(k)})
        return out

