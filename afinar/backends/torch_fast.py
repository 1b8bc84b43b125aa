"""Fused pointwise ops for training on CUDA: RMSNorm and the SwiGLU activation, same math as HF.

In eager PyTorch a Llama/Mistral RMSNorm is six kernels over fp32 copies of the hidden state
and `silu(gate) * up` is two, and autograd keeps every intermediate for backward. On a 7B
model these memory-bound kernels cost a large share of a step beside the matmuls. Routing
the modules' forwards through `torch.compile`d functions makes each one kernel forward and
one backward, and autograd keeps only their inputs. The functions are the HF formulas
verbatim, so eager (CPU) and compiled (CUDA) runs compute the same thing;
tests/test_fast_paths.py checks loss and gradients against the unpatched model.
"""

from __future__ import annotations

import functools
import inspect
import logging
import textwrap
import types

import torch
import torch.nn.functional as F

log = logging.getLogger("afinar")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """MistralRMSNorm / LlamaRMSNorm.forward: normalise in fp32, scale in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _norm_forward(self, x):
    return self._afinar_norm(x, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(self._afinar_act(self.gate_proj(x), self.up_proj(x)))


# h5: a module is patched only when its forward is, line for line, the HF Llama one the fused
# function replaces (Mistral, Qwen2/3, Granite... copy it). A different forward (Gemma's 1 + w norm,
# Falcon-H1's MLP multipliers, a clamp in a newer MLP) would silently lose its extra terms.
@functools.cache
def _source(function) -> str:
    try:
        return textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):  # no source (compiled, or defined at a prompt): never the same
        return f"<no source for {function!r}>"


def _runs_forward_of(module, reference: type) -> bool:
    forward = type(module).forward
    return forward is reference.forward or _source(forward) == _source(reference.forward)


def _is_rms_norm(module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _runs_forward_of(module, LlamaRMSNorm) and getattr(module, "weight", None) is not None \
        and module.weight.ndim == 1


def _is_swiglu_mlp(module) -> bool:
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    act = getattr(module, "act_fn", None)
    return _runs_forward_of(module, LlamaMLP) and isinstance(act, (SiLUActivation, torch.nn.SiLU)) \
        and type(act).forward in (SiLUActivation.forward, torch.nn.SiLU.forward)


def compiled(fn, device: torch.device, *probe, backward: bool = True):
    """`torch.compile(fn)` once it has run (forward and backward) on `device`; `fn` if compiling fails.

    `probe`: shapes of bf16 tensor arguments, or plain values passed as they are.
    """
    try:
        fast = torch.compile(fn, dynamic=True)
        args = [torch.randn(p, device=device, dtype=torch.bfloat16, requires_grad=backward) if isinstance(p, tuple)
                else p for p in probe]
        out = fast(*args)
        if backward:
            out.float().sum().backward()
        return fast
    except Exception as e:  # no compiler on this machine, an unsupported GPU: stay correct, just slower
        log.warning("torch.compile of %s failed (%s: %s); using eager ops", fn.__name__, type(e).__name__, str(e)[:200])
        return fn


def fuse_pointwise(model, compile: bool = True) -> int:
    """Route every RMSNorm and SwiGLU MLP of `model` through the fused functions; returns modules patched.

    `compile=False` patches with the eager functions (CPU tests of the math).
    """
    device = next(model.parameters()).device
    norm, act = rms_norm, swiglu
    if compile:
        eps = next((m.variance_epsilon for m in model.modules() if _is_rms_norm(m)), 1e-6)
        norm = compiled(rms_norm, device, (2, 8, 64), (64,), eps)
        act = compiled(swiglu, device, (2, 8, 64), (2, 8, 64))
    patched = 0
    for module in model.modules():
        if _is_rms_norm(module):
            module._afinar_norm = norm
            module.forward = types.MethodType(_norm_forward, module)
            patched += 1
        elif _is_swiglu_mlp(module):
            module._afinar_act = act
            module.forward = types.MethodType(_mlp_forward, module)
            patched += 1
        elif hasattr(module, "variance_epsilon") or hasattr(module, "gate_proj"):  # h5: looks alike, computes otherwise
            log.debug("fuse_pointwise: %s left alone (its forward is not the HF Llama one)", type(module).__name__)
    return patched


def unfuse(model) -> None:
    """Undo `fuse_pointwise` (benchmarks measure each lever alone)."""
    for module in model.modules():
        d = module.__dict__
        if "_afinar_norm" in d or "_afinar_act" in d:
            for attr in ("forward", "_afinar_norm", "_afinar_act"):
                d.pop(attr, None)
