"""PyTorch backend: transformers + PEFT LoRA, bitsandbytes NF4 for QLoRA; CUDA, MPS or CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from afinar import hardware
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
        self.device = pick_device()
        dtype = cfg.model.compute_dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        self.dtype = getattr(torch, dtype)
        self.model = None
        self.optimizer = None
        self.tokenizer = None

    # ------------------------------------------------------------ loading

    def load(self, model: ResolvedModel, adapter_dir: str | Path | None = None, trainable: bool = True):
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quantize = self.cfg.model.quantization == "nf4"
        if quantize and self.device.type == "mps":
            raise AfinarError(
                "model.quantization=nf4 needs bitsandbytes, which does not run on Apple's MPS. "
                "Use --set model.quantization=none (LoRA) on this Mac."
            )
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if quantize:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=self.cfg.model.double_quant,
                bnb_4bit_compute_dtype=self.dtype,
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

        torch.manual_seed(self.cfg.train.seed)  # LoRA init is random: same seed, same adapter
        merge = not trainable and adapter_dir is not None and self.device.type == "cpu"
        if merge and quantize:
            # bitsandbytes' CPU 4-bit inference kernels are slow (seconds per token here):
            # answer with the dequantized NF4 weights in plain Linear layers instead, which
            # compute what training computed, several times faster.
            _dequantize_4bit(base, self.dtype)
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
                _keep_cpu_4bit_differentiable(self.model)
            if self.cfg.train.gradient_checkpointing:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                self.model.enable_input_require_grads()
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(
                params, lr=self.cfg.train.learning_rate, weight_decay=self.cfg.train.weight_decay,
                fused=self.device.type == "cuda",
            )
            self.model.train()
        else:
            self.model.eval()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self.tokenizer

    # ------------------------------------------------------------ training

    def _tensors(self, batch: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        return ids.to(self.device), attn.to(self.device), targets.to(self.device)

    def loss_sum(self, batch: list[Encoded]) -> tuple[torch.Tensor, int]:
        """Sum of next-token cross-entropy over target tokens.

        Only the hidden states of target positions go through the LM head: answers are a
        fraction of each sequence, and the head (vocab x hidden) is the largest matmul in a
        small model, so this skips most of its work and never builds full-vocabulary logits
        for prompt tokens. `tests/test_torch_backend.py` checks it equals the plain HF loss.
        """
        ids, attn, targets = self._tensors(batch)
        targets = targets[:, 1:]
        keep = targets != IGNORE
        n = int(keep.sum())
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        head = base.get_output_embeddings()
        if getattr(base.config, "final_logit_softcapping", None) is None and hasattr(base, "get_decoder"):
            hidden = base.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
            logits = head(hidden[:, :-1][keep])
        else:  # models that transform logits after the head: take the plain path
            logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1][keep]
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), n

    def forward_backward(self, batch: list[Encoded], scale: float) -> tuple[float, int]:
        loss, n = self.loss_sum(batch)
        (loss * scale).backward()
        return float(loss.detach()), n

    def optimizer_step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

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

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        width = max(len(p) for p in prompts)
        # Left padding: every row's next token sits in the same (last) column.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        was_training = self.model.training
        self.model.eval()
        torch.manual_seed(seed)
        sample = temperature > 0
        try:
            out = self.model.generate(
                input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=sample,
                temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
                pad_token_id=pad, eos_token_id=eos,
            )
        finally:
            self.model.train(was_training)
        results = []
        for row in out[:, width:].tolist():
            results.append(row[: row.index(eos)] if eos in row else row)
        return results

    # ------------------------------------------------------------ reporting

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
        if self.cfg.model.quantization == "nf4":
            import bitsandbytes

            info["versions"]["bitsandbytes"] = bitsandbytes.__version__
        if self.model is not None:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            info["trainable_parameters"] = trainable
        return info


def _keep_cpu_4bit_differentiable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during training.

    bitsandbytes 0.50 repacks a Linear4bit's weight into an AVX512-BF16 layout the first time it
    runs in eval mode without gradients (our validation pass), and the repacked path has no
    backward: every later training step silently gets zero gradients. Tested in
    tests/test_torch_backend.py::test_qlora_cpu_trains_after_validation.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _dequantize_4bit(model, dtype) -> None:
    """Replace every bitsandbytes Linear4bit by an nn.Linear holding its dequantized weight."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                         dtype=dtype, device=child.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype))
                    if child.bias is not None:
                        linear.bias.copy_(child.bias.to(dtype))
                setattr(parent, name, linear)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_loaded_in_4bit = False
