"""torch.distributed for the torch backend: process group, summed LoRA gradients, FSDP.

DDP semantics without the DDP wrapper (`DDPTrainer`): the loss runs the decoder and the LM
head directly (not `model.forward`), so DistributedDataParallel's forward hooks would never
fire. Instead, before clipping, the LoRA gradients of every process are summed with one
all-reduce per dtype (`sum_gradients`). Each process's gradients already carry the scale
1 / (the step's global target count), so the sum is exactly the single-process gradient of
the whole step, and every process then takes the same AdamW step on the same weights.

FSDP (`distributed.strategy: fsdp`, `FSDPTrainer`) follows the FSDP-QLoRA recipe that bitsandbytes, PEFT and
accelerate document: 4-bit weights stored in the compute dtype (`bnb_4bit_quant_storage`,
`_quant_storage`), FullyShardedDataParallel with one unit per transformer block
(accelerate's TRANSFORMER_BASED_WRAP on the model's `_no_split_modules`) and
`use_orig_params=False`. Only the frozen base is sharded: the LoRA modules are left out of
FSDP (`ignored_modules`), stay replicated and are summed like under DDP, so the optimizer,
checkpoints and resume are the same for both strategies. The loss runs inside the root's
forward, so FSDP gathers the root's own weights (embeddings, final norm, LM head).
"""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from afinar.backends.torch_train import TorchTrainer
from afinar.config import Config
from afinar.distributed import World


def setup(world: World, timeout_s: int) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) from torchrun's environment variables."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)  # before the backend picks its device: GPU = LOCAL_RANK
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))


class TorchCollective:
    """`distributed.Collective` over torch.distributed (the process group `setup` joined)."""

    def __init__(self, device: torch.device):
        self.device = device

    def all_sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of `values` over every process (float64: exact for counts)."""
        buf = torch.tensor(values, dtype=torch.float64, device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(buf)
        return buf.tolist()

    @staticmethod
    def sum_gradients(params: list[torch.Tensor]) -> None:
        """Sum every trainable parameter's gradient over the processes, one flat all-reduce per dtype."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is None:  # not reached this step (a frozen branch): still takes part in the sum
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n


class DDPTrainer(TorchTrainer):
    """Every process holds the whole (4-bit) base; LoRA gradients are summed before clipping."""

    def __init__(self, cfg: Config, world: World):
        setup(world, cfg.distributed.timeout_s)  # before the device is picked: GPU = LOCAL_RANK
        super().__init__(cfg)
        self.collective = TorchCollective(self.device)

    def attach(self, base, tokenizer):
        tokenizer = super().attach(base, tokenizer)
        # Same start weights everywhere: the seeded init already agrees; this makes sure.
        with torch.no_grad():
            for p in self.model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        return tokenizer

    def _sum_gradients(self, params: list[torch.Tensor]) -> None:
        self.collective.sum_gradients(params)


class _Root(torch.nn.Module):
    """The FSDP root: its forward runs a closure, so the trainer's own loss path runs inside it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, run):
        return run()


class FSDPTrainer(DDPTrainer):
    """The frozen base sharded across the processes (one FSDP unit per transformer block)."""

    _root = None

    def __init__(self, cfg: Config, world: World):
        super().__init__(cfg, world)
        # The fused LoRA layers read whole base weights, which FSDP keeps sharded outside its forward.
        self.levers = self.levers - {"fused_lora"}

    def _quant_storage(self) -> torch.dtype:
        return self.dtype  # FSDP shards floating-point tensors of one dtype per unit

    def loss_sum(self, batch):
        # Wrapped at the first loss, so a checkpoint loaded before (resume) lands in plain modules.
        if self._root is None:
            self._root = self._wrap()
        return self._root(lambda: super(FSDPTrainer, self).loss_sum(batch))

    def _wrap(self):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        base = self.model.get_base_model()
        blocks = set(getattr(base, "_no_split_modules", None) or [])
        block_types = {type(m) for m in base.modules() if type(m).__name__ in blocks}
        lora = [m for m in self.model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        return FSDP(_Root(self.model), auto_wrap_policy=ModuleWrapPolicy(block_types) if block_types else None,
                    ignored_modules=lora, device_id=self.device, use_orig_params=False, limit_all_gathers=True)

    def save_adapter(self, folder: Path) -> None:
        with _fsdp_units_unwrapped(self.model):
            super().save_adapter(folder)


@contextlib.contextmanager
def _fsdp_units_unwrapped(model: torch.nn.Module):
    """The model's blocks without their FSDP wrappers for a moment, so PEFT saves its usual keys.

    The LoRA weights are replicated (FSDP ignores them), so rank 0 alone can save them; but
    PEFT reads module names, which FSDP prefixes with `_fsdp_wrapped_module.`, and
    the wrappers' state_dict() would all-gather the sharded base, which takes every process.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, FSDP)]
    for parent, name, unit in units:
        setattr(parent, name, unit.module)
    try:
        yield
    finally:
        for parent, name, unit in units:
            setattr(parent, name, unit)
