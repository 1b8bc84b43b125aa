"""torch.distributed for the torch backend: process group, summed LoRA gradients, FSDP.

DDP semantics without the DDP wrapper: `TorchBackend.loss_sum` runs the decoder and the LM
head directly (not `model.forward`), so DistributedDataParallel's forward hooks would never
fire. Instead, before clipping, the LoRA gradients of every process are summed with one
all-reduce per dtype (`sum_gradients`). Each process's gradients already carry the scale
1 / (the step's global target count), so the sum is exactly the single-process gradient of
the whole step, and every process then takes the same AdamW step on the same weights.

FSDP (`distributed.strategy: fsdp`) follows the FSDP-QLoRA recipe that bitsandbytes, PEFT and
accelerate document: 4-bit weights stored in the compute dtype (`bnb_4bit_quant_storage`,
set in `TorchBackend.load`), FullyShardedDataParallel with one unit per transformer block
(accelerate's TRANSFORMER_BASED_WRAP on the model's `_no_split_modules`) and
`use_orig_params=False`. Only the frozen base is sharded: the LoRA modules are left out of
FSDP (`ignored_modules`), stay replicated and are summed like under DDP, so the optimizer,
checkpoints and resume are the same for both strategies. The loss runs inside the root's
forward, so FSDP gathers the root's own weights (embeddings, final norm, LM head).
"""

from __future__ import annotations

import contextlib
import datetime

import torch
import torch.distributed as dist

from afinar.distributed import World


def setup(world: World, timeout_s: int) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) from torchrun's environment variables."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)  # before the backend picks its device: GPU = LOCAL_RANK
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sum of `values` over every process (float64: exact for counts)."""
    buf = torch.tensor(values, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(buf)
    return buf.tolist()


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


def broadcast_from_main(params: list[torch.Tensor]) -> None:
    """Start every process from rank 0's LoRA weights (the seeded init already agrees; this makes sure)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def prepare(backend) -> None:
    """After LoRA is attached for training: same start weights everywhere; shard the base for FSDP."""
    trainable = [p for p in backend.model.parameters() if p.requires_grad]
    broadcast_from_main(trainable)
    if backend.cfg.distributed.strategy == "fsdp":
        _shard_base(backend)


class _Root(torch.nn.Module):
    """The FSDP root: its forward runs a closure, so the backend's own loss path runs inside it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, run):
        return run()


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


def _shard_base(backend) -> None:
    """Wrap the model in FSDP at its first loss, so a checkpoint loaded before (resume) lands in plain modules."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = backend.model
    base = model.get_base_model()
    blocks = set(getattr(base, "_no_split_modules", None) or [])
    block_types = {type(m) for m in base.modules() if type(m).__name__ in blocks}
    lora = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    plain_loss = backend.loss_sum
    state = {"root": None}

    def loss_sum(batch):
        if state["root"] is None:
            state["root"] = FSDP(_Root(model), auto_wrap_policy=ModuleWrapPolicy(block_types) if block_types else None,
                                 ignored_modules=lora, device_id=backend.device, use_orig_params=False,
                                 limit_all_gathers=True)
        return state["root"](lambda: plain_loss(batch))

    def save_pretrained(folder, **kwargs):
        with _fsdp_units_unwrapped(model):
            type(model).save_pretrained(model, folder, **kwargs)

    # Instance attributes: the backend's methods call self.loss_sum / self.model.save_pretrained.
    backend.loss_sum = loss_sum
    model.save_pretrained = save_pretrained
