"""PyTorch backend: transformers + PEFT LoRA, bitsandbytes NF4 for QLoRA; CUDA, MPS or CPU."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.generation import StoppingCriteriaList

from afinar import distributed, hardware
from afinar.backends import torch_hooks, torch_weights
from afinar.config import Config
from afinar.data import Encoded
from afinar.errors import AfinarError
from afinar.models import ResolvedModel, hub_load_error

IGNORE = -100


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class TorchBackend:
    name = "torch"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.world = distributed.from_env()
        if self.world.size > 1:  # under torchrun / accelerate launch: join the others (and take GPU LOCAL_RANK)
            from afinar.backends import torch_distributed

            torch_distributed.setup(self.world, cfg.distributed.timeout_s)
        self.device = pick_device()
        dtype = cfg.model.compute_dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        self.dtype = getattr(torch, dtype)
        self.model = None
        self.optimizer = None
        self.tokenizer = None
        # Fused RMSNorm/SwiGLU kernels (torch_fast.py) in training: CUDA only, where they compile.
        self.fuse_ops = self.device.type == "cuda"
        self.cuda_speedups = self.device.type == "cuda"  # see _mixed_precision
        self._decoder = None

    # ------------------------------------------------------------ loading

    def load(self, model: ResolvedModel, adapter_dir: str | Path | None = None, trainable: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quantize = self.cfg.model.quantization != "none"  # 'int4' too: bitsandbytes trains NF4 only
        if quantize and self.device.type == "mps":
            raise AfinarError(
                f"model.quantization={self.cfg.model.quantization} with backend=torch needs bitsandbytes, which does "
                "not run on Apple's MPS. Use the MLX backend for 4-bit on this Mac (pip install 'afinar[mlx]', then "
                "--set backend=mlx), or --set model.quantization=none (LoRA on MPS)."
            )
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if quantize:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=self.cfg.model.double_quant,
                bnb_4bit_compute_dtype=self.dtype,
                # FSDP shards floating-point tensors only, all of one dtype per unit (bitsandbytes' FSDP-QLoRA guide)
                bnb_4bit_quant_storage=self.dtype if self._fsdp() else torch.uint8,
            )
        if self.device.type == "cuda":
            kwargs["device_map"] = {"": self.device.index or 0}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model.path)
            base = AutoModelForCausalLM.from_pretrained(model.path, **kwargs)
        except OSError as e:
            if model.source == "hub":
                raise hub_load_error(model.name, e) from None
            raise AfinarError(f"Could not load model.base={model.name!r} from {model.path}: {e}") from None
        if self.device.type != "cuda" and not quantize:
            base.to(self.device)
        if self.tokenizer.eos_token_id is None:
            raise AfinarError(f"The tokenizer of {model.name!r} has no EOS token: answers could never end.")
        return self.attach(base, self.tokenizer, adapter_dir, trainable)

    def attach(self, base, tokenizer, adapter_dir: str | Path | None = None, trainable: bool = True):
        """Put LoRA (new, or the saved adapter) on a loaded base and get it ready to train or answer.

        Apart from `load` so benchmarks can hand in a base built in GPU memory.
        """
        from peft import LoraConfig, PeftModel, get_peft_model

        self.tokenizer = tokenizer
        quantize = self.cfg.model.quantization != "none"
        torch.manual_seed(self.cfg.train.seed)  # LoRA init is random: same seed, same adapter
        # Answering: fold B A into dequantized weights once. On CPU bitsandbytes' 4-bit kernels
        # are slow (seconds per token); on CUDA plain bf16 weights decode several times faster
        # than 4-bit + adapter and allow the static-cache decoder (fast_decode.py), so the 4-bit
        # path stays only for GPUs without room for the dense weights.
        merge = not trainable and adapter_dir is not None and (
            self.device.type == "cpu" or (self.device.type == "cuda" and torch_weights.dense_fits(base, self.dtype, self.device)))
        if merge and quantize:
            torch_weights.dequantize_4bit(base, self.dtype)
        if adapter_dir is not None:
            self.model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
            if merge:  # fold B A into W once: no adapter overhead per token
                self.model = self.model.merge_and_unload()
        else:
            lora = self.cfg.lora
            try:
                self.model = get_peft_model(base, LoraConfig(
                    r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
                ))
            except ValueError as e:
                names = sorted({n.split(".")[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
                raise AfinarError(
                    f"lora.target_modules={lora.target_modules}: {str(e).splitlines()[0]} "
                    f"Linear layers in this model: {names}."
                ) from None
        if trainable:
            if quantize and self.device.type == "cpu":
                torch_weights.keep_cpu_4bit_differentiable(self.model)
            if self.cfg.train.gradient_checkpointing:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                self.model.enable_input_require_grads()
            if self.fuse_ops:
                from afinar.backends.torch_fast import fuse_pointwise

                fuse_pointwise(self.model)
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(
                params, lr=self.cfg.train.learning_rate, weight_decay=self.cfg.train.weight_decay,
                fused=self.device.type == "cuda",
            )
            self.model.train()
            if self.world.size > 1:
                from afinar.backends import torch_distributed

                torch_distributed.prepare(self)
        else:
            self.model.eval()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self.tokenizer

    # ------------------------------------------------------------ training

    def _tensors(self, batch: list[Encoded], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = device or self.device
        width = max(len(e.input_ids) for e in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            attn[row, :n] = 1
            t = torch.tensor(e.input_ids)
            t[~torch.tensor(e.loss_mask)] = IGNORE
            targets[row, :n] = t
        return ids.to(device), attn.to(device), targets.to(device)

    def loss_sum(self, batch: list[Encoded]) -> tuple[torch.Tensor, int]:
        """Sum of next-token cross-entropy over target tokens.

        Only the hidden states of target positions go through the LM head: answers are a
        fraction of each sequence, and the head (vocab x hidden) is the largest matmul in a
        small model, so this skips most of its work and never builds full-vocabulary logits
        for prompt tokens. `tests/test_torch_backend.py` checks it equals the plain HF loss.
        """
        # Which positions are targets is known on the CPU: selecting them by index there keeps
        # the GPU queue full (a boolean mask or a count on the GPU would wait for it to drain).
        ids, _, targets = self._tensors(batch, torch.device("cpu"))
        width = ids.shape[1]
        keep = targets[:, 1:] != IGNORE
        rows, cols = keep.nonzero(as_tuple=True)
        where = (rows * width + cols).to(self.device)  # position t predicts token t + 1
        labels = targets[:, 1:][keep].to(self.device)
        n = len(labels)
        ids = ids.to(self.device)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        head = base.get_output_embeddings()
        # No padding mask: rows are right-padded, so under the causal mask a real token never
        # sees padding (it comes after it) and padding positions carry no target. The outputs
        # that count are the same, and attention runs as plain causal (flash) attention instead
        # of a masked kernel that expands the mask per head (3 GB on a 7B step).
        with self._mixed_precision():
            if getattr(base.config, "final_logit_softcapping", None) is None and hasattr(base, "get_decoder"):
                hidden = base.get_decoder()(input_ids=ids).last_hidden_state
                logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, where))
            else:  # models that transform logits after the head: take the plain path
                logits = self.model(input_ids=ids).logits
                logits = logits.reshape(-1, logits.shape[-1]).index_select(0, where)
        return F.cross_entropy(logits.float(), labels, reduction="sum"), n

    def _mixed_precision(self):
        """CUDA training forward: bf16/fp16 autocast, and SDPA without cuDNN's attention.

        Under autocast PEFT runs LoRA in the compute dtype on the bf16 activations (fp32 LoRA
        weights cast once per step); without it PEFT casts every LoRA input to an fp32 copy
        that autograd then keeps: three per layer with q/k/v targets, a quarter of the
        activation memory of a 7B step. cuDNN's attention builds a plan for every new batch
        shape (milliseconds of CPU per layer call); flash / memory-efficient kernels do not.
        """
        stack = contextlib.ExitStack()
        stack.enter_context(self._attention_kernels())
        if self.cuda_speedups and self.dtype in (torch.bfloat16, torch.float16):
            stack.enter_context(torch.autocast("cuda", dtype=self.dtype))
        return stack

    def _attention_kernels(self):
        if not self.cuda_speedups:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def forward_backward(self, batch: list[Encoded], scale: float) -> tuple[float, int]:
        with self._attention_kernels():  # the same kernels when checkpointing recomputes in backward
            loss, n = self.loss_sum(batch)
            (loss * scale).backward()
        return float(loss.detach()), n

    def optimizer_step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.world.size > 1:  # DDP semantics by one all-reduce: see torch_distributed.py
            from afinar.backends import torch_distributed

            torch_distributed.sum_gradients(params)
        max_norm = self.cfg.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def all_sum(self, values: list[float]) -> list[float]:
        """`values` summed over the processes of a torchrun / accelerate launch job (see distributed.py)."""
        from afinar.backends import torch_distributed

        return torch_distributed.all_sum(values, self.device)

    def _fsdp(self) -> bool:
        return self.world.size > 1 and self.cfg.distributed.strategy == "fsdp"

    @torch.no_grad()
    def eval_loss(self, batch: list[Encoded]) -> tuple[float, int]:
        was_training = self.model.training
        self.model.eval()
        try:
            loss, n = self.loss_sum(batch)
        finally:
            self.model.train(was_training)
        return float(loss), n

    def save_adapter(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder))
        (Path(folder) / "README.md").unlink(missing_ok=True)  # PEFT's empty model card; we write our own guide

    def is_out_of_memory(self, error: Exception) -> bool:
        # CUDA raises torch.OutOfMemoryError; MPS a RuntimeError saying "MPS backend out of memory".
        return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()

    def recover_from_out_of_memory(self) -> None:
        import gc

        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    def estimate_memory(self, batch_tokens: int, answer_tokens: int) -> dict[str, float]:
        """A rough budget, in MiB, of one training step (printed before training starts)."""
        mib = 2**20
        config = self.model.get_base_model().config
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.requires_grad)
        lora = [p for p in self.model.parameters() if p.requires_grad]
        lora_bytes = sum(p.numel() * p.element_size() for p in lora)
        optimizer = sum(p.numel() * 4 * 3 for p in lora)  # fp32 gradient + AdamW's two moments
        hidden, layers = config.hidden_size, config.num_hidden_layers
        per_token_layer = 2 * hidden if self.cfg.train.gradient_checkpointing else 18 * hidden
        activations = batch_tokens * layers * per_token_layer * self.dtype.itemsize + answer_tokens * config.vocab_size * 8
        if self.device.type == "cuda":
            available = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_allocated(self.device)
        else:
            available = hardware.available_memory_gb() * 2**30 + hardware.process_memory_mb()[0] * mib
        parts = {"weights": weights, "lora": lora_bytes, "optimizer": optimizer, "activations": activations}
        out = {k: round(v / mib, 3) for k, v in parts.items()}
        out["total"] = round(sum(parts.values()) / mib, 3)
        out["available"] = round(available / mib, 1)
        return out

    def save_checkpoint(self, folder: Path) -> None:
        import random

        import numpy as np

        self.save_adapter(folder)
        torch.save(self.optimizer.state_dict(), Path(folder) / "optimizer.pt")
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, Path(folder) / "rng_state.pt")

    def load_checkpoint(self, folder: Path) -> None:
        import random

        import numpy as np
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        weights = load_file(folder / "adapter_model.safetensors", device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise AfinarError(f"{folder}: the checkpoint's adapter does not fit this model ({result.unexpected_keys[:3]}...).")
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True))
        # RNG states hold Python objects (tuples, numpy arrays): our own file, so full unpickling is fine.
        rng = torch.load(folder / "rng_state.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # ------------------------------------------------------------ inference

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, on_token=None, should_stop=None) -> list[list[int]]:
        # afinar.engine (continuous batching): ask, eval and serve answer through the one engine.
        from afinar.engine import engine_for

        return engine_for(self).generate(prompts, max_new_tokens, temperature, top_p, seed, on_token, should_stop)

    @torch.inference_mode()
    def generate_static(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int = 0, on_token=None, should_stop=None,
                        plain: bool = False) -> list[list[int]]:
        """The earlier whole-batch generate (serve.engine=static; `plain`: transformers only, serve.engine=transformers)."""
        eos = self.tokenizer.eos_token_id
        if not plain and (fast := self._fast_decoder(prompts, max_new_tokens)) is not None:
            return fast.generate(prompts, max_new_tokens, eos, temperature, top_p, seed, on_token, should_stop)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        width = max(len(p) for p in prompts)
        # Left padding: every row's next token sits in the same (last) column.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        hooks = {}
        if on_token is not None or should_stop is not None:
            rows = torch_hooks.RowHooks(len(prompts), eos, on_token, should_stop)
            hooks = {"streamer": rows, "stopping_criteria": StoppingCriteriaList([rows])}
        was_training = self.model.training
        self.model.eval()
        torch.manual_seed(seed)
        sample = temperature > 0
        try:
            out = self.model.generate(
                input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=sample,
                temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
                pad_token_id=pad, eos_token_id=eos, **hooks,
            )
        finally:
            self.model.train(was_training)
        if hooks:
            return rows.tokens
        results = []
        for row in out[:, width:].tolist():
            results.append(row[: row.index(eos)] if eos in row else row)
        return results

    def _fast_decoder(self, prompts: list[list[int]], max_new_tokens: int):
        """The static-cache CUDA-graph decoder when the model was merged at load (CUDA only)."""
        from afinar.backends import fast_decode

        if self.device.type != "cuda" or self.model.training or not fast_decode.supported(self.model):
            return None
        if self._decoder is None or self._decoder.model is not self.model or self._decoder.qkv is None:
            self._decoder = fast_decode.StaticDecoder(self.model)
        return self._decoder if self._decoder.fits(prompts, max_new_tokens) else None

    # ------------------------------------------------------------ merged export

    @torch.no_grad()
    def save_merged(self, folder: Path) -> None:
        """Fold the adapter into dequantized full-precision weights and save a plain HF folder.

        The merged weights are never re-quantized: rounding W + BA back to 4 bits can erase an
        update that small (PEFT's own bnb merge does re-quantize, so it is not used here).
        """
        from afinar.backends import fast_decode

        model = self.model
        fast_decode.unfuse(model)  # fused q/k/v weights (the engine's, or _decoder's) are views serialisers would dedupe
        model = torch_weights.merge_into_dense(model, self.dtype, quantized=self.cfg.model.quantization != "none")
        model.save_pretrained(str(folder))

    def memory(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"memory_mb": torch.cuda.memory_allocated() / 2**20, "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}
        if self.device.type == "mps":
            now = torch.mps.current_allocated_memory() / 2**20
            return {"memory_mb": now, "peak_memory_mb": torch.mps.driver_allocated_memory() / 2**20}
        now, peak = hardware.process_memory_mb()
        return {"memory_mb": now, "peak_memory_mb": peak}

    def describe(self) -> dict[str, Any]:
        import peft
        import transformers

        info: dict[str, Any] = {
            "backend": "torch",
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else hardware.detect().name,
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        }
        if self.cfg.model.quantization != "none":
            info["quantization"] = "bitsandbytes NF4" + (", double quant" if self.cfg.model.double_quant else "") + (
                " (model.quantization=int4 maps to NF4 on torch)" if self.cfg.model.quantization == "int4" else "")
            import bitsandbytes

            info["versions"]["bitsandbytes"] = bitsandbytes.__version__
        if self.model is not None:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            info["trainable_parameters"] = trainable
        return info
