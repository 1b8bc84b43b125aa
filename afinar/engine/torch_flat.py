"""The torch runner that runs prefill chunks and decode rows as one forward (merged Llama/Mistral/Qwen2).

`torch_runner.TorchRunner` runs a step as two forwards: the prompt chunks (eager), then one decode
token per row (a CUDA graph) attending to the *longest* row's key bucket. Under serving traffic
both cost: every new prompt reads the weights a second time in a forward launched op by op, and
one long request makes all rows read its key length. Here a step is one list of tokens: one per
decoding row (slots [0, B)), then the prompt chunks the `PrefillQueue` hands out (at most
`serve.prefill_chunk` tokens, packed without padding). The matmuls read the weights once for all
of them, and attention (`torch_varlen`) gives every row its own key length. On CUDA each
(B rows, P prompt tokens) shape is a CUDA graph captured at start-up, twice: with top-p
sampling, and greedy only (an argmax; the sampling path sorts the vocabulary of every row,
~6% of a 32-row step, for nothing when no row samples). A step is a copy of its metadata to
the device and one replay, and step k+1 is launched before step k's tokens are read, as in
the slot runner.

Per step the host packs into one pinned int64 buffer what only it knows (the prompt tokens,
their positions and cache addresses, the chunk boundaries, which rows decode, which rows
sample their first token); the device keeps each row's last token and position, so a decode
row needs nothing from the host. The KV cache of a layer is [rows x stride, kv heads, head dim]
(stride = max_len + 1: the last position of every row is scratch, where rows that are not
decoding write and nobody reads).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from afinar.backends.fast_decode import DecoderStack
from afinar.engine import torch_varlen
from afinar.engine.plan import RowError, bucket, powers_of_two
from afinar.engine.torch_rows import SlotRows
from afinar.engine.torch_sampling import choose, vocab_hashes

MAX_PREFILL_ROWS = 8  # prompts whose chunks share one step (fixed: it is part of a captured graph's shapes)
SPLIT_AFTER = 4  # serve.split_keys: split a decode step's keys once its longest row holds this many pieces


def prompt_sizes(chunk: int) -> tuple[int, ...]:
    """Captured prompt-token counts per step: 0, then 16, 32, 64, ... up to `chunk`."""
    return (0, *powers_of_two(min(16, chunk), chunk))


class FlatRunner(SlotRows):
    """`plan.Runner` over a `DecoderStack`, one forward a step; see the module docstring."""

    def __init__(self, model, max_rows: int, max_len: int, prefill_chunk: int,
                 use_graphs: bool | None = None, attention: str | None = None, pipeline: bool | None = None,
                 split_keys: int = 0):
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda if use_graphs is None else use_graphs
        self.stack = s = DecoderStack(model, compile_ops=self.use_graphs)
        limits = [max_len, getattr(model.config, "max_position_embeddings", None), s.window]
        self.max_len = min(x for x in limits if x)
        self.max_rows = max_rows
        self.chunk = min(prefill_chunk, self.max_len)
        self.row_sizes = powers_of_two(1, max_rows)
        self.prompt_sizes = prompt_sizes(self.chunk)
        heads = model.config.num_attention_heads
        if attention is None:
            attention = "flash" if torch_varlen.flash_works(self.device, self.dtype, heads, s.n_kv, s.head_dim) \
                else "reference"
        self.attention = getattr(torch_varlen, attention)
        # Split-key decode steps (torch_varlen.split_decode) when the longest decoding row holds more
        # than SPLIT_AFTER pieces of keys; 0: never. Checked against the reference first on CUDA.
        self.piece = split_keys if split_keys and (attention == "reference" or torch_varlen.split_works(
            self.device, self.dtype, heads, s.n_kv, s.head_dim, split_keys)) else 0
        self.attention_lse = torch_varlen.reference_lse if attention == "reference" else torch_varlen.flash_lse
        rows = self.row_sizes[-1]
        self.stride = self.max_len + 1
        dev = self.device
        shape = (rows * self.stride, s.n_kv, s.head_dim)
        self.k = [torch.zeros(shape, device=dev, dtype=self.dtype) for _ in s.layers]
        self.v = [torch.zeros(shape, device=dev, dtype=self.dtype) for _ in s.layers]
        self.token = torch.zeros(rows, device=dev, dtype=torch.long)
        self.pos = torch.zeros(rows, device=dev, dtype=torch.long)
        self._init_rows(rows, self.chunk, (rows,), pipeline)
        self.row_idx = torch.arange(rows + 1, device=dev)
        self.vocab_hash = vocab_hashes(weight.shape[0], dev)
        # The step's metadata, one buffer (one copy to the device a step); views name its parts.
        P, S = self.chunk, MAX_PREFILL_ROWS
        self._layout = {"ids": P, "pos": P, "dest": P, "cu_q": S + 1, "cu_k": S + 1, "used": S,
                        "decoding": rows, "first": rows, "first_pos": rows, "src": rows}
        self.meta = torch.zeros(sum(self._layout.values()), device=dev, dtype=torch.long)
        self.m = self._views(self.meta)
        self._host = [torch.zeros(self.meta.shape, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._host_views = [{k: v.numpy() for k, v in self._views(h).items()} for h in self._host]
        self._arange = np.arange(max(self.max_len + 1, rows), dtype=np.int64)
        self._keys = [0] * rows  # keys each decoding row attends at its next step (host side, for `piece`)

    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for name, n in self._layout.items():
            out[name] = buf[at:at + n]
            at += n
        return out

    # ------------------------------------------------ plan.Runner

    def remove(self, slot: int) -> None:
        self.handles[slot] = self.params[slot] = None
        self.prefill.remove(slot)
        self.decoding.discard(slot)

    @torch.inference_mode()
    def warm_up(self, say: Callable[[str], None]) -> None:
        """Run one step eagerly; on CUDA capture every (rows, prompt tokens) step as a CUDA graph."""
        self.meta.zero_()
        self._forward(1, 0)
        if not self.use_graphs:
            return
        shapes = [(b, p, sample, False) for b in self.row_sizes for p in self.prompt_sizes for sample in (True, False)]
        if self.piece:
            shapes += [(b, 0, sample, True) for b in self.row_sizes for sample in (True, False)]
        shapes.sort(reverse=True)
        say(f"capturing {len(shapes)} CUDA graphs (rows {list(self.row_sizes)} x prompt tokens "
            f"{list(self.prompt_sizes)} x sampling, greedy" + (", and split-key decode steps)" if self.piece else ")"))
        for shape in shapes:
            if self._graph(*shape) is None:
                break
        torch.cuda.synchronize()

    def _graph(self, b: int, p: int, sample: bool, split: bool = False):
        graph = self.graphs.get((b, p, sample, split))
        if graph is not None or not self.use_graphs:
            return graph
        # Warm-up runs execute: with no row decoding or starting, and every prompt token padding
        # (written to the scratch position), they change no row's state.
        saved = self.meta.clone()
        self.meta.zero_()
        self.m["dest"].fill_(self.max_len)
        try:
            return self._capture((b, p, sample, split), lambda: self._forward(b, p, None if sample else [], split))
        finally:
            self.meta.copy_(saved)

    # ------------------------------------------------ one step

    def _launch(self) -> tuple | None:
        chunks = self.prefill.next(flat=True, max_rows=MAX_PREFILL_ROWS)
        decoding = sorted(self.decoding)
        if not chunks and not decoding:
            return None
        starting = [c.slot for c in chunks if c.last]
        b = bucket(max(decoding + starting, default=0) + 1, self.row_sizes)
        p = bucket(sum(len(c.tokens) for c in chunks), self.prompt_sizes)
        host = self._host[self._launches % 2]
        m = self._host_views[self._launches % 2]  # numpy views of the pinned buffer: cheap element writes
        m["ids"][:] = 0
        m["pos"][:] = 0
        m["dest"][:] = self.max_len  # padding tokens: row 0's scratch position
        m["cu_q"][:] = 0
        m["cu_k"][:] = 0
        m["used"][:] = 0
        m["decoding"][:] = 0
        m["first"][:] = 0
        m["src"][:] = self._arange[:len(m["src"])]  # rows that neither decode nor start: any valid index
        at = 0
        for i, c in enumerate(chunks):
            n = len(c.tokens)
            m["ids"][at:at + n] = c.tokens
            m["pos"][at:at + n] = self._arange[c.start:c.start + n]
            m["dest"][at:at + n] = self._arange[c.start:c.start + n] + c.slot * self.stride
            at += n
            m["cu_q"][i + 1:] = at
            m["cu_k"][i] = c.slot * self.stride
            m["used"][i] = c.start + n
            if c.last:
                m["src"][c.slot] = b + at - 1  # its first token comes from its last prompt token
                m["first"][c.slot] = 1
                m["first_pos"][c.slot] = c.start + n
        m["decoding"][decoding] = 1
        self.meta.copy_(host, non_blocking=True)
        sampled = [s for s in decoding + starting if not self.params[s].greedy]
        for s in decoding:
            self._keys[s] += 1
        split = bool(self.piece) and not p and max(self._keys[s] for s in decoding) > SPLIT_AFTER * self.piece
        try:
            graph = self._graph(b, p, bool(sampled), split)
            if graph is not None:
                graph.replay()
            else:
                self._forward(b, p, sampled, split)
        except Exception as e:  # noqa: BLE001 - this step's rows fail (the engine resets the runner)
            raise RowError([self.handles[s] for s in decoding] + [self.handles[c.slot] for c in chunks], e) from e
        for c in chunks:
            if c.last:
                self.decoding.add(c.slot)
                self._keys[c.slot] = c.start + len(c.tokens)
        return self._read_back([(self.handles[s], s) for s in decoding + starting])

    # ------------------------------------------------ the forward

    def _forward(self, b: int, p: int, sampled: list[int] | None = None, split: bool = False) -> None:
        """Decode rows [0, b) and `p` prompt tokens in one forward; fixed shapes for (b, p), capturable.

        `sampled`: the rows that sample (see `torch_sampling.choose`): a list eagerly (an empty one in a
        greedy graph), None in a sampling graph (every row computes both, fixed shapes).
        """
        m, s = self.m, self.stack
        decoding = m["decoding"][:b].bool()
        first = m["first"][:b].bool()
        pos = self.pos[:b]
        rows = self.row_idx[:b]
        # A decoding row feeds its last token at its position; any other row in [0, b) writes its
        # scratch position and reads no key. (The clamp is a guard: the engine keeps rows inside.)
        where = torch.where(decoding, pos.clamp(max=self.max_len - 1), self.max_len)
        ids = torch.cat([self.token[:b], m["ids"][:p]])
        positions = torch.cat([where, m["pos"][:p]])
        dest = torch.cat([rows * self.stride + where, m["dest"][:p]])
        used_dec = torch.where(decoding, where + 1, 0)
        if p:
            cu_q = torch.cat([self.row_idx[:b + 1], b + m["cu_q"][1:]]).int()
            cu_k = torch.cat([rows * self.stride, m["cu_k"]]).int()
            used = torch.cat([used_dec, m["used"]]).int()
        else:  # decode only: b sequences of one query (the kernel's GQA fast case wants exactly that)
            cu_q = self.row_idx[:b + 1].int()
            cu_k = (self.row_idx[:b + 1] * self.stride).int()
            used = used_dec.int()
        max_q = max(p, 1)

        def write(i, k, v):
            self.k[i][dest] = k[0].transpose(0, 1)
            self.v[i][dest] = v[0].transpose(0, 1)
            return self.k[i], self.v[i]

        def attend(q, keys, values, _mask):
            q = q[0].transpose(0, 1)
            if split:  # decode only: every row's keys in pieces (torch_varlen.split_decode)
                o = torch_varlen.split_decode(self.attention_lse, q, keys, values, cu_k, used, self.stride, s.scale,
                                              self.piece)
            else:
                o = self.attention(q, keys, values, cu_q, cu_k, used, max_q, self.stride, s.scale)
            return o.reshape(1, o.shape[0], -1)

        h = s.forward(ids[None], positions[None], None, write, attend=attend)
        logits = s.logits(h[0, m["src"][:b]])
        counter = torch.where(decoding, pos + 1, m["first_pos"][:b])
        nxt = choose(logits, self.temperature[:b], self.top_p[:b], self.seed[:b], counter, self.vocab_hash, sampled)
        running = decoding | first
        self.token[:b] = torch.where(running, nxt, self.token[:b])
        self.pos[:b] = torch.where(decoding, pos + 1, torch.where(first, m["first_pos"][:b], pos))
        self.res[:b] = nxt
