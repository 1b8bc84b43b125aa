"""The continuous-batching engine behind `afinar serve`, `afinar ask` and every backend's `generate`.

  request.py        SamplingParams, Request (tokens, streamed text, stop strings), framework-free
  scheduler.py      Engine: admission, one step at a time, per-row finish and failure, drain, metrics
  plan.py           the Runner protocol, prefill chunking and shape buckets, framework-free
  torch_flat.py     static KV slots, prompt chunks and decode rows in one CUDA-graph forward (merged
                    Llama/Mistral/Qwen2; the default on CUDA)
  torch_varlen.py   its attention: every row over its own keys (FlashAttention varlen; SDPA reference)
  torch_rows.py     what both static-slot runners share: per-row settings, pipelined read-back, graph capture
  torch_runner.py   static KV slots, a prefill forward then a CUDA-graph decode step (the same families;
                    CPU's default: a row's tokens are the same alone or in any batch)
  torch_generic.py  any other torch model, through its own forward, a cache per row
  torch_sampling.py per-row greedy / seeded top-p choice on the device
  mlx_runner.py     mlx-lm's BatchGenerator with a sampler per request

The seam is thin on purpose: an engine is built from a loaded model, its tokenizer and the
serve settings (`build`), whatever loaded them.
"""

from __future__ import annotations

from typing import Any

from afinar.config import ServeConfig
from afinar.engine.plan import Runner, RowError
from afinar.engine.request import TEMPERATURE_FLOOR, Request, SamplingParams
from afinar.engine.scheduler import Draining, Engine, QueueFull


def make_torch_runner(model, cfg: ServeConfig) -> Runner:
    """For a merged model of a family it knows (CUDA or CPU): `FlatRunner` or `TorchRunner` (`serve.step`);
    else `GenericRunner`."""
    from afinar.backends import fast_decode

    device = next(model.parameters()).device
    # `serve.fast_paths: off` asks for the model's own forward everywhere.
    fast = cfg.fast_paths != "off" and device.type in ("cuda", "cpu") \
        and not model.training and fast_decode.supported(model)
    if fast:
        from afinar.engine import torch_varlen

        flat, attention = cfg.step == "flat", None  # 'flat' asked for: the kernel, or its SDPA reference
        if cfg.step == "auto":
            c = model.config
            flat = torch_varlen.flash_works(device, model.lm_head.weight.dtype, c.num_attention_heads,
                                            c.num_key_value_heads, fast_decode.DecoderStack.head_dim_of(model))
            attention = "flash"  # probed just now
        if flat:
            from afinar.engine.torch_flat import FlatRunner

            return FlatRunner(model, cfg.max_batch_size, cfg.max_context, cfg.prefill_chunk, attention=attention,
                              split_keys=cfg.split_keys)
        from afinar.engine.torch_runner import TorchRunner

        return TorchRunner(model, cfg.max_batch_size, cfg.max_context, cfg.prefill_chunk)
    from afinar.engine.torch_generic import GenericRunner

    return GenericRunner(model, cfg.max_batch_size, cfg.max_context, cfg.prefill_chunk)


def build(model, tokenizer, cfg: ServeConfig, framework: str = "torch", stop_ids: set[int] | None = None) -> Engine:
    """An engine (not started) over a loaded model: `framework` 'torch' or 'mlx'. `stop_ids`: every token
    that ends an answer (the answering backend's: EOS, generation_config's list, the template's end of turn)."""
    if framework == "mlx":
        from afinar.engine.mlx_runner import MLXRunner

        context = getattr(getattr(model, "args", None), "max_position_embeddings", None)
        runner = MLXRunner(model, cfg.max_batch_size, cfg.max_context, cfg.prefill_chunk, context)
    else:
        runner = make_torch_runner(model, cfg)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    stops = set(stop_ids or [tokenizer.eos_token_id])
    return Engine(runner, decode, stops, cfg.queue_size)


def engine_for(backend: Any) -> Engine:
    """The engine of a loaded answering backend (`.model`, `.tokenizer`, `.cfg.serve`, `.stop_ids`), built once per model."""
    engine = getattr(backend, "_engine", None)
    if engine is None or engine.stopped or getattr(engine, "model", None) is not backend.model:
        engine = build(backend.model, backend.tokenizer, backend.cfg.serve, backend.name, set(backend.stop_ids))
        engine.model = backend.model
        backend._engine = engine
    return engine


__all__ = ["Draining", "Engine", "QueueFull", "Request", "RowError", "Runner", "SamplingParams", "TEMPERATURE_FLOOR",
           "build", "engine_for", "make_torch_runner"]
