"""Answering (and merged export) with MLX (`base.AnsweringBackend`, `base.ExportBackend`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

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
        """mlx-lm's BatchGenerator (continuous batching, one KV cache per row)."""
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.sample_utils import make_sampler

        mx = self.mx
        mx.random.seed(seed)
        sampler = make_sampler(temp=temperature, top_p=top_p if 0 < top_p < 1 else 0.0)
        stops = set(self.stop_ids or [self.tokenizer.eos_token_id])  # any of the model's end tokens
        gen = BatchGenerator(self.model, max_tokens=max_new_tokens, stop_tokens=[[t] for t in sorted(stops)], sampler=sampler,
                             completion_batch_size=max(len(prompts), 1), prefill_batch_size=max(len(prompts), 1))
        results: list[list[int]] = [[] for _ in prompts]
        try:
            uids = gen.insert([list(p) for p in prompts], [max_new_tokens] * len(prompts))
            row_of = {uid: row for row, uid in enumerate(uids)}
            live = set(uids)
            while live and (responses := gen.next_generated()):
                for r in responses:
                    row = row_of[r.uid]
                    if r.finish_reason != "stop" and r.token not in stops:
                        results[row].append(r.token)
                        if on_token is not None:
                            on_token(row, r.token)
                    if r.finish_reason is not None:
                        live.discard(r.uid)
                if should_stop is not None:
                    cancelled = [uid for uid in live if should_stop(row_of[uid])]
                    if cancelled:
                        gen.remove(cancelled)
                        live.difference_update(cancelled)
        finally:
            gen.close()
        return results

    def save_merged(self, folder: Path) -> None:
        """Base + adapter folded into full-precision weights, saved as a plain HF folder.

        Quantized layers are dequantized first and never re-quantized: rounding W + BA back to
        4 bits can erase the fine-tune. mlx-lm's module paths are the HF parameter names.
        """
        from mlx.utils import tree_flatten, tree_unflatten
        from mlx_lm.utils import dequantize_model

        mx = self.mx
        fused = [(name, m.fuse(dequantize=True)) for name, m in self._lora_modules().items()]
        self.model.update_modules(tree_unflatten(fused))
        dequantize_model(self.model)
        weights = dict(tree_flatten(self.model.parameters()))
        mx.save_safetensors(str(Path(folder) / "model.safetensors"), weights, metadata={"format": "pt"})
        config = json.loads((self.base_path / "config.json").read_text())
        for key in ("quantization", "quantization_config"):
            config.pop(key, None)
        config["dtype"] = str(self.dtype).removeprefix("mlx.core.")
        (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))
        mlx_config.add_mlx_keys(Path(folder) / "config.json")  # plain mlx_lm.load(OUT) reads the rope right
        if (self.base_path / "generation_config.json").is_file():
            (Path(folder) / "generation_config.json").write_bytes((self.base_path / "generation_config.json").read_bytes())

