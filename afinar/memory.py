"""How much memory a training step will take: one formula, with each backend's measured facts.

    total = in use before training (weights, LoRA weights, framework)
          + optimizer   12 bytes per trainable parameter (fp32 gradient, AdamW's two moments)
          + activations kept for backward: per token and layer, `KEPT` x hidden values (1 x hidden,
                        the block's input, with checkpointing), plus LoRA dropout's copies of each
                        adapted layer's input (and their masks) when dropout > 0
                      + the block being differentiated: its activations and their gradients (twice the
                        above, for one layer; three times with checkpointing, which recomputes it then)
                      + the answer positions' logits: fp32 logits, log-softmax and gradient (12 bytes x vocab)

The constants were measured on CPU (tests/test_memory.py trains a real step in a fresh process and
checks the estimated growth against the measured peak, within 30%). The three terms are added, not
maxed: allocators keep freed blocks (glibc on CPU, the caching allocator on CUDA), so in practice
the peaks of the logits and of the backward pass add up.
"""

from __future__ import annotations

from dataclasses import dataclass

KEPT = 26  # hidden-sized values kept per token and layer (attention, SwiGLU MLP, norms, residuals)
DROPOUT_COPY = 1.25  # a dropout output plus its mask, per input value of an adapted layer
LOGIT_BYTES = 12
MIB = 2**20


@dataclass(frozen=True)
class ModelFacts:
    """What a backend reports about its loaded, trainable model (bytes and sizes)."""

    in_use_bytes: int  # device memory (process RSS on CPU) before the first step
    weight_bytes: int  # frozen parameters as stored (4-bit for QLoRA)
    lora_bytes: int
    trainable_params: int
    hidden: int
    layers: int
    vocab: int
    activation_itemsize: int  # bytes per activation value (compute dtype)
    available_bytes: int  # what the device could hold in all
    lora_inputs: int = 0  # sum of the in_features of one block's adapted layers
    lora_dropout: float = 0.0


def estimate(facts: ModelFacts, batch_tokens: int, answer_tokens: int, checkpointing: bool) -> dict[str, float]:
    """MiB for each part of a training step, their total, and what the device has available."""
    block = KEPT * facts.hidden + (DROPOUT_COPY * facts.lora_inputs if facts.lora_dropout > 0 else 0)
    kept, working = (facts.hidden, 3 * block) if checkpointing else (block, 2 * block)
    values = batch_tokens * (facts.layers * kept + working)
    activations = values * facts.activation_itemsize + answer_tokens * facts.vocab * LOGIT_BYTES
    parts = {
        "weights": facts.weight_bytes,
        "lora": facts.lora_bytes,
        "framework": max(0, facts.in_use_bytes - facts.weight_bytes - facts.lora_bytes),
        "optimizer": facts.trainable_params * 12,
        "activations": activations,
    }
    out = {k: round(v / MIB, 3) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / MIB, 1)
    out["available"] = round(facts.available_bytes / MIB, 1)
    return out
