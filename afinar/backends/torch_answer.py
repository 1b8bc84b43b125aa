"""Answering (and merged export) with PyTorch: a trained adapter on its base, ready to generate.

The adapter is folded into dequantized weights once at load wherever that is faster: on CPU
(bitsandbytes' 4-bit kernels take seconds per token there) and on CUDA when the dense weights fit
(plain bf16 weights decode several times faster than 4-bit + adapter and allow the static-cache
CUDA-graph decoder of `fast_decode.py`, the `serve.fast_paths` lever). Only a GPU without room for
the dense weights keeps 4-bit + adapter. `tests/test_inference.py` checks the merged model computes
what the 4-bit one does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.generation import StoppingCriteriaList

from afinar import data
from afinar.backends import mlx_config, torch_hooks, torch_model, torch_weights
from afinar.config import Config
from afinar.data import Encoded
from afinar.models import ResolvedModel


class TorchAnswerer:
    """The answering lifecycle on torch (`base.AnsweringBackend`) and merged export (`base.ExportBackend`)."""

    name = "torch"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = torch_model.pick_device()
        self.dtype = torch_model.compute_dtype(cfg, self.device)
        self.fast_paths = cfg.serve.fast_paths == "auto" and self.device.type == "cuda"
        self.model = None
        self.tokenizer = None
        self.stop_ids: list[int] = []
        self._decoder = None

    def load(self, model: ResolvedModel, adapter_dir: str | Path):
        """The base with the saved adapter (merged where faster); returns the tokenizer."""
        base, tokenizer = torch_model.load_base(self.cfg, model, self.device, self.dtype)
        return self.attach(base, tokenizer, adapter_dir, data.stop_token_ids(tokenizer, model.path))

    def attach(self, base, tokenizer, adapter_dir: str | Path, stop_ids: list[int] | None = None):
        """Put the saved adapter on a loaded base (merged where faster). Apart from `load` so benchmarks
        can hand in a base built in GPU memory. `stop_ids`: every token that ends an answer (EOS if None)."""
        from peft import PeftModel

        self.tokenizer = tokenizer
        self.stop_ids = stop_ids or [tokenizer.eos_token_id]
        merge = self.device.type == "cpu" or (
            self.device.type == "cuda" and torch_weights.dense_fits(base, self.dtype, self.device))
        if merge and self.cfg.model.quantization != "none":
            torch_weights.dequantize_4bit(base, self.dtype)
        self.model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
        if merge:  # fold B A into W once: no adapter overhead per token
            self.model = self.model.merge_and_unload()
        self.model.eval()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self.tokenizer

    @torch.no_grad()
    def eval_loss(self, batch: list[Encoded]) -> tuple[float, int]:
        """(sum of target-token losses, number of targets): the training loss on this model."""
        loss, n = torch_model.loss_sum(self.model, batch, data.pad_id(self.tokenizer), self.device)
        return float(loss), n

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, on_token=None, should_stop=None) -> list[list[int]]:
        """New token ids for each prompt, without the closing end token, through the serving engine
        (afinar/engine/: continuous batching, per-row sampling; ask, eval and serve answer alike).

        Serving streams and cancels through the two hooks: `on_token(row, token_id)` is called as
        each new token of a row is produced (never for an end token), and a row for which
        `should_stop(row)` returns True (client gone, stop string seen) ends early.
        """
        from afinar.engine import engine_for

        return engine_for(self).generate(prompts, max_new_tokens, temperature, top_p, seed, on_token, should_stop)

    @torch.inference_mode()
    def generate_static(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int = 0, on_token=None, should_stop=None,
                        plain: bool = False) -> list[list[int]]:
        """The earlier whole-batch generate, kept for comparison: serve.engine=static (the static decoder on
        CUDA), or serve.engine=transformers (`plain`: transformers' generate only)."""
        eos, stops = self.tokenizer.eos_token_id, self.stop_ids
        # The static decoder stops on one token only: models with several end tokens take generate.
        if not plain and len(stops) == 1 and (fast := self._fast_decoder(prompts, max_new_tokens)) is not None:
            return fast.generate(prompts, max_new_tokens, eos, temperature, top_p, seed, on_token, should_stop)
        pad = data.pad_id(self.tokenizer)
        width = max(len(p) for p in prompts)
        # Left padding: every row's next token sits in the same (last) column.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        hooks = {}
        if on_token is not None or should_stop is not None:
            rows = torch_hooks.RowHooks(len(prompts), stops, on_token, should_stop)
            hooks = {"streamer": rows, "stopping_criteria": StoppingCriteriaList([rows])}
        torch.manual_seed(seed)
        sample = temperature > 0
        out = self.model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
            pad_token_id=pad, eos_token_id=stops, **hooks,
        )
        if hooks:
            return rows.tokens
        return [row[: next((i for i, t in enumerate(row) if t in stops), len(row))] for row in out[:, width:].tolist()]

    def _fast_decoder(self, prompts: list[list[int]], max_new_tokens: int):
        """The static-cache CUDA-graph decoder, for a merged model of a family it knows (CUDA only)."""
        from afinar.backends import fast_decode

        if not self.fast_paths or not fast_decode.supported(self.model):
            return None
        if self._decoder is None or self._decoder.model is not self.model or self._decoder.qkv is None:
            self._decoder = fast_decode.StaticDecoder(self.model)
        return self._decoder if self._decoder.fits(prompts, max_new_tokens) else None

    @torch.no_grad()
    def save_merged(self, folder: Path) -> None:
        """Fold the adapter into dequantized full-precision weights and save a plain HF folder.

        The merged weights are never re-quantized: rounding W + BA back to 4 bits can erase an
        update that small (PEFT's own bnb merge does re-quantize, so it is not used here).
        """
        from afinar.backends import fast_decode

        fast_decode.unfuse(self.model)  # fused q/k/v weights (the engine's or the static decoder's): views serialisers dedupe
        model = torch_weights.merge_into_dense(self.model, self.dtype, quantized=self.cfg.model.quantization != "none")
        model.save_pretrained(str(folder))
        mlx_config.add_mlx_keys(Path(folder) / "config.json")  # plain mlx_lm.load(OUT) reads the rope right

    def memory(self) -> dict[str, float]:
        return torch_model.memory(self.device)

    def describe(self) -> dict[str, Any]:
        return torch_model.describe(self.cfg, self.device, self.dtype)
