"""The training loss's LM head: the model's own output transform, on answer positions only.

`TorchBackend.loss_sum` runs the decoder, keeps the hidden states of answer positions and
applies the head to those alone (most of a sequence is prompt). That is the model's objective
only if the head is all the model's forward does after the decoder: Granite divides the
logits by `logits_scaling`, Cohere multiplies them by `logit_scale`, Falcon-H1 by
`lm_head_multiplier`, Gemma-2 soft-caps them. `head_transform` reads the causal-LM class's
forward source, and returns the function its head step computes when that step is one of the
known ones; for anything else it returns None and the loss takes the model's full forward.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Callable

import torch

Transform = Callable[[object, torch.Tensor], torch.Tensor]  # (model, head output) -> logits


def _softcap(model, logits: torch.Tensor) -> torch.Tensor:
    cap = model.config.final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap


# The head step of each known forward, as its source reads once comments and spaces are removed.
_KNOWN: dict[str, Transform] = {
    "logits = self.lm_head(hidden_states)": lambda model, x: x,
    "logits = self.lm_head(hidden_states) | logits = logits / self.config.logits_scaling":
        lambda model, x: x / model.config.logits_scaling,
    "logits = self.lm_head(hidden_states) | logits = logits * self.logit_scale": lambda model, x: x * model.logit_scale,
    "logits = self.lm_head(hidden_states) * self.model.lm_head_multiplier":
        lambda model, x: x * model.model.lm_head_multiplier,
    "logits = self.lm_head(hidden_states) | if self.config.final_logit_softcapping is not None: "
    "| logits = logits / self.config.final_logit_softcapping | logits = torch.tanh(logits) "
    "| logits = logits * self.config.final_logit_softcapping": _softcap,
}
# What must come just before it: the decoder's last hidden state, cut to the positions kept.
_BEFORE = ({"hidden_states = outputs.last_hidden_state", "hidden_states = outputs[0]"},
           {"hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)"})


@functools.cache
def _transform_of(cls: type) -> Transform | None:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    lines = [line for line in (re.sub(r"\s+#.*$", "", raw).strip() for raw in source.splitlines()) if line]
    head = next((i for i, line in enumerate(lines) if line.startswith("logits = self.lm_head(")), None)
    if head is None or head < 2 or lines[head - 2] not in _BEFORE[0] or lines[head - 1] not in _BEFORE[1]:
        return None
    end = next((i for i in range(head, len(lines)) if lines[i].startswith("loss =")), None)
    if end is None or not any("= self.model(" in line for line in lines[:head]):
        return None
    return _KNOWN.get(" | ".join(lines[head:end]))


def head_transform(model) -> Transform | None:
    """`f(model, lm_head(h))` equal to the logits `model`'s forward returns for hidden states `h` =
    `model.model(...)[0]`; None when the forward does something else (the caller then runs the full forward).

    `model.model` is the decoder, or a multimodal checkpoint's text+vision model, which for text-only
    input returns its language model's hidden states: the same head step either way."""
    if not isinstance(getattr(model, "model", None), torch.nn.Module):
        return None
    return _transform_of(type(model))
