"""What the two static-slot torch runners share: per-row settings, pipelined read-back, CUDA-graph capture.

`TorchRunner` (torch_runner.py: a prefill forward, then a decode step) and `FlatRunner`
(torch_flat.py: one forward a step) differ in how a step is built; around it they do the same:
each row's sampling settings live on the device (written with scalar fills, no host sync); a
step's chosen tokens are copied to pinned host memory behind an event, and `step()` launches
step k+1 before it reads step k's tokens (the host never waits for the GPU between steps);
a step shape is captured once as a CUDA graph, from a memory pool all graphs share.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from afinar.engine.plan import PrefillQueue, RowError
from afinar.engine.request import SamplingParams

log = logging.getLogger("afinar.engine")


class SlotRows:
    """Per-row state on the device and host, and the pipelined step; subclasses write `_launch`."""

    def _init_rows(self, rows: int, chunk: int, res_shape: tuple[int, ...], pipeline: bool | None) -> None:
        dev, cuda = self.device, self.device.type == "cuda"
        self.pipeline = cuda if pipeline is None else pipeline
        self.temperature = torch.zeros(rows, device=dev, dtype=torch.float32)
        self.top_p = torch.ones(rows, device=dev, dtype=torch.float32)
        self.seed = torch.zeros(rows, device=dev, dtype=torch.long)
        self.res = torch.zeros(res_shape, device=dev, dtype=torch.long)  # the step's chosen tokens
        self._res_host = [torch.zeros(res_shape, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if cuda else None
        self._launches = 0
        self._inflight: tuple | None = None
        self.handles: list[Any] = [None] * rows
        self.params: list[SamplingParams | None] = [None] * rows
        self.decoding: set[int] = set()
        self.prefill = PrefillQueue(chunk)
        self.graphs: dict = {}
        self._pool = None

    # ------------------------------------------------ plan.Runner

    def add(self, handle, slot: int, prompt: list[int], params: SamplingParams) -> None:
        self.handles[slot], self.params[slot] = handle, params
        self.prefill.add(slot, prompt)
        self.temperature[slot] = params.temperature  # scalar fills: kernel launches, no host sync
        self.top_p[slot] = params.top_p
        self.seed[slot] = params.seed - 2**64 if params.seed >= 2**63 else params.seed  # the same 64 bits, as int64

    def busy(self) -> bool:
        return bool(self.decoding or len(self.prefill) or self._inflight)

    def reset(self) -> None:
        for slot in range(len(self.handles)):
            self.remove(slot)
        self._inflight = None

    @torch.inference_mode()
    def step(self) -> list[tuple[Any, int]]:
        previous, self._inflight = self._inflight, None
        try:
            launched = self._launch()
        except RowError as e:  # the step launched before this one still delivers its tokens
            e.produced = self._collect(previous)
            raise
        if not self.pipeline:
            return self._collect(launched)
        self._inflight = launched
        return self._collect(previous)

    # ------------------------------------------------ helpers for _launch

    def _read_back(self, record: list[tuple[Any, int]]) -> tuple | None:
        """After a step's work is enqueued: copy its tokens to the host behind an event. `record`:
        (handle, index into `res` flattened) for every token the step made."""
        if not record:
            return None
        host = self._res_host[self._launches % 2]
        host.copy_(self.res, non_blocking=True)
        event = None
        if self._events is not None:
            event = self._events[self._launches % 2]
            event.record()
        self._launches += 1
        return record, host, event

    def _collect(self, launched) -> list[tuple[Any, int]]:
        if launched is None:
            return []
        record, host, event = launched
        if event is not None:
            event.synchronize()
        values = host.view(-1).tolist()
        return [(handle, values[i]) for handle, i in record]

    def _capture(self, key, run: Callable[[], None]):
        """`run` captured as the CUDA graph for `key` (kept in `self.graphs`); None, and eager from then on,
        where this GPU or driver cannot capture it. The caller makes `run` harmless to execute."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs run one at a time
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # outside capture: allocator, cuBLAS handles, compiled kernels
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                run()
        except Exception as e:  # noqa: BLE001 - an op this GPU/driver cannot capture: stay correct, eagerly
            log.warning("CUDA graph capture failed (%s: %s); running steps without graphs", type(e).__name__,
                        str(e)[:200])
            self.use_graphs = False
            return None
        self.graphs[key] = graph
        return graph
