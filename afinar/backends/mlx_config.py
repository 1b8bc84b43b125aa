"""A transformers >= 5 config.json, in the form mlx-lm reads (see docs/MLX_ROPE.md).

transformers 5 writes `rope_theta` and `rope_scaling` (and `partial_rotary_factor`) inside
`rope_parameters` (per layer type for Gemma-3: {"full_attention": {...}, "sliding_attention":
{...}}) and describes Gemma-3's local/global layers by `layer_types`. mlx-lm 0.32.2's llama
(and mistral, which it maps to llama), qwen2, gemma2, gemma3_text, phi3 and granite read the
older top-level keys and, when they are missing, silently use their own defaults: rope base
10000 for llama (no llama3 scaling), 1e6 for qwen2, a local/global pattern of 6 for Gemma-3.

`mlx_keys(config)` derives those top-level keys from the nested ones; `MLXBackend.load` passes
them to mlx-lm as `model_config` (nothing is written next to the user's model), and merged
exports carry both forms (`add_mlx_keys`) so a plain `mlx_lm.load(OUT)` is right too.
No framework import here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from afinar.errors import AfinarError

log = logging.getLogger("afinar")

_NOT_SCALING = ("rope_theta", "partial_rotary_factor")


def _flat(params: dict, out: dict) -> None:
    """rope_theta / rope_scaling / partial_rotary_factor of one rope_parameters entry."""
    if "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind != "default":
        # mlx-lm reads the kind as "type" (phi3 requires it) or "rope_type" (rope_utils): give both.
        out["rope_scaling"] = {**{k: v for k, v in params.items() if k not in _NOT_SCALING}, "type": kind, "rope_type": kind}
    for key in ("partial_rotary_factor", "original_max_position_embeddings"):
        if key in params:
            out[key] = params[key]


def _sliding_pattern(layer_types: list[str], source: str) -> int:
    """Gemma-3's `sliding_window_pattern`: every p-th layer is global. Refuse what it cannot express."""
    if "full_attention" not in layer_types:
        raise AfinarError(f"{source}: layer_types has no full_attention layer; mlx-lm 0.32.2 builds Gemma-3's layers "
                          "from a period (sliding_window_pattern) and cannot express this. Use backend=torch.")
    period = layer_types.index("full_attention") + 1
    expected = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(len(layer_types))]
    if layer_types != expected:
        raise AfinarError(f"{source}: layer_types {layer_types} is not one global layer every {period}; mlx-lm 0.32.2 "
                          "can only build that pattern. Use backend=torch.")
    return period


def mlx_keys(config: dict, source: str = "config.json", runtime: bool = True) -> dict:
    """Top-level keys mlx-lm reads that `config` only holds in transformers 5's nested form.

    Keys the config already has at top level are left alone (a config written by
    transformers 4, or by hand, is read right already). `source` names the file in errors.
    `runtime=False` keeps every value as transformers reads it (for files transformers reads
    back, which prefers these old keys); `runtime=True` (afinar's own MLX load) also gives
    longrope models their short factors, the ones transformers uses up to
    original_max_position_embeddings tokens, where mlx-lm would apply the long ones.
    """
    text = config.get("text_config")
    if isinstance(text, dict):
        return _multimodal_keys(config, text, source, runtime)
    out: dict = {}
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params:
        if all(isinstance(v, dict) for v in params.values()):  # per layer type (Gemma-3)
            _flat(params.get("full_attention") or {}, out)
            if "rope_theta" in (params.get("sliding_attention") or {}):
                out["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        else:
            _flat(params, out)
    types = config.get("layer_types")
    if config.get("model_type") == "gemma3_text" and types and "sliding_window_pattern" not in config:
        out["sliding_window_pattern"] = _sliding_pattern(list(types), source)
    out = {k: v for k, v in out.items() if k not in config}
    scaling = out.get("rope_scaling", config.get("rope_scaling")) or {}
    if runtime and (scaling.get("type") or scaling.get("rope_type")) in ("longrope", "su") and "short_factor" in scaling:
        # mlx-lm's SuScaledRoPE applies long_factor at every length; transformers applies short_factor up to
        # original_max_position_embeddings tokens (4096 for Phi-3.5/Phi-4-mini), where training and answers are.
        out["rope_scaling"] = {**scaling, "long_factor": scaling["short_factor"]}
    return out


def _multimodal_keys(config: dict, text: dict, source: str, runtime: bool) -> dict:
    """A multimodal checkpoint: mlx-lm builds its language model from `text_config` (and drops the
    vision tower), so the keys go there; mlx-lm's gemma3 also takes the vocabulary size from the top
    level (default 262208, the real checkpoints'), which transformers keeps in text_config only."""
    out: dict = {}
    inner = mlx_keys(text, f"{source} text_config", runtime)
    if inner:
        out["text_config"] = {**text, **inner}
    if "vocab_size" in text and "vocab_size" not in config:
        out["vocab_size"] = text["vocab_size"]
    return out


def read_mlx_keys(folder: str | Path) -> dict:
    """`mlx_keys` of the config.json in `folder`: what `MLXBackend.load` hands mlx-lm as model_config."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    keys = mlx_keys(config, str(path))
    if (keys.get("rope_scaling") or {}).get("type") in ("longrope", "su"):
        log.warning("MLX: this model's longrope factors are set to the short ones, which transformers uses up to "
                    "original_max_position_embeddings tokens (mlx-lm 0.32.2 applies one set at every length).")
    return keys


def add_mlx_keys(config_path: str | Path) -> None:
    """Rewrite a config.json (a merged export) with the top-level keys mlx-lm reads added, atomically.

    transformers 5 reads the file as before: it takes the same values from the old keys
    (tests/test_families.py loads every merged family with transformers and with plain mlx-lm).
    """
    from afinar import atomic

    path = Path(config_path)
    config = json.loads(path.read_text(encoding="utf-8"))
    extra = mlx_keys(config, str(path), runtime=False)
    if extra:
        atomic.write_json(path, {**config, **extra})
