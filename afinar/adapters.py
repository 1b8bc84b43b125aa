"""LoRA adapters in two formats, converted both ways without any framework: PEFT and mlx-lm.

Both store the same two matrices per adapted layer; only names, layouts and the scale differ:

    PEFT    base_model.model.<path>.lora_A.weight  (r, in)    update = (lora_alpha / r) * B A x
            base_model.model.<path>.lora_B.weight  (out, r)
    mlx-lm  <path>.lora_a                          (in, r)    update = scale * x a b
            <path>.lora_b                          (r, out)

so A = a^T, B = b^T and scale = lora_alpha / r. mlx-lm's module paths mirror the Hugging Face
ones (model.layers.N.self_attn.q_proj) for the architectures both support, except in multimodal
checkpoints (`hf_path` / `mlx_path`). The run folder
holds the PEFT files at its root and the mlx-lm files in `mlx/`, whichever backend trained it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from afinar import atomic
from afinar.errors import AfinarError

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
MLX_WEIGHTS = "adapters.safetensors"
MLX_CONFIG = "adapter_config.json"
MLX_SUBDIR = "mlx"
PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")
_MLX_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[ab])$")
_LAYER = re.compile(r"\.layers\.(\d+)\.(.+)$")
# A multimodal checkpoint's language model: mlx-lm keeps the names of the checkpoint files
# (language_model.model.layers.N...), transformers 5 and so PEFT rename them on load (its "llava"
# conversion: model.language_model.layers.N...). Adapters are stored with PEFT's names.
_MLX_LM, _HF_LM = "language_model.model.", "model.language_model."


def hf_path(path: str) -> str:
    """The transformers (PEFT) name of an mlx-lm module path."""
    return _HF_LM + path.removeprefix(_MLX_LM) if path.startswith(_MLX_LM) else path


def mlx_path(path: str) -> str:
    """The mlx-lm name of a transformers (PEFT) module path."""
    return _MLX_LM + path.removeprefix(_HF_LM) if path.startswith(_HF_LM) else path


def detect_format(folder: str | Path) -> str:
    """'peft' or 'mlx' from the files in `folder`; a clear error otherwise."""
    folder = Path(folder)
    if (folder / PEFT_WEIGHTS).is_file() and (folder / PEFT_CONFIG).is_file():
        return "peft"
    if (folder / MLX_WEIGHTS).is_file() and (folder / MLX_CONFIG).is_file():
        return "mlx"
    raise AfinarError(
        f"{folder}: no adapter found. Expected a PEFT adapter ({PEFT_WEIGHTS} + {PEFT_CONFIG}), "
        f"an mlx-lm adapter ({MLX_WEIGHTS} + {MLX_CONFIG}), or an afinar run folder."
    )


def peft_config(rank: int, alpha: float, dropout: float, target_modules: list[str], base: str) -> dict:
    """The adapter_config.json PEFT writes for a plain LoRA adapter (fields PEFT reads back)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(target_modules),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_dora": False, "use_rslora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }


def mlx_config(rank: int, scale: float, dropout: float, keys: list[str], num_layers: int) -> dict:
    """mlx-lm's adapter_config.json: what `mlx_lm.tuner.utils.load_adapters` reads."""
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": sorted(keys)},
    }


def _read(folder: Path, weights: str, config: str) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors.numpy import load_file

    try:
        cfg = json.loads((folder / config).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / weights))
    except (OSError, ValueError) as e:
        raise AfinarError(f"{folder}: could not read the adapter ({e}).") from None
    return tensors, cfg


def _layer_key(path: str, folder: Path) -> tuple[int, str]:
    match = _LAYER.search(path)
    if not match:
        raise AfinarError(f"{folder}: adapted module {path!r} is not inside a '.layers.N.' block; mlx-lm cannot load it.")
    return int(match.group(1)), match.group(2)


def peft_to_mlx(src: str | Path, dst: str | Path) -> Path:
    """Write mlx-lm's adapters.safetensors + adapter_config.json for the PEFT adapter in `src`."""
    from safetensors.numpy import save_file

    src, dst = Path(src), Path(dst)
    tensors, cfg = _read(src, PEFT_WEIGHTS, PEFT_CONFIG)
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            raise AfinarError(f"{src / PEFT_CONFIG}: {flag}=true has no mlx-lm LoRA equivalent; retrain with plain LoRA.")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AfinarError(f"{src / PEFT_CONFIG}: per-layer rank_pattern/alpha_pattern cannot be expressed in mlx-lm's config.")
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    out, keys, layers = {}, set(), set()
    for name, value in tensors.items():
        match = _PEFT_KEY.match(name)
        if not match:
            raise AfinarError(f"{src / PEFT_WEIGHTS}: unexpected tensor {name!r} (only LoRA A/B matrices convert).")
        layer, key = _layer_key(match["path"], src)
        layers.add(layer)
        keys.add(key)
        out[f"{mlx_path(match['path'])}.lora_{match['which'].lower()}"] = np.ascontiguousarray(value.T.astype(np.float32))
    # Every layer up to the highest adapted one must be converted by mlx-lm (it counts from the end).
    config = mlx_config(rank, alpha / rank, float(cfg.get("lora_dropout", 0.0)), sorted(keys), max(layers) + 1)
    with atomic.folder(dst) as tmp:
        save_file(out, str(tmp / MLX_WEIGHTS), metadata={"format": "mlx"})
        atomic.write_json(tmp / MLX_CONFIG, config)
    return dst


def mlx_to_peft(src: str | Path, dst: str | Path, base: str = "") -> Path:
    """Write PEFT's adapter_model.safetensors + adapter_config.json for the mlx-lm adapter in `src`."""
    from safetensors.numpy import save_file

    src, dst = Path(src), Path(dst)
    tensors, cfg = _read(src, MLX_WEIGHTS, MLX_CONFIG)
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise AfinarError(f"{src / MLX_CONFIG}: fine_tune_type={cfg.get('fine_tune_type')!r}; only 'lora' converts to PEFT.")
    params = cfg.get("lora_parameters") or {}
    out, targets, rank = {}, set(), None
    for name, value in tensors.items():
        match = _MLX_KEY.match(name)
        if not match:
            raise AfinarError(f"{src / MLX_WEIGHTS}: unexpected tensor {name!r} (only lora_a/lora_b convert).")
        targets.add(hf_path(match["path"]))
        if match["which"] == "a":
            rank = value.shape[1]
        out[f"{PEFT_PREFIX}{hf_path(match['path'])}.lora_{match['which'].upper()}.weight"] = np.ascontiguousarray(
            value.T.astype(np.float32))
    if rank is None:
        raise AfinarError(f"{src / MLX_WEIGHTS}: no lora_a matrices found.")
    rank = int(params.get("rank", rank))
    scale = float(params.get("scale", 20.0))  # mlx-lm's default when the config omits it
    if not any(t.startswith(_HF_LM) for t in targets):  # else full names: short ones would reach the vision tower too
        targets = {t.rsplit(".", 1)[-1] for t in targets}
    config = peft_config(rank, scale * rank, float(params.get("dropout", 0.0)), sorted(targets), base)
    with atomic.folder(dst) as tmp:
        save_file(out, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        atomic.write_json(tmp / PEFT_CONFIG, config)
    return dst
