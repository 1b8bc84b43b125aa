"""What the torch training and answering backends share: device and dtype, loading the base
(bitsandbytes NF4 for QLoRA), the answer-only loss, memory and the description for metadata."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from afinar import batches, data, hardware
from afinar import targets as lora_targets
from afinar.backends import torch_head
from afinar.config import Config
from afinar.errors import AfinarError
from afinar.models import ResolvedModel, hub_load_error, saved_quantization

log = logging.getLogger("afinar")


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    name = cfg.model.compute_dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return getattr(torch, name)


def load_base(cfg: Config, model: ResolvedModel, device: torch.device, dtype: torch.dtype,
              quant_storage: torch.dtype = torch.uint8):
    """(base model, tokenizer): 4-bit NF4 for QLoRA (any model.quantization but 'none'), else `dtype`.

    A folder saved in bitsandbytes 4-bit (config.json's `quantization_config`, as `*-bnb-4bit` hub
    models ship) is loaded as it is: a smaller download and no quantization at load.

    `quant_storage`: the dtype bitsandbytes packs 4-bit weights into (FSDP shards floating-point
    tensors only, all of one dtype per unit: bitsandbytes' FSDP-QLoRA guide).
    """
    from transformers import AutoTokenizer, PretrainedConfig

    quantize = cfg.model.quantization != "none"  # 'int4' too: bitsandbytes trains NF4 only
    if quantize and device.type == "mps":
        raise AfinarError(
            f"model.quantization={cfg.model.quantization} with backend=torch needs bitsandbytes, which does "
            "not run on Apple's MPS. Use the MLX backend for 4-bit on this Mac (pip install 'afinar[mlx]', then "
            "--set backend=mlx), or --set model.quantization=none (LoRA on MPS)."
        )
    saved = _saved_quantization(cfg, model, quant_storage)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize and saved is None:  # a bnb-4bit folder is loaded as saved: a second config would conflict
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=cfg.model.double_quant,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=quant_storage,
        )
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.path)
        model_type = PretrainedConfig.get_config_dict(model.path)[0].get("model_type", "")
        base = lm_class(model_type).from_pretrained(model.path, **kwargs)
    except OSError as e:
        if model.source == "hub":
            raise hub_load_error(model.name, e) from None
        raise AfinarError(f"Could not load model.base={model.name!r} from {model.path}: {e}") from None
    if device.type != "cuda" and not quantize:
        base.to(device)
    if saved is not None:  # compute in the run's dtype, whatever dtype the folder was saved with
        for module in base.modules():
            if hasattr(module, "compute_dtype") and type(module).__name__ == "Linear4bit":
                module.compute_dtype = dtype
    if tokenizer.eos_token_id is None:
        raise AfinarError(f"The tokenizer of {model.name!r} has no EOS token: answers could never end.")
    return base, tokenizer


def lm_class(model_type: str):
    """transformers' auto class that generates text for `model_type`: AutoModelForCausalLM, or
    AutoModelForImageTextToText for a multimodal checkpoint transformers maps only there
    (Mistral3ForConditionalGeneration; Gemma-3's is in both). Either takes text-only input, and keeps
    the checkpoint's module names, so the adapter loads with plain PEFT on the same class."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _saved_quantization(cfg: Config, model: ResolvedModel, quant_storage: torch.dtype) -> str | None:
    """'bnb-4bit' for a base saved in bitsandbytes 4-bit (loaded as it is), None for a full-precision one;
    an error for what the torch backend cannot train on."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(model.path)
    except OSError as e:
        if model.source == "hub":
            raise hub_load_error(model.name, e) from None
        raise AfinarError(f"Could not read the config of model.base={model.name!r} ({model.path}): {e}") from None
    saved = saved_quantization(config)
    where = f"model.base={model.name!r} is stored"
    if saved is None:
        return None
    if saved == "mlx":
        raise AfinarError(f"{where} in MLX's 4-bit format (an mlx-community model), which PyTorch cannot load. "
                          "Use --set backend=mlx (Apple Silicon, or MLX's CPU build), or the original Hugging Face model.")
    if saved != "bnb-4bit":
        raise AfinarError(f"{where} quantized with '{saved}', which afinar cannot train on. Use the full-precision "
                          "model (afinar quantizes it to NF4 at load) or a bitsandbytes 4-bit one.")
    if cfg.model.quantization == "none":
        raise AfinarError(f"{where} in 4-bit (bitsandbytes), so training on it is QLoRA: set "
                          "--set model.quantization=nf4, or use the full-precision model for plain LoRA.")
    stored = str((config.get("quantization_config") or {}).get("bnb_4bit_quant_storage", "uint8"))
    if stored != str(quant_storage).removeprefix("torch."):
        raise AfinarError(f"{where} in 4-bit packed as {stored}; FSDP shards floating-point tensors only "
                          f"({quant_storage}). Use the full-precision model with distributed.strategy=fsdp, or ddp.")
    return saved


def new_lora(base, cfg: Config):
    """`base` with fresh LoRA weights on `lora.target_modules` (seeded: same seed, same adapter).

    The names are resolved against this model's layers first (`targets.py`: fused qkv_proj, all-linear,
    an error listing the layers for a name that matches nothing).
    """
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    chosen = lora_targets.resolve(lora.target_modules,
                                  [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)])
    for notice in chosen.notices:
        log.warning(notice)
    torch.manual_seed(cfg.train.seed)
    try:
        model = get_peft_model(base, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=chosen.peft_target_modules, task_type="CAUSAL_LM"))
    except ValueError as e:
        names = sorted({n.split(".")[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
        raise AfinarError(f"lora.target_modules={lora.target_modules}: {str(e).splitlines()[0]} "
                          f"Linear layers in this model: {names}.") from None
    # PEFT takes the base's name from the folder it was loaded from (for the embedded or a GGUF model,
    # afinar's cache); adapter_config.json names it as the user did, as the MLX backend's does.
    model.peft_config["default"].base_model_name_or_path = cfg.model.base
    return model


def loss_sum(model, batch: list[data.Encoded], pad: int, device: torch.device,
             precision: contextlib.AbstractContextManager | None = None) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target tokens.

    Only the hidden states of target positions go through the LM head: answers are a fraction of
    each sequence, and the head (vocab x hidden) is the largest matmul in a small model, so this
    skips most of its work and never builds full-vocabulary logits for prompt tokens.
    `tests/test_torch_backend.py` checks it equals the plain HF loss.
    """
    # Which positions are targets is known on the CPU: selecting them by index keeps the GPU queue
    # full (a boolean mask or a count on the GPU would wait for it to drain).
    p = batches.pad_batch(batch, pad)
    where = torch.from_numpy(p.positions).to(device)
    labels = torch.from_numpy(p.labels).to(device)
    ids = torch.from_numpy(p.ids).to(device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    # The model's own objective: its output scaling (Granite, Cohere, Falcon-H1, softcapping) applied
    # to the head's output, or the full forward for a head step torch_head.py does not know.
    transform = torch_head.head_transform(base)
    # No padding mask: rows are right-padded, so under the causal mask a real token never sees
    # padding (it comes after it) and padding positions carry no target. The outputs that count
    # are the same, and attention runs as plain causal (flash) attention instead of a masked
    # kernel that expands the mask per head (3 GB on a 7B step).
    with precision or contextlib.nullcontext():
        if transform is not None:
            hidden = base.model(input_ids=ids)[0]  # as the forward does (torch_head.py checks its source)
            logits = transform(base, head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)))
        else:
            logits = model(input_ids=ids).logits
            logits = logits.reshape(-1, logits.shape[-1]).index_select(0, where)
    return F.cross_entropy(logits.float(), labels, reduction="sum"), len(labels)


def memory(device: torch.device) -> dict[str, float]:
    """{'memory_mb': now, 'peak_memory_mb': peak} of the device (process RSS on CPU)."""
    if device.type == "cuda":
        return {"memory_mb": torch.cuda.memory_allocated() / 2**20, "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}
    if device.type == "mps":
        now = torch.mps.current_allocated_memory() / 2**20
        return {"memory_mb": now, "peak_memory_mb": torch.mps.driver_allocated_memory() / 2**20}
    now, peak = hardware.process_memory_mb()
    return {"memory_mb": now, "peak_memory_mb": peak}


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    return int(hardware.available_memory_gb() * 2**30 + hardware.process_memory_mb()[0] * 2**20)


def describe(cfg: Config, device: torch.device, dtype: torch.dtype, model=None) -> dict[str, Any]:
    import peft
    import transformers

    info: dict[str, Any] = {
        "backend": "torch",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else hardware.detect().name,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    if cfg.model.quantization != "none":
        # What was loaded: the config's settings, or those a bnb-4bit folder was saved with.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        loaded = getattr(getattr(base, "config", None), "quantization_config", None)
        kind = str(getattr(loaded, "bnb_4bit_quant_type", "nf4")).upper()
        double = getattr(loaded, "bnb_4bit_use_double_quant", cfg.model.double_quant)
        info["quantization"] = f"bitsandbytes {kind}" + (", double quant" if double else "") + (
            " (model.quantization=int4 maps to NF4 on torch)" if cfg.model.quantization == "int4" else "")
        import bitsandbytes

        info["versions"]["bitsandbytes"] = bitsandbytes.__version__
    if model is not None:
        info["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return info


def save_peft(model, folder: str | Path) -> None:
    # afinar never resizes the embeddings: no full embedding copy, and no look-up of the base's config by
    # its name (PEFT's "auto" asks the hub, which the embedded model's name is not on).
    model.save_pretrained(str(folder), save_embedding_layers=False)
    (Path(folder) / "README.md").unlink(missing_ok=True)  # PEFT's empty model card; we write our own guide
