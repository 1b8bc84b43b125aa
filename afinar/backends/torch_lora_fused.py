"""Fused LoRA layers for training: route a PEFT LoRA model through torch_lora_math's autograd Functions.

PEFT runs a LoRA linear as `base(x) + lora_B(lora_A(dropout(x))) * s`: the base matmul (4-bit
weights dequantized by bitsandbytes), two small matmuls, a scale, a clone and an add forward,
as many again backward plus an add of the two input gradients, and transformers' rotary
embedding is ~8 eager kernels each way per layer; each is a launch, a pass over memory and
Python overhead. On a 7B QLoRA step these cost about a quarter of the time
(benchmarks/results/2026-11-29-h200-profile-afinar-auto.txt). `fuse_lora` routes, per model:

- every LoRA Linear through one Function (base matmul + update, torch_lora_math.Projections);
- the q/k/v projections of Llama / Mistral / Qwen2 attention through one Function run just
  before transformers' own attention forward, which then finds each projection's output ready;
- their SwiGLU MLPs through one Function (torch_lora_math.SwiGLU);
- their rotary embedding through a Function with its own backward (torch_lora_math.Rotary).

Only where this is PEFT's and transformers' function exactly: LoRA dropout 0, one active plain
LoRA adapter, frozen nn.Linear or bitsandbytes 4-bit base layers, and the module classes and
forwards it was written against; anything else keeps its forward and a debug line says why.
tests/test_lora_fused.py checks loss and every LoRA gradient against plain PEFT.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types
from collections import Counter

import torch

from afinar.backends.torch_lora_math import Plan, Projections, Rotary, SwiGLU, pointwise, rope

log = logging.getLogger("afinar")

ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}

# ------------------------------------------------------------ which modules compute exactly this


def _peft_lora_classes() -> tuple:
    from peft.tuners.lora.layer import Linear

    classes = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit
        classes.append(Linear4bit)
    except ImportError:  # no bitsandbytes: no 4-bit LoRA layers either
        pass
    return tuple(classes)


def _is_4bit_linear(layer) -> bool:
    cls = type(layer)
    if not (cls.__module__.startswith("bitsandbytes") and cls.__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")):
        return False
    import bitsandbytes as bnb

    return cls.forward is bnb.nn.Linear4bit.forward and getattr(layer.weight, "quant_state", None) is not None


def _base_problem(layer) -> str | None:
    """Why `layer` is not a frozen nn.Linear or bitsandbytes Linear4bit with its own forward (None: it is)."""
    if not (type(layer).forward is torch.nn.Linear.forward and isinstance(layer, torch.nn.Linear)) \
            and not _is_4bit_linear(layer):
        return f"base layer {type(layer).__name__}"
    if "forward" in layer.__dict__:
        return "base layer forward already replaced"
    if layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad):
        return "base weights train"
    return None


def _lora_problem(module) -> str | None:
    """Why PEFT's forward of LoRA layer `module` is not the fused function (None: it is)."""
    if type(module).forward not in {cls.forward for cls in _peft_lora_classes()}:
        return f"{type(module).__name__} is not PEFT's LoRA Linear"
    if "forward" in module.__dict__:
        return "forward already replaced"
    adapters = module.active_adapters
    if len(adapters) != 1 or adapters[0] not in module.lora_A:
        return f"{len(adapters)} active adapters"
    name = adapters[0]
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return f"lora dropout {module.lora_dropout[name].p}"
    if module.use_dora.get(name) or name in getattr(module, "lora_variant", {}):
        return "DoRA or another LoRA variant"
    if module.lora_bias.get(name):
        return "lora_bias"
    if module.merged:
        return "adapter merged into the base"
    return _base_problem(module.get_base_layer())


_CLASSES: dict[str, tuple] = {}


def _known(kind: str) -> tuple:
    """transformers' LlamaX / MistralX / Qwen2X classes for kind 'Attention' or 'MLP'."""
    if kind not in _CLASSES:
        found = []
        for arch, prefix in ARCHITECTURES.items():
            try:
                found.append(getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), prefix + kind))
            except (ImportError, AttributeError):
                pass
        _CLASSES[kind] = tuple(found)
    return _CLASSES[kind]


def _source_has(function, *lines: str) -> bool:
    try:
        source = inspect.getsource(inspect.unwrap(function))
    except (OSError, TypeError):
        return False
    return all(line in source for line in lines)


def _own_forward(module, *lines: str) -> bool:
    """The class's forward from its transformers module, untouched, and holding these lines."""
    cls = type(module)
    return "forward" not in module.__dict__ and cls.forward.__module__ == cls.__module__ and _source_has(cls.forward, *lines)


ATTENTION_LINES = ("self.q_proj(hidden_states)", "self.k_proj(hidden_states)", "self.v_proj(hidden_states)")
MLP_LINE = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"
ROTARY_LINES = ("q_embed = (q * cos) + (rotate_half(q) * sin)", "k_embed = (k * cos) + (rotate_half(k) * sin)",
                "cos = cos.unsqueeze(unsqueeze_dim)", "sin = sin.unsqueeze(unsqueeze_dim)")


def _mlp_forward_known(module) -> bool:
    from afinar.backends import torch_fast

    patched = module.__dict__.get("forward")  # torch_fast.fuse_pointwise's forward: the same formula
    if patched is not None:
        return getattr(patched, "__func__", None) is torch_fast._mlp_forward
    return _own_forward(module, MLP_LINE)


# ------------------------------------------------------------ the patches


class _Group:
    """Projections run by one Function: per member, a PEFT LoRA layer (with its adapter) or a plain base layer."""

    def __init__(self, parent, names: list[str], act=None, act_backward=None):
        self.parent, self.names = parent, names
        self.members = [getattr(parent, n) for n in names] if parent is not None else []
        self.act, self.act_backward = act, act_backward

    @classmethod
    def single(cls, module):
        group = cls(None, [])
        group.members = [module]
        return group

    def arguments(self, x: torch.Tensor):
        """(plan, LoRA tensors) when the fused function is PEFT's for this call; None otherwise."""
        if self.parent is not None and any(getattr(self.parent, n) is not m for n, m in zip(self.names, self.members)):
            return None  # a projection was swapped out (merged, unloaded) since patching
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        if autocast and device != "cuda":  # PEFT's 4-bit layer follows CUDA's autocast only
            return None
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        layers, scales, lora = [], [], []
        for m in self.members:
            if hasattr(m, "lora_A"):
                adapters = m.active_adapters
                if m.disable_adapters or m.merged or len(adapters) != 1 or adapters[0] not in m.lora_A \
                        or not getattr(m, "cast_input_dtype_enabled", True):
                    return None
                name = adapters[0]
                A, B = m.lora_A[name].weight, m.lora_B[name].weight
                if not autocast and A.dtype != dtype:  # PEFT would run the update in the LoRA dtype
                    return None
                layer = m.get_base_layer()
                lora += [A, B]
                scales.append(m.scaling[name])
            else:
                layer = m
                lora += [None, None]
                scales.append(0.0)
            state = getattr(layer.weight, "quant_state", None)
            if state is not None:  # bitsandbytes computes in its compute dtype; CPU-repacked weights don't dequantize
                if layer.compute_dtype != dtype or getattr(state, "packing_format_for_cpu", False):
                    return None
            elif not autocast and layer.weight.dtype != dtype:
                return None
            layers.append(layer)
        plan = Plan(layers, scales, dtype, [None if t is None else t.dtype for t in lora], self.act, self.act_backward)
        return plan, lora

    def run(self, function, x):
        args = self.arguments(x)
        return None if args is None else function.apply(x, args[0], *args[1])


def _projection_forward(self, x, *args, **kwargs):
    """A LoRA layer's (or a q/k/v base layer's) forward: the output its attention computed already, or fused."""
    ready = self.__dict__.pop("_afinar_ready", None)
    if not args and not kwargs:
        if ready is not None and ready[0] is x:
            return ready[1]
        group = self.__dict__.get("_afinar_group")
        if group is not None and (out := group.run(Projections, x)) is not None:
            return out[0]
    return type(self).forward(self, x, *args, **kwargs)


def _attention_forward(self, *args, **kwargs):
    """transformers' own attention forward, with q/k/v computed before it by one fused Function.

    The HF forward calls q_proj / k_proj / v_proj on its `hidden_states`: each finds its output
    ready (`_projection_forward`) for exactly that tensor, so rotary, cache and attention stay HF's.
    """
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    group = self._afinar_group
    outs = group.run(Projections, x)
    if outs is None:
        return type(self).forward(self, *args, **kwargs)
    for member, out in zip(group.members, outs):
        member.__dict__["_afinar_ready"] = (x, out)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        for member in group.members:
            member.__dict__.pop("_afinar_ready", None)


def _mlp_forward(self, x):
    out = self._afinar_group.run(SwiGLU, x)
    if out is not None:
        return out
    previous = self.__dict__.get("_afinar_previous")
    return previous(x) if previous is not None else type(self).forward(self, x)


_FORWARDS = (_projection_forward, _attention_forward, _mlp_forward)
_ROTARY: dict[str, list] = {}  # transformers modeling module -> [its apply_rotary_pos_emb, models using ours]


def _hold_rotary(module, functions) -> bool:
    """Route the modeling module's apply_rotary_pos_emb through `Rotary` (refcounted); False if not HF's formula."""
    name = type(module).__module__
    if name not in _ROTARY:
        mod = importlib.import_module(name)
        original = getattr(mod, "apply_rotary_pos_emb", None)
        if original is None or not _source_has(original, *ROTARY_LINES) \
                or not _source_has(getattr(mod, "rotate_half", None), "torch.cat((-x2, x1), dim=-1)"):
            return False

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            if cos.requires_grad or sin.requires_grad:  # never in these models; `Rotary` has no gradient for them
                return rope(q, k, cos, sin)
            return Rotary.apply(q, k, cos, sin, functions)

        mod.apply_rotary_pos_emb = apply_rotary_pos_emb
        _ROTARY[name] = [original, 0]
    _ROTARY[name][1] += 1
    module.__dict__["_afinar_rotary"] = name
    return True


def _release_rotary(name: str) -> None:
    entry = _ROTARY[name]
    entry[1] -= 1
    if entry[1] == 0:
        importlib.import_module(name).apply_rotary_pos_emb = entry[0]
        del _ROTARY[name]


BLOCKS = {"attention": ["q_proj", "k_proj", "v_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


def _block_kind(module) -> str | None:
    if isinstance(module, _known("Attention")):
        return "attention"
    return "mlp" if isinstance(module, _known("MLP")) else None


def _block_problem(module, kind: str) -> str | None:
    """Why a Llama/Mistral/Qwen2 attention or MLP block is left alone (None: it is fused)."""
    if kind == "attention":
        ok = _own_forward(module, *ATTENTION_LINES)
    else:
        ok = _mlp_forward_known(module) and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
    if not ok:
        return f"{type(module).__name__} forward is not the one fused here"
    members = {n: getattr(module, n) for n in BLOCKS[kind]}
    for n, m in members.items():
        if "_afinar_group" in m.__dict__:  # a LoRA layer fused on its own already
            continue
        if (why := _lora_problem(m) if hasattr(m, "lora_A") else _base_problem(m)) is not None:
            return f"{n}: {why}"
    return None if any(hasattr(m, "lora_A") for m in members.values()) else "no LoRA layer in it"


def _patch_block(module, kind: str, functions) -> None:
    names = BLOCKS[kind]
    group = _Group(module, names, *functions[:2])
    if kind == "attention":
        for m in group.members:
            m.__dict__.setdefault("_afinar_group", None)  # plain base layers: take the ready output only
            m.forward = types.MethodType(_projection_forward, m)
        forward = _attention_forward
    else:
        module.__dict__["_afinar_previous"] = module.__dict__.get("forward")  # torch_fast's, or none
        forward = _mlp_forward
    module.__dict__["_afinar_group"] = group
    module.forward = types.MethodType(forward, module)


def fuse_lora(model, compile: bool = True) -> dict:
    """Route the LoRA layers, q/k/v projections and SwiGLU MLPs of a PEFT LoRA model through fused Functions.

    Only where it is PEFT's function exactly: LoRA dropout 0, one active plain LoRA adapter (no
    DoRA, no LoRA bias; rsLoRA only changes the scale, read from PEFT's `scaling`), frozen
    nn.Linear or bitsandbytes 4-bit base layers, and Llama / Mistral / Qwen2 attention and MLP
    modules running transformers' own forward. Everything else keeps its forward (a debug line
    says why). Also routes those models' rotary embedding through `Rotary`.
    `compile=False` keeps the pointwise functions eager (CPU tests of the math); on CUDA they are
    compiled. Returns counts: {"linear", "attention", "mlp", "rotary": patched, "skipped": {reason: n}}.
    """
    unfuse_lora(model)
    counts: dict = {"linear": 0, "attention": 0, "mlp": 0, "rotary": 0}
    skipped: Counter = Counter()

    def skip(kind, name, why):
        skipped[f"{kind}: {why}"] += 1
        log.debug("fuse_lora: %s left alone: %s", name, why)

    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
            if (why := _lora_problem(module)) is not None:
                skip("linear", name, why)
                continue
            module.__dict__["_afinar_group"] = _Group.single(module)
            module.forward = types.MethodType(_projection_forward, module)
            counts["linear"] += 1

    functions = None  # compiled on first use: a model without LoRA in its blocks compiles nothing
    for name, module in model.named_modules():
        if (kind := _block_kind(module)) is None:
            continue
        if (why := _block_problem(module, kind)) is not None:
            skip(kind, name, why)
            continue
        functions = functions or pointwise(next(model.parameters()).device, compile)
        _patch_block(module, kind, functions)
        counts[kind] += 1
        if kind == "attention":
            counts["rotary"] += _hold_rotary(module, functions[2])
    counts["skipped"] = dict(skipped)
    return counts


def unfuse_lora(model) -> None:
    """Undo `fuse_lora`: every module runs the forward it had before (benchmarks measure each lever alone)."""
    for module in model.modules():
        d = module.__dict__
        if "_afinar_group" not in d:
            continue
        if getattr(d.get("forward"), "__func__", None) in _FORWARDS:
            previous = d.get("_afinar_previous")
            if previous is not None:
                d["forward"] = previous
            else:
                d.pop("forward")
        for attr in ("_afinar_group", "_afinar_ready", "_afinar_previous"):
            d.pop(attr, None)
        if (name := d.pop("_afinar_rotary", None)) is not None:
            _release_rotary(name)
