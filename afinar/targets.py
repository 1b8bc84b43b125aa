"""Which linear layers get LoRA: `lora.target_modules` resolved against one model's layers.

Presets name the layers of Llama-shaped models (q_proj, k_proj, v_proj, gate_proj, up_proj...).
Other families fuse some of them: Phi-3/Phi-4 have one `qkv_proj` and one `gate_up_proj`. Passed
as they are, PEFT would adapt only the names that exist and say nothing; here a preset name maps
onto the fused layer that holds it (with a notice), `all-linear` means every linear layer of the
decoder blocks, and a name that matches nothing is an error listing the model's linear layers.
In a multimodal checkpoint only the language model is adapted (training is text-only: the vision
tower never sees an input), unless a name itself names a tower part (`vision_tower.`...).

Framework-free: the backends pass the full dotted names of the model's linear layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from afinar.errors import AfinarError

ALL_LINEAR = "all-linear"
# fused layer -> the separate layers it holds, in the names presets use
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.\d+\.")
# Parts of multimodal checkpoints that are not the language model: adapted only when named.
_TOWERS = ("vision", "visual", "image", "audio", "speech", "multi_modal_projector", "mm_projector")


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a target given as a name: the module's full name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def in_tower(name: str) -> bool:
    """Whether a module or tensor name is in a multimodal checkpoint's vision/audio tower or projector."""
    return any(part.startswith(_TOWERS) for part in name.split("."))


def in_block(name: str) -> str | None:
    """The path inside its decoder block ('self_attn.q_proj'), or None for a layer outside the blocks."""
    match = _BLOCK.search(name)
    return name[match.end():] if match else None


@dataclass(frozen=True)
class Targets:
    modules: tuple[str, ...]  # full dotted names of the linear layers that get LoRA
    linear: tuple[str, ...]  # every linear layer of the model (to tell whether short names are enough)
    notices: tuple[str, ...] = ()

    @property
    def kinds(self) -> list[str]:
        """The adapted layers' own names (q_proj, qkv_proj, ...), sorted."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    @property
    def peft_target_modules(self) -> list[str]:
        """What to give PEFT: the short names when they select exactly these layers, else the full names.

        Always the full names in a multimodal checkpoint's language model: its vision tower has layers of
        the same names, which the caller may not have listed (mlx-lm drops the tower at load)."""
        by_kind = {n for n in self.linear if n.rsplit(".", 1)[-1] in self.kinds}
        multimodal = any(".language_model." in f".{m}" for m in self.modules)
        return self.kinds if by_kind == set(self.modules) and not multimodal else sorted(self.modules)

    def block_keys(self) -> list[str]:
        """Paths inside a decoder block (mlx-lm's LoRA `keys`); an error for a layer outside the blocks."""
        outside = [m for m in self.modules if in_block(m) is None]
        if outside:
            raise AfinarError(f"lora.target_modules: {outside[:3]} are outside the decoder blocks; the MLX backend adapts "
                              "only layers inside them. Drop those names, or use backend=torch.")
        return sorted({in_block(m) for m in self.modules})


def describe_linear(linear: Iterable[str]) -> str:
    """The model's linear layers, one entry per path inside a block plus the others ('lm_head')."""
    paths = {in_block(n) or n for n in linear if not in_tower(n)}
    return ", ".join(sorted(paths))


def resolve(requested: list[str], linear: Iterable[str]) -> Targets:
    """The linear layers `requested` (lora.target_modules) selects among `linear` (full dotted names).

    Raises AfinarError naming every requested name that selects nothing, with the model's linear layers.
    """
    linear = tuple(linear)
    language = [n for n in linear if not in_tower(n)]
    chosen: dict[str, None] = {}
    fused_for: dict[str, list[str]] = {}
    missing, towers = [], []
    for target in requested:
        if target == ALL_LINEAR:
            found = [n for n in language if in_block(n) is not None]
        elif in_tower(target):  # asked by its own name: the user means the tower
            found = [n for n in linear if _matches(n, target)]
            towers += found
        else:
            found = [n for n in language if _matches(n, target)]
        if not found:
            for fused, parts in FUSED.items():
                if target in parts and (found := [n for n in language if _matches(n, fused)]):
                    fused_for.setdefault(fused, []).append(target)
                    break
        if not found:
            missing.append(target)
        chosen.update(dict.fromkeys(found))
    if missing:
        raise AfinarError(
            f"lora.target_modules={list(requested)}: {missing} match no linear layer of this model. Linear layers in this model: "
            f"{describe_linear(linear)}. Use those names (the last part is enough), or {ALL_LINEAR!r}."
        )
    notices = tuple(
        f"lora.target_modules: this model fuses {', '.join(FUSED[fused])} into {fused}; adapting {fused} for "
        f"{', '.join(asked)} (one LoRA over the fused layer)."
        for fused, asked in fused_for.items())
    if towers:
        notices += (f"lora.target_modules: {towers[:3]}{'...' if len(towers) > 3 else ''} are outside the language model; "
                    "afinar trains on text only, so they see no input and their LoRA stays zero.",)
    return Targets(tuple(chosen), linear, notices)


def count_by_kind(trainable: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Trainable parameters per adapted layer name ({'qkv_proj': 24576, ...}) from (parameter name, size) pairs.

    Works on PEFT names (...self_attn.qkv_proj.lora_A.default.weight) and mlx-lm names (...qkv_proj.lora_a).
    """
    counts: dict[str, int] = {}
    for name, size in trainable:
        parts = name.split(".")
        at = next((i for i, p in enumerate(parts) if p.lower().startswith("lora_")), None)
        kind = parts[at - 1] if at else name
        counts[kind] = counts.get(kind, 0) + int(size)
    return dict(sorted(counts.items()))
