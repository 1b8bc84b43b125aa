"""The math of afinar's fused LoRA layers (torch_lora_fused.py patches models to use it).

For a frozen base weight W (bitsandbytes 4-bit, dequantized on the fly, or dense), LoRA A (r x in),
B (out x r) and scale s, one autograd Function computes

    y  = x W^T (+ b) + s (x A^T) B^T          the update added by the GEMM itself (addmm_)
    dx = dy W + s (dy B) A,   dA = s (dy B)^T x,   dB = s dy^T (x A^T)

with W dequantized again in backward, never kept: autograd keeps x and the small x A^T.
`Projections` runs the projections of one input (o_proj alone, or q/k/v adding their input
gradients into one buffer); `SwiGLU` runs a whole Llama-style MLP and keeps gate(x) and up(x)
only, recomputing the activation in backward; `Rotary` is transformers' rotary embedding with a
hand-written backward. The design follows Unsloth (unslothai/unsloth: unsloth/kernels/fast_lora.py,
LoRA_W, LoRA_QKV and LoRA_MLP; matmul_lora and fast_dequantize in unsloth/kernels/utils.py); the
code is our own, on bitsandbytes' public `dequantize_4bit`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb after its unsqueeze: `(x * cos) + (rotate_half(x) * sin)` for q and k."""
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def rope_backward(dq, dk, cos, sin):
    """Gradients of `rope` for q and k: dx = dy cos - rotate_half(dy sin) (rotate_half^T = -rotate_half)."""
    return dq * cos - _rotate_half(dq * sin), dk * cos - _rotate_half(dk * sin)


class Rotary(torch.autograd.Function):
    """`rope` with its own backward: one pointwise call each way (compiled on CUDA) instead of ~16 eager
    kernels and autograd nodes per layer; keeps only cos and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, functions):
        ctx.save_for_backward(cos, sin)
        ctx.rope_backward = functions[1]
        return functions[0](q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return (*ctx.rope_backward(dq, dk, cos, sin), None, None, None)


class Plan:
    """What a fused call needs beside its tensors: base layers, LoRA scales, compute dtype, activation."""

    __slots__ = ("layers", "scales", "dtype", "act", "act_backward", "lora_dtypes")

    def __init__(self, layers, scales, dtype, lora_dtypes, act=None, act_backward=None):
        self.layers, self.scales, self.dtype, self.lora_dtypes = layers, scales, dtype, lora_dtypes
        self.act, self.act_backward = act, act_backward


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def _cast_grads(grads, plan):
    return tuple(None if g is None else g.to(t) for g, t in zip(grads, plan.lora_dtypes))


class Projections(torch.autograd.Function):
    """y_i = x W_i^T (+ b_i) + s_i (x A_i^T) B_i^T for projections of one input: o_proj alone, or q/k/v.

    Arguments after the plan: A_1, B_1, A_2, B_2, ... (None for a projection without LoRA).
    """

    @staticmethod
    def forward(ctx, x, plan: Plan, *lora):
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


class SwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), each projection with its LoRA (or none); keeps x, gate(x), up(x).

    Arguments after the plan: A and B of gate, up, down (None where a projection has no LoRA).
    """

    @staticmethod
    def forward(ctx, x, plan: Plan, *lora):
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


def pointwise(device, compile: bool):
    """(swiglu, swiglu_backward, (rope, rope_backward)): compiled on `device`, or eager.

    Each runs inside an autograd Function, so each is compiled without a graph of its own: one
    kernel and a cheap call (an autograd-compiled function costs ~0.2-0.4 ms of CPU per call on
    the H200 machine, docs/PERFORMANCE.md), where eager would launch several kernels.
    """
    if not compile:
        return swiglu, swiglu_backward, (rope, rope_backward)
    from afinar.backends.torch_fast import compiled

    def heads(n):  # q/k as attention sees them: (batch, heads, seq, dim) views of (batch, seq, heads, dim)
        return torch.randn(2, 8, n, 16, device=device, dtype=torch.bfloat16).transpose(1, 2)

    cos, sin = (torch.randn(2, 1, 8, 16, device=device, dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        return (compiled(swiglu, device, (16, 64), (16, 64), backward=False),
                compiled(swiglu_backward, device, (16, 64), (16, 64), (16, 64), backward=False),
                (compiled(rope, device, heads(4), heads(2), cos, sin, backward=False),
                 compiled(rope_backward, device, heads(4), heads(2), cos, sin, backward=False)))
