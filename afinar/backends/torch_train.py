"""Training with PyTorch: transformers + PEFT LoRA, bitsandbytes NF4 for QLoRA; CUDA, MPS or CPU.

The speed-ups of `train.fast_paths` (CUDA only; tests/test_fast_paths.py and test_lora_fused.py
check each equals the plain path) are decided once, here, from the config:
  autocast     bf16/fp16 autocast and flash / memory-efficient SDPA (see `_precision`)
  fused_norms  RMSNorm and SwiGLU through compiled kernels (torch_fast.py)
  fused_lora   base matmul + LoRA update in one autograd function per projection, q/k/v and MLP
               (torch_lora_fused.py), where the module is provably PEFT's own function
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any

import torch

from afinar import data, distributed, memory
from afinar.backends import torch_model, torch_weights
from afinar.config import Config
from afinar.data import Encoded
from afinar.errors import AfinarError
from afinar.models import ResolvedModel


class TorchTrainer:
    """The training lifecycle on torch (`base.TrainingBackend`)."""

    name = "torch"

    def __init__(self, cfg: Config, collective: distributed.Collective = distributed.SINGLE_PROCESS):
        self.cfg = cfg
        self.collective = collective
        self.device = torch_model.pick_device()
        self.dtype = torch_model.compute_dtype(cfg, self.device)
        self.levers = cfg.train.levers(self.device.type)
        self.model = None
        self.optimizer = None
        self.tokenizer = None
        self.pad = 0

    # ------------------------------------------------------------ loading

    def load(self, model: ResolvedModel):
        """Load (and quantize) the base and attach new LoRA weights; return the tokenizer."""
        base, tokenizer = torch_model.load_base(self.cfg, model, self.device, self.dtype, self._quant_storage())
        return self.attach(base, tokenizer)

    def _quant_storage(self) -> torch.dtype:
        return torch.uint8

    def attach(self, base, tokenizer):
        """Put new LoRA weights on a loaded base and get it ready to train.

        Apart from `load` so benchmarks can hand in a base built in GPU memory.
        """
        self.tokenizer, self.pad = tokenizer, data.pad_id(tokenizer)
        self.model = torch_model.new_lora(base, self.cfg)
        if self.cfg.model.quantization != "none" and self.device.type == "cpu":
            torch_weights.keep_cpu_4bit_differentiable(self.model)
        if self.cfg.train.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        if "fused_norms" in self.levers:
            from afinar.backends.torch_fast import fuse_pointwise

            fuse_pointwise(self.model)
        if "fused_lora" in self.levers:  # after fuse_pointwise, which would replace the fused MLP's forward
            from afinar.backends.torch_lora_fused import fuse_lora

            fuse_lora(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.train.learning_rate,
                                           weight_decay=self.cfg.train.weight_decay, fused=self.device.type == "cuda")
        self.model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return tokenizer

    # ------------------------------------------------------------ steps

    def loss_sum(self, batch: list[Encoded]) -> tuple[torch.Tensor, int]:
        """Sum of the next-token losses of the batch's answer tokens (a tensor with its graph), and their count."""
        return torch_model.loss_sum(self.model, batch, self.pad, self.device, self._precision())

    def _precision(self):
        """The `autocast` lever: bf16/fp16 autocast, and SDPA without cuDNN's attention.

        Under autocast PEFT runs LoRA in the compute dtype on the bf16 activations (fp32 LoRA
        weights cast once per step); without it PEFT casts every LoRA input to an fp32 copy
        that autograd then keeps: three per layer with q/k/v targets, a quarter of the
        activation memory of a 7B step. cuDNN's attention builds a plan for every new batch
        shape (milliseconds of CPU per layer call); flash / memory-efficient kernels do not.
        """
        stack = contextlib.ExitStack()
        stack.enter_context(self._attention_kernels())
        if "autocast" in self.levers and self.dtype in (torch.bfloat16, torch.float16):
            stack.enter_context(torch.autocast("cuda", dtype=self.dtype))
        return stack

    def _attention_kernels(self):
        if "autocast" not in self.levers:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def forward_backward(self, batch: list[Encoded], scale: float) -> tuple[float, int]:
        """Accumulate gradients of `scale * sum of target-token losses`; return (loss sum, targets)."""
        with self._attention_kernels():  # the same kernels when checkpointing recomputes in backward
            loss, n = self.loss_sum(batch)
            (loss * scale).backward()
        return float(loss.detach()), n

    def optimizer_step(self, lr: float) -> float:
        """Clip, step AdamW at `lr`, zero gradients; return the gradient norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._sum_gradients(params)
        max_norm = self.cfg.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _sum_gradients(self, params: list[torch.Tensor]) -> None:
        """One process: nothing to do. Several: see torch_distributed.DDPTrainer."""

    @torch.no_grad()
    def eval_loss(self, batch: list[Encoded]) -> tuple[float, int]:
        """(sum of target-token losses, number of targets) without gradients."""
        was_training = self.model.training
        self.model.eval()
        try:
            loss, n = self.loss_sum(batch)
        finally:
            self.model.train(was_training)
        return float(loss), n

    def is_out_of_memory(self, error: Exception) -> bool:
        # CUDA raises torch.OutOfMemoryError; MPS a RuntimeError saying "MPS backend out of memory".
        return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()

    def recover_from_out_of_memory(self) -> None:
        """Drop partial gradients and cached memory before the step is retried smaller."""
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    # ------------------------------------------------------------ saving and resuming

    def save_adapter(self, folder: Path) -> None:
        """The adapter in PEFT format (adapter_model.safetensors + adapter_config.json)."""
        torch_model.save_peft(self.model, folder)

    def save_state(self, folder: Path) -> None:
        """A checkpoint's backend part: the adapter and the optimizer state."""
        self.save_adapter(folder)
        torch.save(self.optimizer.state_dict(), Path(folder) / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        weights = load_file(folder / "adapter_model.safetensors", device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise AfinarError(f"{folder}: the checkpoint's adapter does not fit this model ({result.unexpected_keys[:3]}...).")
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True))

    def rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    # ------------------------------------------------------------ reporting

    def model_facts(self) -> memory.ModelFacts:
        from peft.tuners.lora import LoraLayer

        # A multimodal checkpoint's config nests the language model's shape (text_config); plain ones return themselves.
        config = self.model.get_base_model().config.get_text_config(decoder=True)
        params = list(self.model.parameters())
        lora = [p for p in params if p.requires_grad]
        return memory.ModelFacts(
            in_use_bytes=int(torch_model.memory(self.device)["memory_mb"] * 2**20),
            weight_bytes=sum(p.numel() * p.element_size() for p in params if not p.requires_grad),
            lora_bytes=sum(p.numel() * p.element_size() for p in lora),
            trainable_params=sum(p.numel() for p in lora),
            hidden=config.hidden_size, layers=config.num_hidden_layers, vocab=config.vocab_size,
            activation_itemsize=self.dtype.itemsize, available_bytes=torch_model.available_bytes(self.device),
            lora_inputs=sum(m.in_features for name, m in self.model.named_modules()
                            if isinstance(m, LoraLayer) and ".layers.0." in f".{name}."),
            lora_dropout=self.cfg.lora.dropout)

    def trainable_by_kind(self) -> dict[str, int]:
        """Trainable parameters per adapted layer name (q_proj, v_proj, ...), for the start line."""
        from afinar.targets import count_by_kind

        return count_by_kind((n, p.numel()) for n, p in self.model.named_parameters() if p.requires_grad)

    def memory(self) -> dict[str, float]:
        return torch_model.memory(self.device)

    def describe(self) -> dict[str, Any]:
        info = torch_model.describe(self.cfg, self.device, self.dtype, self.model)
        info["trainable_parameters_by_module"] = self.trainable_by_kind()
        info["fast_paths"] = sorted(self.levers)
        return info
