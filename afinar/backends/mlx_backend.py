"""MLX backend: mlx-lm models and LoRA layers on Apple Silicon (and MLX's CPU build on Linux).

The training loop, schedule, accumulation, evaluation, checkpoints and run folder are the
shared core's; this module only turns batches into MLX arrays and back into floats. The
adapter is written in PEFT format (so it loads in plain PEFT on NVIDIA) and the run folder
also carries mlx-lm's own format (see afinar/adapters.py).

QLoRA here means MLX's affine 4-bit quantization (group size 64) of the base's Linear layers:
MLX has no NF4. The tokenizer is the Hugging Face one, exactly as in the torch backend, so
both backends see the same token ids for the same data.
"""

from __future__ import annotations

import json
import pickle
import platform
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np

from afinar import adapters, hardware
from afinar.config import Config
from afinar.data import Encoded
from afinar.errors import AfinarError
from afinar.models import ResolvedModel

GROUP_SIZE, BITS = 64, 4
# Architectures whose Model.__call__ is "decoder, then plain LM head": only answer positions
# need the head (the same saving as the torch backend). Others go through the full model.
_PLAIN_HEAD = {"llama", "qwen2", "qwen3", "mistral"}


def quantize_base(net) -> None:
    """MLX affine 4-bit on the transformer blocks' Linear layers only, as bitsandbytes QLoRA does:
    embeddings and the LM head stay in full precision."""
    import mlx.nn as nn

    nn.quantize(net, GROUP_SIZE, BITS, class_predicate=lambda path, m: (
        isinstance(m, nn.Linear) and ".layers." in f".{path}" and m.weight.shape[-1] % GROUP_SIZE == 0))


def on_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def available() -> bool:
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError:
        return False
    return True


def _import():
    try:
        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim
    except ImportError:
        raise AfinarError(
            "backend=mlx needs MLX: pip install 'afinar[mlx]' (on Linux this installs MLX's CPU build)."
        ) from None
    return mx, nn, optim


class MLXBackend:
    name = "mlx"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.mx, self.nn, self.optim = _import()
        mx = self.mx
        dtype = cfg.model.compute_dtype
        if dtype == "auto":  # Metal computes bf16 fast; MLX's CPU build is fastest in fp32
            dtype = "bfloat16" if mx.default_device() == mx.gpu else "float32"
        self.dtype = getattr(mx, dtype)
        self.model = None
        self.base_path: Path | None = None
        self.tokenizer = None
        self.optimizer = None
        self.grads = None
        self.num_layers = 0
        self.micro_batches = 0
        self._loss_and_grad = None

    # ------------------------------------------------------------ loading

    def load(self, model: ResolvedModel, adapter_dir: str | Path | None = None, trainable: bool = True):
        from mlx_lm.tuner.utils import linear_to_lora_layers
        from mlx_lm.utils import load_model
        from transformers import AutoTokenizer

        mx, nn = self.mx, self.nn
        path = self.base_path = Path(model.path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            net, _ = load_model(path)
        except (OSError, FileNotFoundError, ValueError) as e:
            raise AfinarError(f"MLX could not load model.base={model.name!r} from {path}: {e}") from None
        if self.tokenizer.eos_token_id is None:
            raise AfinarError(f"The tokenizer of {model.name!r} has no EOS token: answers could never end.")
        net.set_dtype(self.dtype)
        self.model_type = json.loads((path / "config.json").read_text())["model_type"]
        if self.cfg.model.quantization != "none":
            quantize_base(net)
        net.freeze()
        layers = net.layers
        if trainable and self.cfg.train.gradient_checkpointing:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(layers[0])  # mlx-lm's way: recompute each block's activations in backward
        self.num_layers = len(layers)
        lora = self.cfg.lora
        targets = set(lora.target_modules)
        keys = sorted({name for name, m in layers[0].named_modules()
                       if name.rsplit(".", 1)[-1] in targets and isinstance(m, (nn.Linear, nn.QuantizedLinear))})
        found = {k.rsplit(".", 1)[-1] for k in keys}
        if found != targets:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in layers[0].named_modules()
                            if isinstance(m, (nn.Linear, nn.QuantizedLinear))})
            raise AfinarError(f"lora.target_modules={lora.target_modules}: {sorted(targets - found)} not found. "
                              f"Linear layers in this model: {names}.")
        mx.random.seed(self.cfg.train.seed)  # LoRA init is random: same seed, same adapter
        linear_to_lora_layers(net, self.num_layers, {
            "rank": lora.rank, "scale": lora.alpha / lora.rank, "dropout": lora.dropout, "keys": keys})
        self.model = net
        if adapter_dir is not None:
            self._load_peft(Path(adapter_dir))
        if trainable:
            self.model.train()
            self.optimizer = self.optim.AdamW(learning_rate=self.cfg.train.learning_rate,
                                             weight_decay=self.cfg.train.weight_decay)
            self.optimizer.init(self.model.trainable_parameters())
            self._loss_and_grad = nn.value_and_grad(self.model, self._loss)
        else:
            self.model.eval()
        mx.eval(self.model.parameters())
        if hasattr(mx, "reset_peak_memory"):
            mx.reset_peak_memory()
        return self.tokenizer

    def _lora_modules(self) -> dict[str, Any]:
        from mlx_lm.tuner.lora import LoRALinear

        return {name: m for name, m in self.model.named_modules() if isinstance(m, LoRALinear)}

    def _load_peft(self, folder: Path) -> None:
        from safetensors.numpy import load_file

        mx = self.mx
        weights = load_file(str(folder / adapters.PEFT_WEIGHTS))
        modules = self._lora_modules()
        for name, module in modules.items():
            prefix = f"{adapters.PEFT_PREFIX}{name}"
            try:
                a, b = weights.pop(f"{prefix}.lora_A.weight"), weights.pop(f"{prefix}.lora_B.weight")
            except KeyError:
                raise AfinarError(f"{folder}: the adapter has no weights for {name}; it was trained for another model.") from None
            if a.T.shape != module.lora_a.shape or b.T.shape != module.lora_b.shape:
                raise AfinarError(f"{folder}: adapter shapes for {name} do not fit this model or lora.rank.")
            module.lora_a, module.lora_b = mx.array(a.T), mx.array(b.T)
        if weights:
            raise AfinarError(f"{folder}: the adapter has weights this model has no layer for ({sorted(weights)[:3]}...).")

    # ------------------------------------------------------------ training

    def _arrays(self, batch: list[Encoded]):
        """Right-padded ids, and the flat positions whose next token is a target.

        mlx-lm models take no padding mask; with right padding and causal attention, pad
        tokens come after every real token and so cannot change any real position's output.
        """
        width = max(len(e.input_ids) for e in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = np.full((len(batch), width), pad, dtype=np.int32)
        positions, targets = [], []
        for row, e in enumerate(batch):
            ids[row, : len(e.input_ids)] = e.input_ids
            for t in range(1, len(e.input_ids)):
                if e.loss_mask[t]:
                    positions.append(row * width + t - 1)
                    targets.append(e.input_ids[t])
        mx = self.mx
        return mx.array(ids), mx.array(np.array(positions, dtype=np.int32)), mx.array(np.array(targets, dtype=np.int32))

    def _loss(self, model, ids, positions, targets):
        """Sum of next-token cross-entropy over target positions (fp32)."""
        mx = self.mx
        if self.model_type in _PLAIN_HEAD:
            hidden = model.model(ids)
            hidden = hidden.reshape(-1, hidden.shape[-1])[positions]
            logits = model.lm_head(hidden) if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear(hidden)
        else:
            logits = model(ids)
            logits = logits.reshape(-1, logits.shape[-1])[positions]
        return self.nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="sum")

    def forward_backward(self, batch: list[Encoded], scale: float) -> tuple[float, int]:
        from mlx.utils import tree_map

        mx = self.mx
        ids, positions, targets = self._arrays(batch)
        # MLX's global RNG state cannot be saved and restored, so each micro-batch's dropout
        # draws from a key derived from a counter that checkpoints do save: exact resume.
        mx.random.seed(self.cfg.train.seed * 1_000_003 + self.micro_batches)
        self.micro_batches += 1
        loss, grads = self._loss_and_grad(self.model, ids, positions, targets)
        grads = tree_map(lambda g: g * scale, grads)
        self.grads = grads if self.grads is None else tree_map(lambda a, b: a + b, self.grads, grads)
        mx.eval(loss, self.grads)  # bound the graph to one micro-batch
        return float(loss), int(targets.size)

    def optimizer_step(self, lr: float) -> float:
        from mlx.optimizers import clip_grad_norm
        from mlx.utils import tree_flatten

        mx = self.mx
        max_norm = self.cfg.train.max_grad_norm
        if max_norm > 0:
            grads, norm = clip_grad_norm(self.grads, max_norm)
        else:
            grads = self.grads
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        self.optimizer.learning_rate = mx.array(lr, dtype=mx.float32)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.grads = None
        return float(norm)

    def eval_loss(self, batch: list[Encoded]) -> tuple[float, int]:
        ids, positions, targets = self._arrays(batch)
        was_training = self.model.training
        self.model.eval()
        try:
            loss = self._loss(self.model, ids, positions, targets)
            self.mx.eval(loss)
        finally:
            self.model.train(was_training)
        return float(loss), int(targets.size)

    def _peft_weights(self) -> dict[str, np.ndarray]:
        out = {}
        for name, module in self._lora_modules().items():
            prefix = f"{adapters.PEFT_PREFIX}{name}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.array(module.lora_a.astype(self.mx.float32)).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.array(module.lora_b.astype(self.mx.float32)).T)
        return out

    def save_adapter(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        from afinar import atomic

        lora = self.cfg.lora
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self._peft_weights(), str(folder / adapters.PEFT_WEIGHTS), metadata={"format": "pt"})
        atomic.write_json(folder / adapters.PEFT_CONFIG, adapters.peft_config(
            lora.rank, lora.alpha, lora.dropout, list(lora.target_modules), str(self.cfg.model.base)))

    def is_out_of_memory(self, error: Exception) -> bool:
        text = str(error).lower()
        return isinstance(error, RuntimeError) and ("out of memory" in text or "[metal::malloc]" in text)

    def recover_from_out_of_memory(self) -> None:
        self.grads = None
        self.mx.clear_cache()

    def estimate_memory(self, batch_tokens: int, answer_tokens: int) -> dict[str, float]:
        from mlx.utils import tree_flatten

        mib = 2**20
        trainable = {k for k, _ in tree_flatten(self.model.trainable_parameters())}
        params = tree_flatten(self.model.parameters())
        weights = sum(v.nbytes for k, v in params if k not in trainable)
        lora_bytes = sum(v.nbytes for k, v in params if k in trainable)
        optimizer = sum(v.size * 4 * 3 for k, v in params if k in trainable)  # fp32 gradient + AdamW's two moments
        hidden = self.model.model.embed_tokens.weight.shape[-1] if hasattr(self.model, "model") else 4096
        vocab = self.tokenizer.vocab_size
        activations = batch_tokens * self.num_layers * 18 * hidden * self.dtype.size + answer_tokens * vocab * 8
        parts = {"weights": weights, "lora": lora_bytes, "optimizer": optimizer, "activations": activations}
        out = {k: round(v / mib, 3) for k, v in parts.items()}
        out["total"] = round(sum(parts.values()) / mib, 3)
        out["available"] = round(hardware.available_memory_gb() * 1024 + hardware.process_memory_mb()[0], 1)
        return out

    def save_checkpoint(self, folder: Path) -> None:
        from mlx.utils import tree_flatten

        mx = self.mx
        folder = Path(folder)
        self.save_adapter(folder)
        state = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(str(folder / "optimizer.safetensors"), state)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "micro_batches": self.micro_batches}
        (folder / "rng_state.pkl").write_bytes(pickle.dumps(rng))

    def load_checkpoint(self, folder: Path) -> None:
        from mlx.utils import tree_unflatten

        mx = self.mx
        folder = Path(folder)
        self._load_peft(folder)
        state = mx.load(str(folder / "optimizer.safetensors"))
        self.optimizer.state = tree_unflatten(list(state.items()))
        # Our own file, written by save_checkpoint: unpickling it is safe.
        rng = pickle.loads((folder / "rng_state.pkl").read_bytes())
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        self.micro_batches = rng["micro_batches"]
        mx.eval(self.model.parameters(), self.optimizer.state)

    # ------------------------------------------------------------ inference

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0,
                 on_token: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[int], bool] | None = None) -> list[list[int]]:
        """New token ids per prompt, through the engine (mlx-lm's BatchGenerator, a sampler per row)."""
        # afinar.engine (continuous batching): ask, eval and serve answer through the one engine.
        from afinar.engine import engine_for

        return engine_for(self).generate(prompts, max_new_tokens, temperature, top_p, seed, on_token, should_stop)

    # ------------------------------------------------------------ merged export

    def save_merged(self, folder: Path) -> None:
        """Base + adapter folded into full-precision weights, saved as a plain HF folder.

        Quantized layers are dequantized first and never re-quantized: rounding W + BA back to
        4 bits can erase the fine-tune. mlx-lm's module paths are the HF parameter names.
        """
        from mlx.utils import tree_flatten, tree_unflatten
        from mlx_lm.utils import dequantize_model

        mx = self.mx
        fused = [(name, m.fuse(dequantize=True)) for name, m in self._lora_modules().items()]
        self.model.update_modules(tree_unflatten(fused))
        dequantize_model(self.model)
        weights = dict(tree_flatten(self.model.parameters()))
        mx.save_safetensors(str(Path(folder) / "model.safetensors"), weights, metadata={"format": "pt"})
        config = json.loads((self.base_path / "config.json").read_text())
        for key in ("quantization", "quantization_config"):
            config.pop(key, None)
        config["dtype"] = str(self.dtype).removeprefix("mlx.core.")
        (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))
        if (self.base_path / "generation_config.json").is_file():
            (Path(folder) / "generation_config.json").write_bytes((self.base_path / "generation_config.json").read_bytes())

    # ------------------------------------------------------------ reporting

    def memory(self) -> dict[str, float]:
        mx = self.mx
        if mx.default_device() == mx.gpu:
            return {"memory_mb": mx.get_active_memory() / 2**20, "peak_memory_mb": mx.get_peak_memory() / 2**20}
        now, peak = hardware.process_memory_mb()
        return {"memory_mb": now, "peak_memory_mb": peak}

    def describe(self) -> dict[str, Any]:
        import mlx.core as mx
        import mlx_lm

        from mlx.utils import tree_flatten

        device = mx.default_device()
        info: dict[str, Any] = {
            "backend": "mlx",
            "device": "mlx/gpu (Metal)" if device == mx.gpu else "mlx/cpu",
            "device_name": hardware.detect().name,
            "compute_dtype": str(self.dtype).removeprefix("mlx.core."),
            "quantization": (f"MLX affine {BITS}-bit, group size {GROUP_SIZE} (MLX has no NF4; "
                             f"model.quantization={self.cfg.model.quantization} maps to this)")
            if self.cfg.model.quantization != "none" else "none",
            "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__},
        }
        if self.model is not None:
            info["trainable_parameters"] = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        return info
