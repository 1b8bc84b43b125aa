"""bitsandbytes 4-bit weights on the torch side: keep them trainable on CPU, dequantize them,
and fold a LoRA adapter into dense weights (answering on CPU, merged export, CUDA serving)."""

from __future__ import annotations

import torch


def keep_cpu_4bit_differentiable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during training.

    bitsandbytes 0.50 repacks a Linear4bit's weight into an AVX512-BF16 layout the first time it
    runs in eval mode without gradients (our validation pass), and the repacked path has no
    backward: every later training step silently gets zero gradients. Tested in
    tests/test_torch_backend.py::test_qlora_cpu_trains_after_validation.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def dense_weight(layer) -> torch.Tensor:
    if type(layer).__name__ == "Linear4bit":  # bitsandbytes (not imported unless installed)
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight


def linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device)
    linear.weight.copy_(weight.to(dtype))
    if bias is not None:
        linear.bias.copy_(bias.to(dtype))
    return linear


def dense_fits(model, dtype, device) -> bool:
    """Whether the dequantized weights fit on the GPU beside what is there, with 2 GiB to spare."""
    dense = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            dense += state.shape.numel() * dtype.itemsize
    return dense + 2 * 2**30 < torch.cuda.mem_get_info(device)[0]


def dequantize_4bit(model, dtype) -> None:
    """Replace every bitsandbytes Linear4bit by an nn.Linear holding its dequantized weight."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                         dtype=dtype, device=child.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype))
                    if child.bias is not None:
                        linear.bias.copy_(child.bias.to(dtype))
                setattr(parent, name, linear)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_loaded_in_4bit = False


@torch.no_grad()
def merge_into_dense(model, dtype, quantized: bool):
    """The plain model with every LoRA update folded into dequantized `dtype` weights; never re-quantized.

    Rounding W + BA back to 4 bits can erase an update that small (PEFT's own bitsandbytes merge
    re-quantizes, so it is not used here). The config loses its quantization settings.
    """
    from peft.tuners.lora import LoraLayer

    if hasattr(model, "get_base_model"):  # not merged at load time (CUDA keeps the adapter apart)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    base = child.get_base_layer()
                    weight = dense_weight(base).float()
                    for adapter in child.active_adapters:
                        weight += child.get_delta_weight(adapter).float()
                    setattr(parent, name, linear(weight, base.bias, dtype))
        model = model.get_base_model()
    if quantized:
        dequantize_4bit(model, dtype)  # layers without an adapter
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.dtype = dtype
    return model
