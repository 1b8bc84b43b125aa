"""The torch runner for merged Llama/Mistral/Qwen2 models: static KV slots, one fixed-shape decode step.

Every row owns a slot of a preallocated KV cache ([rows, kv heads, max_len, head dim] per layer).
An engine step is: the prompt chunks the `PrefillQueue` hands out, packed into one forward that
writes their keys and values into their slots (the last chunk of a prompt samples the row's first
token on the device); then one decode token for every running row, as one forward over slots
[0, B) attending to positions [0, L), with B and L rounded up to a few sizes. On CUDA each
(B, L) decode step is a CUDA graph captured at start-up (`warm_up`), sampling included, and
step k+1 is launched before step k's tokens are read back: the host never waits for the GPU
between steps, and reads the chosen token ids once per step.

The layers are the model's own modules (`fast_decode.DecoderStack`); only attention over the
slots is written here. On CPU the same code runs eagerly, in a mode where a row's tokens are
bit-for-bit the same alone or in any batch: matmuls see at least 4 rows (CPU BLAS switches to a
different kernel below that, which rounds differently), and attention runs per group of rows
with the same length bucket (its blocking depends on the key length).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from afinar.backends.fast_decode import DecoderStack
from afinar.engine.plan import Chunk, RowError, bucket, powers_of_two
from afinar.engine.torch_rows import SlotRows
from afinar.engine.torch_sampling import choose, vocab_hashes

MIN_ROWS_CPU = 4  # see the module docstring: CPU GEMMs of >= 4 rows give each row the same bits
MIN_KEYS = 256  # smallest key-length bucket


class TorchRunner(SlotRows):
    """`plan.Runner` over a `DecoderStack`; see the module docstring."""

    def __init__(self, model, max_rows: int, max_len: int, prefill_chunk: int,
                 use_graphs: bool | None = None, pipeline: bool | None = None):
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda if use_graphs is None else use_graphs
        self.exact = not cuda  # batch-invariant arithmetic (CPU; see the module docstring)
        self.stack = DecoderStack(model, compile_ops=self.use_graphs)
        config = model.config
        limits = [max_len, getattr(config, "max_position_embeddings", None), self.stack.window]
        self.max_len = min(x for x in limits if x)
        self.max_rows = max_rows
        self.row_sizes = powers_of_two(1, max_rows) if not self.exact else powers_of_two(
            MIN_ROWS_CPU, max(max_rows, MIN_ROWS_CPU))
        self.len_sizes = powers_of_two(min(MIN_KEYS, self.max_len), self.max_len)
        rows = self.row_sizes[-1]
        # CUDA graphs need fixed addresses: the whole cache up front. Eagerly (CPU) it grows as
        # positions are needed, so a 4,096-token slot costs memory only when a request uses it.
        # One position past the capacity is scratch: rows not decoding write there (see _decode).
        self.capacity = self.max_len if self.use_graphs else self.len_sizes[0]
        dev = self.device
        shape = (rows, self.stack.n_kv, self.capacity + 1, self.stack.head_dim)
        self.k = [torch.zeros(shape, device=dev, dtype=self.dtype) for _ in self.stack.layers]
        self.v = [torch.zeros(shape, device=dev, dtype=self.dtype) for _ in self.stack.layers]
        self.token = torch.zeros(rows, device=dev, dtype=torch.long)
        self.pos = torch.zeros(rows, device=dev, dtype=torch.long)
        self.active = torch.zeros(rows, device=dev, dtype=torch.bool)
        self._init_rows(rows, prefill_chunk, (2, rows), pipeline)  # res: [0] decode tokens, [1] first tokens
        self.row_idx = torch.arange(rows, device=dev)
        self.key_idx = torch.arange(self.max_len, device=dev)
        self.vocab_hash = vocab_hashes(weight.shape[0], dev)
        self.host_pos = [0] * rows  # where each decoding row's next fed token goes
        self._active_host = [False] * rows
        self._active_dirty = False

    # ------------------------------------------------ plan.Runner (the rest in SlotRows)

    def remove(self, slot: int) -> None:
        self.handles[slot] = self.params[slot] = None
        self.prefill.remove(slot)
        if slot in self.decoding:
            self.decoding.discard(slot)
            self._set_active(slot, False)

    @torch.inference_mode()
    def warm_up(self, say: Callable[[str], None]) -> None:
        """Run the prefill path once; on CUDA capture every (rows, keys) decode step as a CUDA graph."""
        self._prefill([Chunk(0, [0] * 8, 0, False)])
        if not self.use_graphs:
            return
        shapes = sorted(((b, n) for b in self.row_sizes for n in self.len_sizes), reverse=True)  # largest first
        say(f"capturing {len(shapes)} CUDA graphs (rows {list(self.row_sizes)} x keys {list(self.len_sizes)})")
        for b, n in shapes:
            if self._graph(b, n) is None:
                break
        torch.cuda.synchronize()

    def _graph(self, b: int, n_keys: int):
        """The captured decode step for (b, n_keys); captured now if `warm_up` did not (ask, eval)."""
        graph = self.graphs.get((b, n_keys))
        if graph is not None or not self.use_graphs:
            return graph
        # Warm-up runs execute: with every row inactive they change no row's token or position.
        saved = self.active.clone()
        self.active.zero_()
        try:
            return self._capture((b, n_keys), lambda: self._decode(b, n_keys))
        finally:
            self.active.copy_(saved)

    # ------------------------------------------------ one step

    def _launch(self) -> tuple | None:
        """Enqueue one step's work; returns what `_collect` needs to read its tokens, or None."""
        chunks = self.prefill.next()
        record: list[tuple[Any, int]] = []  # (handle, index into res flattened: [0] decode tokens, [1] first)
        rows = self.row_sizes[-1]
        if chunks:
            try:
                self._prefill(chunks)
            except Exception as e:  # noqa: BLE001 - these prompts' forward: their rows fail, the others go on
                raise RowError([self.handles[c.slot] for c in chunks], e) from e
            for c in chunks:
                if c.last:
                    record.append((self.handles[c.slot], rows + c.slot))
                    self.host_pos[c.slot] = c.start + len(c.tokens)
                    self.decoding.add(c.slot)
                    self._set_active(c.slot, True)
        if self.decoding:
            b = bucket(max(self.decoding) + 1, self.row_sizes)
            # A row one launch past its end (its result not read yet) feeds at max_len: clamped (see _decode).
            keys = min(max(self.host_pos[s] for s in self.decoding) + 1, self.max_len)
            self._grow(keys)
            if self._active_dirty:
                self.active.copy_(self._to_device(self._active_host, torch.bool))
                self._active_dirty = False
            graph = self._graph(b, bucket(keys, self.len_sizes))
            if graph is not None:
                graph.replay()
            else:
                self._decode(b, bucket(keys, self.len_sizes), sorted(s for s in self.decoding if not self.params[s].greedy))
            for s in sorted(self.decoding):
                record.append((self.handles[s], s))
                self.host_pos[s] += 1
        return self._read_back(record)

    def _to_device(self, data, dtype=torch.long) -> torch.Tensor:
        """Host values to the device without waiting for it (pinned, non-blocking on CUDA): the step launched
        before keeps running while this one is prepared."""
        return torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)

    def _set_active(self, slot: int, on: bool) -> None:
        self._active_host[slot] = on
        self._active_dirty = True

    def _grow(self, needed: int) -> None:
        """Eager mode: widen the cache to the key bucket `needed` falls in (never past max_len)."""
        target = bucket(needed, self.len_sizes)
        if target <= self.capacity:
            return
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                new = old.new_zeros((*old.shape[:2], target + 1, old.shape[3]))
                new[:, :, :self.capacity] = old[:, :, :self.capacity]
                cache[i] = new
        self.capacity = target

    # ------------------------------------------------ the forwards

    def _decode(self, b: int, n_keys: int, sampled: list[int] | None = None) -> None:
        """One token for slots [0, b) attending to positions [0, n_keys): fixed shapes, capturable.

        `sampled`: eager only, the slots that sample (see `torch_sampling.choose`); None in a graph.
        """
        tok, pos, act = self.token[:b], self.pos[:b], self.active[:b]
        # Rows not decoding (free, or still prefilling) write to the scratch position past the
        # capacity, never read: they cannot touch a prompt being prefilled in their slot. (The clamp
        # is a guard; the engine's budgets keep every running row inside its slot.)
        where = torch.where(act, pos.clamp(max=self.capacity - 1), self.capacity)
        mask = (self.key_idx[:n_keys][None, :] <= where[:, None])[:, None, None, :]
        rows = self.row_idx[:b]

        def write(i, k, v):
            self.k[i][rows, :, where] = k[:, :, 0]
            self.v[i][rows, :, where] = v[:, :, 0]
            return self.k[i][:b, :, :n_keys], self.v[i][:b, :, :n_keys]

        h = self.stack.forward(tok[:, None], where[:, None], mask, write,
                               attend=self._grouped_decode_attention(b) if self.exact else None)
        logits = self.stack.logits(h[:, -1])
        nxt = choose(logits, self.temperature[:b], self.top_p[:b], self.seed[:b], pos + 1, self.vocab_hash, sampled)
        self.token[:b] = torch.where(act, nxt, tok)
        self.pos[:b] += act.long()
        self.res[0, :b] = nxt

    def _grouped_decode_attention(self, b: int):
        """Exact mode: attention per group of decoding rows sharing a key bucket (their own lengths only)."""
        groups: dict[int, list[int]] = {}
        for s in self.decoding:
            if s < b:
                groups.setdefault(bucket(min(self.host_pos[s] + 1, self.max_len), self.len_sizes), []).append(s)
        index = {n: torch.tensor(sorted(rows), device=self.device) for n, rows in groups.items()}

        def attend(q, keys, values, mask):
            out = q.new_zeros((q.shape[0], 1, q.shape[1] * q.shape[3]))
            for n, idx in index.items():
                out[idx] = self.stack.attend(q[idx], keys[idx, :, :n], values[idx, :, :n], mask[idx, ..., :n])
            return out

        return attend

    def _prefill(self, chunks: list[Chunk]) -> None:
        """Chunks of several rows in one forward (right-padded); samples the first token of finished prompts."""
        n = len(chunks)
        width = max(len(c.tokens) for c in chunks)
        if self.exact:
            width = max(width, -(-MIN_ROWS_CPU // n))  # >= 4 rows through every matmul
        ends = [c.start + len(c.tokens) for c in chunks]
        n_keys = bucket(max(ends), self.len_sizes)
        self._grow(n_keys)
        ids = self._to_device([c.tokens + [0] * (width - len(c.tokens)) for c in chunks])
        positions = self._to_device([[min(c.start + j, self.max_len - 1) for j in range(width)] for c in chunks])
        slots = self._to_device([c.slot for c in chunks])
        valid = [(r, j) for r, c in enumerate(chunks) for j in range(len(c.tokens))]
        w_row = self._to_device([r for r, _ in valid])
        w_tok = self._to_device([j for _, j in valid])
        w_slot, w_pos = slots[w_row], positions[w_row, w_tok]
        mask = (self.key_idx[:n_keys][None, None, :] <= positions[:, :, None])[:, None]

        def write(i, k, v):
            self.k[i][w_slot, :, w_pos] = k[w_row, :, w_tok]
            self.v[i][w_slot, :, w_pos] = v[w_row, :, w_tok]
            if n == 1:
                s = chunks[0].slot
                return self.k[i][s:s + 1, :, :n_keys], self.v[i][s:s + 1, :, :n_keys]
            return self.k[i][:, :, :n_keys].index_select(0, slots), self.v[i][:, :, :n_keys].index_select(0, slots)

        attend = None
        if self.exact:  # each row attends with its own query count and key bucket
            def attend(q, keys, values, mask):
                out = q.new_zeros((q.shape[0], q.shape[2], q.shape[1] * q.shape[3]))
                for r, c in enumerate(chunks):
                    t, nk = len(c.tokens), bucket(ends[r], self.len_sizes)
                    out[r:r + 1, :t] = self.stack.attend(q[r:r + 1, :, :t], keys[r:r + 1, :, :nk],
                                                         values[r:r + 1, :, :nk], mask[r:r + 1, :, :t, :nk])
                return out

        h = self.stack.forward(ids, positions, mask, write, attend=attend)
        done = [r for r, c in enumerate(chunks) if c.last]
        if not done:
            return
        rows = self._to_device(done)
        last = h[rows, self._to_device([len(chunks[r].tokens) - 1 for r in done])]
        if self.exact and len(done) < MIN_ROWS_CPU:
            last = torch.cat([last, last.new_zeros((MIN_ROWS_CPU - len(done), last.shape[1]))])
        logits = self.stack.logits(last)[: len(done)]
        done_slots = slots[rows]
        counter = self._to_device([ends[r] for r in done])
        sampled = [i for i, r in enumerate(done) if not self.params[chunks[r].slot].greedy]
        first = choose(logits, self.temperature[done_slots], self.top_p[done_slots], self.seed[done_slots],
                       counter, self.vocab_hash, None if self.use_graphs else sampled)
        self.token[done_slots] = first
        self.pos[done_slots] = counter
        self.res[1, done_slots] = first
