"""Static-cache decoding for merged Llama/Mistral/Qwen2 models, one CUDA graph per decode step.

`transformers.generate` spends most of a decode step in Python: on an H200 a merged 7B model
decodes ~23 tokens/s with it, where reading the weights once per token allows ~300. Here the
KV cache is a set of preallocated tensors and a decode step has fixed shapes and addresses,
so on CUDA it is captured once as a CUDA graph and each token costs one graph replay. The
layers are the model's own modules (norms, projections, MLP, rotary embedding); only the
attention over the static cache is written here. On CPU the same code runs without graphs:
tests/test_fast_paths.py checks its greedy tokens equal `generate` on the unmerged adapter.

`DecoderStack` is the layer-by-layer model; the serving engine's runner (afinar/engine/
torch_runner.py) drives it over per-row KV slots. `StaticDecoder` is the earlier whole-batch
decoder, kept for `serve.engine=static`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F

from afinar.backends.torch_fast import _is_rms_norm, _is_swiglu_mlp, compiled, rms_norm, swiglu

SUPPORTED = {"llama", "mistral", "qwen2"}  # same decoder layer: pre-norm, RoPE, GQA, SwiGLU MLP
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def supported(model) -> bool:
    """A merged (plain nn.Linear) decoder of a family this module knows."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED or not hasattr(model, "model"):
        return False
    layers = getattr(model.model, "layers", None)
    if not layers or not hasattr(model.model, "rotary_emb"):
        return False
    return all(type(getattr(layer.self_attn, p, None)) is torch.nn.Linear for layer in layers for p in _PROJECTIONS) \
        and all(_is_rms_norm(n) for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)) \
        and all(_is_swiglu_mlp(layer.mlp) and type(layer.mlp.gate_proj) is torch.nn.Linear for layer in layers)


def _fuse_linears(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for Linear layers that read the same input: one matmul instead of several.

    Each layer's weight becomes a view of the fused tensor, so no second copy stays in memory
    and the modules keep working for everything else (transformers' generate). `_unfuse`
    undoes it before a state dict is saved.
    """
    first = linears[0]
    if getattr(first, "_afinar_fused", None) is not None and _shared(linears):
        return first._afinar_fused
    with torch.inference_mode(False), torch.no_grad():
        fused = torch.cat([m.weight.data for m in linears])
        offset = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight.data = fused[offset:offset + rows]
            offset += rows
        bias = None
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=fused.dtype,
                                                                           device=fused.device) for m in linears])
    first._afinar_fused = (fused, bias)
    return first._afinar_fused


def _shared(linears: list[torch.nn.Linear]) -> bool:
    ptr = linears[0].weight.untyped_storage().data_ptr()
    return all(m.weight.untyped_storage().data_ptr() == ptr for m in linears[1:])


def _unfuse(linears: list[torch.nn.Linear]) -> None:
    with torch.inference_mode(False), torch.no_grad():
        if _shared(linears):
            for m in linears:
                m.weight.data = m.weight.data.clone()
    linears[0].__dict__.pop("_afinar_fused", None)


def _rope(q, k, cos, sin):
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _add_rms_norm(h, delta, weight, eps: float):
    h = h + delta
    return h, rms_norm(h, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _bucket(n: int, steps: tuple[int, ...]) -> int:
    return next((s for s in steps if s >= n), -(-n // steps[-1]) * steps[-1])


class DecoderStack:
    """A supported model's decoder run layer by layer, for callers that own the KV cache.

    The model's own modules do the work (embedding, norms, projections, rotary embedding, MLP,
    LM head); q/k/v and gate/up are fused into one matmul each (`_fuse_linears`). `forward`
    takes a `write(layer, k, v)` callback that stores the new keys and values wherever the
    caller keeps them and returns the keys and values to attend to. With `compile_ops`
    (CUDA) each norm, rotary and activation is one compiled kernel.
    """

    def __init__(self, model, compile_ops: bool = False):
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        config = model.config
        attn = self.layers[0].self_attn
        self.head_dim = self.head_dim_of(model)
        self.n_kv = config.num_key_value_heads
        self.scale = getattr(attn, "scaling", self.head_dim**-0.5)
        window = getattr(config, "sliding_window", None)
        uses_window = config.model_type == "mistral" or getattr(config, "use_sliding_window", False)
        self.window = window if uses_window else None
        weight = self.model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.qkv = [_fuse_linears([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                    for layer in self.layers]
        self.gate_up = [_fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in self.layers]
        self.q_size = self.layers[0].self_attn.q_proj.out_features
        self.kv_size = self.layers[0].self_attn.k_proj.out_features
        self.ffn = self.layers[0].mlp.gate_proj.out_features
        self.eps = self.layers[0].input_layernorm.variance_epsilon
        self.norm, self.add_norm, self.rope, self.act = rms_norm, _add_rms_norm, _rope, swiglu
        if compile_ops:
            # Inside a CUDA graph launches are free, but every small kernel still costs a few
            # microseconds of GPU time: fuse each norm, rotary and activation into one kernel.
            h = self.inner.config.hidden_size
            self.norm = compiled(rms_norm, self.device, (1, 1, h), (h,), self.eps, backward=False)
            self.add_norm = compiled(_add_rms_norm, self.device, (1, 1, h), (1, 1, h), (h,), self.eps, backward=False)
            self.act = compiled(swiglu, self.device, (1, 1, self.ffn), (1, 1, self.ffn), backward=False)
            d = self.head_dim
            self.rope = compiled(_rope, self.device, (1, 4, 1, d), (1, 2, 1, d), (1, 1, 1, d), (1, 1, 1, d), backward=False)

    @staticmethod
    def head_dim_of(model) -> int:
        config, attn = model.config, model.model.layers[0].self_attn
        return getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def unfuse(self) -> None:
        """Give every layer its own weight storage again (see `unfuse`)."""
        unfuse(self.model)
        self.qkv = self.gate_up = None

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, write, attend=None) -> torch.Tensor:
        """The decoder on token `ids` [b, t] at `positions` [b, t]; returns the final-normed hidden states.

        `attend(q, keys, values, mask)` replaces `self.attend` (the engine's per-row CPU mode).
        """
        attend = attend or self.attend
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        b, t, _ = h.shape
        x = self.norm(h, self.layers[0].input_layernorm.weight, self.eps)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = F.linear(x, *self.qkv[i]).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
            k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
            v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            keys, values = write(i, k, v)
            h, x = self.add_norm(h, a.o_proj(attend(q, keys, values, mask)), layer.post_attention_layernorm.weight,
                                 self.eps)
            gate, up = F.linear(x, *self.gate_up[i]).split((self.ffn, self.ffn), dim=-1)
            after = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.inner.norm
            h, x = self.add_norm(h, layer.mlp.down_proj(self.act(gate, up)), after.weight, self.eps)
        return x

    def attend(self, q, keys, values, mask):
        b, heads, t, d = q.shape
        kv = keys.shape[1]
        if t == 1:
            # One query per head: the heads sharing a KV head become that head's query rows,
            # plain multi-head attention that the fused kernels take (GQA falls back to math).
            o = F.scaled_dot_product_attention(q.reshape(b, kv, heads // kv, d), keys, values, attn_mask=mask,
                                               scale=self.scale)
            return o.reshape(b, 1, heads * d)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o.transpose(1, 2).reshape(b, t, -1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h).float()


def unfuse(model) -> None:
    """Give every fused q/k/v and gate/up group of `model` its own weight storage again.

    Serialisers treat views of one storage as tied weights and keep only one of them: call
    this before saving the model's state dict. A decoder re-fuses on its next construction.
    """
    for module in model.modules():
        if hasattr(module, "self_attn") and hasattr(module, "mlp"):
            a, m = module.self_attn, module.mlp
            if all(hasattr(a, p) for p in ("q_proj", "k_proj", "v_proj")):
                _unfuse([a.q_proj, a.k_proj, a.v_proj])
            if hasattr(m, "gate_proj") and hasattr(m, "up_proj"):
                _unfuse([m.gate_proj, m.up_proj])


class _Slot:
    """A static KV cache for `batch` rows of `length` positions, and its captured decode step."""

    def __init__(self, decoder: "StaticDecoder", batch: int, length: int):
        d, dev, dtype = decoder.stack, decoder.device, decoder.dtype
        shape = (batch, d.n_kv, length, d.head_dim)
        self.k = [torch.zeros(shape, device=dev, dtype=dtype) for _ in d.layers]
        self.v = [torch.zeros(shape, device=dev, dtype=dtype) for _ in d.layers]
        self.token = torch.zeros((batch, 1), device=dev, dtype=torch.long)
        self.pos = torch.zeros(batch, device=dev, dtype=torch.long)
        self.rows = torch.arange(batch, device=dev)
        self.keys = torch.arange(length, device=dev)
        self.graph = None
        self.logits = None


class StaticDecoder:
    """Whole-batch greedy or sampled decoding (`serve.engine=static` on CUDA); mirrors the old TorchBackend.generate.

    The continuous-batching engine (afinar/engine/torch_runner.py) runs the same `DecoderStack`.
    """

    def __init__(self, model, use_graphs: bool | None = None, max_slots: int = 4):
        self.model = model
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.stack = DecoderStack(model, compile_ops=self.use_graphs)
        self.window = self.stack.window
        self.max_slots = max_slots
        self.slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()

    @property
    def qkv(self):
        return self.stack.qkv

    def unfuse(self) -> None:
        """Give every layer its own weight storage again (the decoder then re-fuses on next use)."""
        self.stack.unfuse()
        self.slots.clear()

    def fits(self, prompts: list[list[int]], max_new_tokens: int) -> bool:
        """Whether these lengths stay inside the sliding window (beyond it this decoder would differ)."""
        return self.window is None or max(len(p) for p in prompts) + max_new_tokens <= self.window

    def _prefill(self, slot: _Slot, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts, fill cache positions [0, width); logits after each prompt's last token."""
        b, width = ids.shape
        j = torch.arange(width, device=self.device)
        causal = j[None, :] <= j[:, None]
        mask = (causal[None] & (j[None, None, :] < lengths[:, None, None]))[:, None]

        def write(i, k, v):
            slot.k[i][:, :, :width] = k
            slot.v[i][:, :, :width] = v
            return k, v

        h = self.stack.forward(ids, j.expand(b, width), mask, write)
        return self.stack.logits(h[slot.rows, lengths - 1])

    def _step(self, slot: _Slot) -> torch.Tensor:
        """One token per row at position `slot.pos`: fixed shapes, so it can be captured."""
        pos = slot.pos
        mask = (slot.keys[None, :] <= pos[:, None])[:, None, None, :]

        def write(i, k, v):
            slot.k[i][slot.rows, :, pos] = k[:, :, 0]
            slot.v[i][slot.rows, :, pos] = v[:, :, 0]
            return slot.k[i], slot.v[i]

        h = self.stack.forward(slot.token, pos[:, None], mask, write)
        return self.stack.logits(h[:, -1])

    def _decode(self, slot: _Slot) -> torch.Tensor:
        if not self.use_graphs:
            return self._step(slot)
        if slot.graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture (allocator, cuBLAS handles)
                for _ in range(2):
                    self._step(slot)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                slot.logits = self._step(slot)
            slot.graph = graph
        slot.graph.replay()
        return slot.logits

    def _slot(self, batch: int, length: int) -> _Slot:
        key = (batch, length)
        if key in self.slots:
            self.slots.move_to_end(key)
            return self.slots[key]
        while len(self.slots) >= self.max_slots:
            self.slots.popitem(last=False)
        self.slots[key] = _Slot(self, batch, length)
        return self.slots[key]

    # ------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, on_token: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[int], bool] | None = None) -> list[list[int]]:
        n = len(prompts)
        # Few distinct shapes, so few graphs: batch rounded up (spare rows repeat row 0), length to 256.
        batch = _bucket(n, (1, 2, 4, 8, 16, 32, 64)) if self.use_graphs else n
        rows = prompts + [prompts[0]] * (batch - n)
        lengths = [len(p) for p in rows]
        width = max(lengths)
        slot = self._slot(batch, _bucket(width + max_new_tokens, (256,)) if self.use_graphs else width + max_new_tokens)
        ids = torch.tensor([p + [eos] * (width - len(p)) for p in rows], device=self.device)
        lengths_t = torch.tensor(lengths, device=self.device)
        logits = self._prefill(slot, ids, lengths_t)
        slot.pos.copy_(lengths_t)
        generator = torch.Generator(device=self.device).manual_seed(seed) if temperature > 0 else None
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        for step in range(max_new_tokens):
            chosen = _choose(logits, temperature, top_p, generator)
            for row, token in enumerate(chosen[:n].tolist()):
                if done[row]:
                    continue
                if token == eos:
                    done[row] = True
                    continue
                out[row].append(token)
                if on_token is not None:
                    on_token(row, token)
                if should_stop is not None and should_stop(row):
                    done[row] = True
            if all(done) or step == max_new_tokens - 1:
                break
            slot.token.copy_(chosen[:, None])
            logits = self._decode(slot)
            slot.pos.add_(1)
        return out


def _choose(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Greedy (temperature 0) or nucleus sampling, as transformers' TopPLogitsWarper keeps tokens."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
