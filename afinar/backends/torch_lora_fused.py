"""Fused LoRA layers for training: the frozen base matmul and the LoRA update in one autograd Function.

PEFT runs a LoRA linear as `base(x) + lora_B(lora_A(dropout(x))) * s`: the base matmul (4-bit
weights dequantized by bitsandbytes), two small matmuls, a scale, a clone and an add forward,
as many again backward plus an add of the two input gradients; each is a kernel launch, a pass
over the output and Python overhead. On a 7B QLoRA step these cost about a quarter of the time
(benchmarks/results/2026-11-29-h200-profile-afinar-auto.txt). Here one Function computes

    y  = x W^T (+ b) + s (x A^T) B^T          the update added by the GEMM itself (addmm_)
    dx = dy W + s (dy B) A,   dA = s (dy B)^T x,   dB = s dy^T (x A^T)

with W dequantized again in backward, never kept: autograd keeps x and the small x A^T. The
q/k/v projections of one input run as one Function that adds their input gradients into one
buffer; the SwiGLU MLP keeps gate(x) and up(x) only and recomputes the activation in backward.

The design follows Unsloth (unslothai/unsloth: unsloth/kernels/fast_lora.py, LoRA_W, LoRA_QKV
and LoRA_MLP; matmul_lora and fast_dequantize in unsloth/kernels/utils.py); the code is our own,
on bitsandbytes' public `dequantize_4bit`. `fuse_lora` patches a model only where this is
PEFT's function exactly; tests/test_lora_fused.py checks loss and every LoRA gradient against
plain PEFT on Llama, Mistral and Qwen2, NF4 and dense.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types
from collections import Counter

import torch
import torch.nn.functional as F

log = logging.getLogger("afinar")

ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}

# ------------------------------------------------------------ the math


def _weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight (out x in) in `dtype`; a bitsandbytes 4-bit one dequantized into a temporary."""
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        return layer.weight.to(dtype)
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(layer.weight.data, state).to(dtype)


def _project(x, layer, A, B, s: float, dtype):
    """(x W^T (+ b) + s (x A^T) B^T, x A^T) for 2-D `x`; A, B in `dtype`, or None without LoRA."""
    W = _weight(layer, dtype)
    y = x @ W.t() if layer.bias is None else torch.addmm(layer.bias.to(dtype), x, W.t())
    del W
    if A is None:
        return y, None
    xa = x @ A.t()
    y.addmm_(xa, B.t(), alpha=s)
    return y, xa


def _lora_ab(g, dy, x, xa, s: float):
    """(dA, dB) of one LoRA update from g = s dy B: dA = g^T x, dB = s dy^T (x A^T)."""
    return g.t() @ x, dy.t() @ (xa * s)


def _input_grad(dx, dy, layer, g, A, dtype):
    """dx + dy W + g A (a new tensor when dx is None), W dequantized again and dropped."""
    W = _weight(layer, dtype)
    dx = dy @ W if dx is None else dx.addmm_(dy, W)
    del W
    if g is not None:
        dx.addmm_(g, A)
    return dx


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """LlamaMLP / MistralMLP / Qwen2MLP: act_fn(gate_proj(x)) * up_proj(x) with act_fn = SiLU."""
    return F.silu(gate) * up


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(h, d gate, d up) of h = silu(gate) * up; h is recomputed (forward did not keep it)."""
    e = gate.float()
    sig = torch.sigmoid(e)
    dhf = dh.float()
    d_up = dhf * (e * sig)
    d_gate = dhf * up.float() * sig * (1 + e * (1 - sig))  # silu'(e) = s (1 + e (1 - s))
    return swiglu(gate, up), d_gate.to(dh.dtype), d_up.to(dh.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `(x * cos) + (rotate_half(x) * sin)` for one of q / k."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


class _Plan:
    """What a fused call needs beside its tensors: base layers, LoRA scales, compute dtype, activation."""

    __slots__ = ("layers", "scales", "dtype", "act", "act_backward", "lora_dtypes")

    def __init__(self, layers, scales, dtype, lora_dtypes, act=None, act_backward=None):
        self.layers, self.scales, self.dtype, self.lora_dtypes = layers, scales, dtype, lora_dtypes
        self.act, self.act_backward = act, act_backward


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def _cast_grads(grads, plan):
    return tuple(None if g is None else g.to(t) for g, t in zip(grads, plan.lora_dtypes))


class _Projections(torch.autograd.Function):
    """y_i = x W_i^T (+ b_i) + s_i (x A_i^T) B_i^T for projections of one input: o_proj alone, or q/k/v.

    Arguments after the plan: A_1, B_1, A_2, B_2, ... (None for a projection without LoRA).
    """

    @staticmethod
    def forward(ctx, x, plan: _Plan, *lora):
        dtype = plan.dtype
        x2 = _flat(x).to(dtype)
        low = [None if t is None else t.to(dtype) for t in lora]
        outs, xas = [], []
        for i, layer in enumerate(plan.layers):
            y, xa = _project(x2, layer, low[2 * i], low[2 * i + 1], plan.scales[i], dtype)
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
            xas.append(xa)
        ctx.plan, ctx.x_shape, ctx.x_dtype = plan, x.shape, x.dtype
        ctx.save_for_backward(x2, *low, *xas)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        plan, n = ctx.plan, len(ctx.plan.layers)
        x2, *rest = ctx.saved_tensors
        low, xas = rest[: 2 * n], rest[2 * n:]
        dx, grads = None, []
        for i, layer in enumerate(plan.layers):
            A, B, s = low[2 * i], low[2 * i + 1], plan.scales[i]
            dy = _flat(dys[i]).to(plan.dtype)
            g = (dy @ B).mul_(s) if A is not None else None
            grads += _lora_ab(g, dy, x2, xas[i], s) if g is not None else (None, None)
            if ctx.needs_input_grad[0]:
                dx = _input_grad(dx, dy, layer, g, A, plan.dtype)
        dx = None if dx is None else dx.view(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, *_cast_grads(grads, plan))


class _SwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), each projection with its LoRA (or none); keeps x, gate(x), up(x).

    Arguments after the plan: A and B of gate, up, down (None where a projection has no LoRA).
    """

    @staticmethod
    def forward(ctx, x, plan: _Plan, *lora):
        dtype = plan.dtype
        gate, up, down = plan.layers
        x2 = _flat(x).to(dtype)
        low = [None if t is None else t.to(dtype) for t in lora]
        e, xa_gate = _project(x2, gate, low[0], low[1], plan.scales[0], dtype)
        u, xa_up = _project(x2, up, low[2], low[3], plan.scales[1], dtype)
        y, ha = _project(plan.act(e, u), down, low[4], low[5], plan.scales[2], dtype)
        ctx.plan, ctx.x_shape, ctx.x_dtype = plan, x.shape, x.dtype
        ctx.save_for_backward(x2, e, u, *low, xa_gate, xa_up, ha)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        plan, dtype = ctx.plan, ctx.plan.dtype
        gate, up, down = plan.layers
        x2, e, u, *low, xa_gate, xa_up, ha = ctx.saved_tensors
        s_gate, s_up, s_down = plan.scales
        dy = _flat(dy).to(dtype)
        # down: its input gradient first; its LoRA gradient needs h, which the activation's backward recomputes
        g = (dy @ low[5]).mul_(s_down) if low[4] is not None else None
        h, de, du = plan.act_backward(_input_grad(None, dy, down, g, low[4], dtype), e, u)
        grads_down = _lora_ab(g, dy, h, ha, s_down) if g is not None else (None, None)
        del h
        grads, dx = [], None
        for layer, A, B, s, xa, d in ((gate, low[0], low[1], s_gate, xa_gate, de), (up, low[2], low[3], s_up, xa_up, du)):
            g = (d @ B).mul_(s) if A is not None else None
            grads += _lora_ab(g, d, x2, xa, s) if g is not None else (None, None)
            if ctx.needs_input_grad[0]:
                dx = _input_grad(dx, d, layer, g, A, dtype)
        dx = None if dx is None else dx.view(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, *_cast_grads((*grads, *grads_down), plan))


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
        plan = _Plan(layers, scales, dtype, [None if t is None else t.dtype for t in lora], self.act, self.act_backward)
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
        if group is not None and (out := group.run(_Projections, x)) is not None:
            return out[0]
    return type(self).forward(self, x, *args, **kwargs)


def _attention_forward(self, *args, **kwargs):
    """transformers' own attention forward, with q/k/v computed before it by one fused Function.

    The HF forward calls q_proj / k_proj / v_proj on its `hidden_states`: each finds its output
    ready (`_projection_forward`) for exactly that tensor, so rotary, cache and attention stay HF's.
    """
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    group = self._afinar_group
    outs = group.run(_Projections, x)
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
    out = self._afinar_group.run(_SwiGLU, x)
    if out is not None:
        return out
    previous = self.__dict__.get("_afinar_previous")
    return previous(x) if previous is not None else type(self).forward(self, x)


_FORWARDS = (_projection_forward, _attention_forward, _mlp_forward)
_ROTARY: dict[str, list] = {}  # transformers modeling module -> [its apply_rotary_pos_emb, models using ours]


def _hold_rotary(module, function) -> bool:
    """Route the modeling module's apply_rotary_pos_emb through `rope` (refcounted); False if not HF's formula."""
    name = type(module).__module__
    if name not in _ROTARY:
        mod = importlib.import_module(name)
        original = getattr(mod, "apply_rotary_pos_emb", None)
        if original is None or not _source_has(original, *ROTARY_LINES) \
                or not _source_has(getattr(mod, "rotate_half", None), "torch.cat((-x2, x1), dim=-1)"):
            return False

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            return function(q, cos, sin), function(k, cos, sin)

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


def _pointwise(device, compile: bool):
    """(swiglu, swiglu_backward, rope): compiled on `device` (one kernel each), or eager."""
    if not compile:
        return swiglu, swiglu_backward, rope
    from afinar.backends.torch_fast import compiled

    with torch.no_grad():  # the activation runs inside autograd Functions: no graph of its own
        act = compiled(swiglu, device, (16, 64), (16, 64), backward=False)
        act_backward = compiled(swiglu_backward, device, (16, 64), (16, 64), (16, 64), backward=False)
    q = torch.randn(2, 4, 8, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (torch.randn(2, 1, 8, 16, device=device, dtype=torch.bfloat16) for _ in range(2))
    return act, act_backward, compiled(rope, device, q, cos, sin)


def fuse_lora(model, compile: bool = True) -> dict:
    """Route the LoRA layers, q/k/v projections and SwiGLU MLPs of a PEFT LoRA model through fused Functions.

    Only where it is PEFT's function exactly: LoRA dropout 0, one active plain LoRA adapter (no
    DoRA, no LoRA bias), frozen nn.Linear or bitsandbytes 4-bit base layers, and Llama / Mistral /
    Qwen2 attention and MLP modules running transformers' own forward. Everything else keeps its
    forward (a debug line says why). Also routes those models' rotary embedding through `rope`.
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

    pointwise = None
    for name, module in model.named_modules():
        if isinstance(module, _known("Attention")):
            kind, names, ok = "attention", ["q_proj", "k_proj", "v_proj"], _own_forward(module, *ATTENTION_LINES)
        elif isinstance(module, _known("MLP")):
            kind, names = "mlp", ["gate_proj", "up_proj", "down_proj"]
            ok = _mlp_forward_known(module) and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
        else:
            continue
        if not ok:
            skip(kind, name, f"{type(module).__name__} forward is not the one fused here")
            continue
        members = [getattr(module, n) for n in names]
        why = next((f"{n}: {w}" for n, m in zip(names, members)
                    if (w := (None if "_afinar_group" in m.__dict__ else
                              _lora_problem(m) if hasattr(m, "lora_A") else _base_problem(m))) is not None), None)
        if why is None and not any(hasattr(m, "lora_A") for m in members):
            why = "no LoRA layer in it"
        if why is not None:
            skip(kind, name, why)
            continue
        if pointwise is None:
            pointwise = _pointwise(next(model.parameters()).device, compile)
        group = _Group(module, names, *pointwise[:2])
        if kind == "attention":
            for m in members:
                m.__dict__.setdefault("_afinar_group", None)  # plain base layers: take the ready output only
                m.forward = types.MethodType(_projection_forward, m)
            module.__dict__["_afinar_group"] = group
            module.forward = types.MethodType(_attention_forward, module)
            counts["rotary"] += _hold_rotary(module, pointwise[2])
        else:
            module.__dict__["_afinar_previous"] = module.__dict__.get("forward")
            module.__dict__["_afinar_group"] = group
            module.forward = types.MethodType(_mlp_forward, module)
        counts[kind] += 1
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
