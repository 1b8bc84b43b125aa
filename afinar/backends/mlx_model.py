"""MLX: mlx-lm models and LoRA layers on Apple Silicon (and MLX's CPU build on Linux): what training
and answering share (loading, the answer-only loss, adapter files, memory, description).

The training loop, schedule, accumulation, evaluation, checkpoints and run folder are the
shared core's; this module only turns batches into MLX arrays and back into floats. The
adapter is written in PEFT format (so it loads in plain PEFT on NVIDIA) and the run folder
also carries mlx-lm's own format (see afinar/adapters.py).

QLoRA here means MLX's affine 4-bit quantization (group size 64) of the base's Linear layers:
MLX has no NF4. A folder already saved in MLX 4-bit (config.json's `quantization`, as mlx-community
models ship) is used as saved: mlx-lm builds its quantized layers, and nothing is quantized again.
The tokenizer is the Hugging Face one, exactly as in the torch backend, so both backends see the
same token ids for the same data.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np

from afinar import adapters, batches, data, hardware, models
from afinar import targets as lora_targets
from afinar.backends import mlx_config
from afinar.config import Config
from afinar.data import Encoded
from afinar.errors import AfinarError
from afinar.models import ResolvedModel

GROUP_SIZE, BITS = 64, 4
log = logging.getLogger("afinar")
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


class MLXModel:
    """A loaded mlx-lm model with LoRA layers (new, or a saved adapter's): the base of MLXTrainer and MLXAnswerer."""

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
        self.num_layers = 0
        self.stop_ids: list[int] = []  # every token that ends an answer (set by _load)
        self.targets = None  # the LoRA targets resolved for this model (set by _load)
        self.saved_quantization: dict | None = None

    # ------------------------------------------------------------ loading

    def _load(self, model: ResolvedModel, adapter_dir: str | Path | None, checkpointing: bool) -> None:
        """The base (4-bit for QLoRA), frozen, with LoRA layers; the saved adapter's weights if given."""
        from mlx_lm.tuner.utils import linear_to_lora_layers
        from mlx_lm.utils import load_model
        from transformers import AutoTokenizer

        mx, nn = self.mx, self.nn
        path = self.base_path = models.local_folder(model)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise AfinarError(f"MLX could not read the config of model.base={model.name!r} ({path}): {e}") from None
        self.saved_quantization = self._check_saved_quantization(model, config)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            # The keys mlx-lm reads at the top level of config.json, from a transformers-5 config (mlx_config.py);
            # an MLX 4-bit folder's quantized layers are built as they were saved.
            net, _ = load_model(path, model_config=mlx_config.read_mlx_keys(path))
        except (OSError, FileNotFoundError, ValueError) as e:
            raise AfinarError(f"MLX could not load model.base={model.name!r} from {path}: {e}") from None
        if self.tokenizer.eos_token_id is None:
            raise AfinarError(f"The tokenizer of {model.name!r} has no EOS token: answers could never end.")
        self.stop_ids = data.stop_token_ids(self.tokenizer, path)  # EOS + generation_config + end of turn
        net.set_dtype(self.dtype)  # floating-point parameters only: packed 4-bit weights stay as they are
        text = config.get("text_config") or config  # multimodal checkpoints nest the language model's
        self.model_type = config["model_type"]
        self.hidden_size, self.vocab_size = text.get("hidden_size", 0), text.get("vocab_size", len(self.tokenizer))
        if self.cfg.model.quantization != "none" and self.saved_quantization is None:
            quantize_base(net)
        net.freeze()
        layers = net.layers
        if checkpointing:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(layers[0])  # mlx-lm's way: recompute each block's activations in backward
        self.num_layers = len(layers)
        lora = self.cfg.lora
        # The same resolution as the torch backend (targets.py): fused qkv_proj, all-linear, clear errors;
        # on transformers' names, which the adapter files use (adapters.hf_path).
        self.targets = lora_targets.resolve(lora.target_modules, [
            adapters.hf_path(n) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))])
        for notice in self.targets.notices:
            log.warning(notice)
        keys = self.targets.block_keys()
        mx.random.seed(self.cfg.train.seed)  # LoRA init is random: same seed, same adapter
        linear_to_lora_layers(net, self.num_layers, {
            "rank": lora.rank, "scale": lora.alpha / lora.rank, "dropout": lora.dropout, "keys": keys})
        self.model = net
        if adapter_dir is not None:
            self._load_peft(Path(adapter_dir))

    def _check_saved_quantization(self, model: ResolvedModel, config: dict) -> dict | None:
        """The `quantization` of an MLX 4-bit folder (used as saved), None for a full-precision one;
        an error for what MLX cannot train on, or for plain LoRA asked of a 4-bit base."""
        saved = models.saved_quantization(config)
        where = f"model.base={model.name!r} is stored"
        if saved is None:
            return None
        if saved != "mlx":
            raise AfinarError(f"{where} quantized with '{saved}', which the MLX backend cannot load. Use the "
                              "full-precision model (quantized at load) or an MLX 4-bit one (mlx-community).")
        if self.cfg.model.quantization == "none":
            raise AfinarError(f"{where} in MLX 4-bit, so training on it is QLoRA: set --set model.quantization=nf4 "
                              "(or int4), or use the full-precision model for plain LoRA.")
        return config.get("quantization") or config.get("quantization_config")

    def _lora_modules(self) -> dict[str, Any]:
        from mlx_lm.tuner.lora import LoRALinear

        return {name: m for name, m in self.model.named_modules() if isinstance(m, LoRALinear)}

    def _load_peft(self, folder: Path) -> None:
        from safetensors.numpy import load_file

        mx = self.mx
        weights = load_file(str(folder / adapters.PEFT_WEIGHTS))
        modules = self._lora_modules()
        for name, module in modules.items():
            prefix = f"{adapters.PEFT_PREFIX}{adapters.hf_path(name)}"
            try:
                a, b = weights.pop(f"{prefix}.lora_A.weight"), weights.pop(f"{prefix}.lora_B.weight")
            except KeyError:
                raise AfinarError(f"{folder}: the adapter has no weights for {name}; it was trained for another model.") from None
            if a.T.shape != module.lora_a.shape or b.T.shape != module.lora_b.shape:
                raise AfinarError(f"{folder}: adapter shapes for {name} do not fit this model or lora.rank.")
            module.lora_a, module.lora_b = mx.array(a.T), mx.array(b.T)
        if weights:
            raise AfinarError(f"{folder}: the adapter has weights this model has no layer for ({sorted(weights)[:3]}...).")

    # ------------------------------------------------------------ the loss

    def _arrays(self, batch: list[Encoded]):
        """Right-padded ids, the flat positions whose next token is a target, and those targets.

        mlx-lm models take no padding mask; with right padding and causal attention, pad
        tokens come after every real token and so cannot change any real position's output.
        """
        p = batches.pad_batch(batch, data.pad_id(self.tokenizer))
        mx = self.mx
        return mx.array(p.ids.astype(np.int32)), mx.array(p.positions.astype(np.int32)), mx.array(p.labels.astype(np.int32))

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

    def eval_loss(self, batch: list[Encoded]) -> tuple[float, int]:
        """(sum of target-token losses, number of targets) without gradients."""
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
            prefix = f"{adapters.PEFT_PREFIX}{adapters.hf_path(name)}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.array(module.lora_a.astype(self.mx.float32)).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.array(module.lora_b.astype(self.mx.float32)).T)
        return out

    def save_adapter(self, folder: Path) -> None:
        """The adapter in PEFT format (also what `adapters.peft_to_mlx` converts for mlx-lm)."""
        from safetensors.numpy import save_file

        from afinar import atomic

        lora = self.cfg.lora
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self._peft_weights(), str(folder / adapters.PEFT_WEIGHTS), metadata={"format": "pt"})
        atomic.write_json(folder / adapters.PEFT_CONFIG, adapters.peft_config(
            lora.rank, lora.alpha, lora.dropout, self.targets.peft_target_modules, str(self.cfg.model.base)))

    # ------------------------------------------------------------ reporting

    def _quantization_text(self) -> str:
        if self.cfg.model.quantization == "none":
            return "none"
        saved = self.saved_quantization
        if saved:
            return (f"MLX {saved.get('mode', 'affine')} {saved.get('bits')}-bit, group size {saved.get('group_size')}, "
                    "as saved in the model folder (not quantized again)")
        return (f"MLX affine {BITS}-bit, group size {GROUP_SIZE} (MLX has no NF4; "
                f"model.quantization={self.cfg.model.quantization} maps to this)")

    def memory(self) -> dict[str, float]:
        mx = self.mx
        if mx.default_device() == mx.gpu:
            return {"memory_mb": mx.get_active_memory() / 2**20, "peak_memory_mb": mx.get_peak_memory() / 2**20}
        now, peak = hardware.process_memory_mb()
        return {"memory_mb": now, "peak_memory_mb": peak}

    def describe(self) -> dict[str, Any]:
        import mlx.core as mx
        import mlx_lm

        device = mx.default_device()
        info: dict[str, Any] = {
            "backend": "mlx",
            "device": "mlx/gpu (Metal)" if device == mx.gpu else "mlx/cpu",
            "device_name": hardware.detect().name,
            "compute_dtype": str(self.dtype).removeprefix("mlx.core."),
            "quantization": self._quantization_text(),
            "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__},
        }
        return info
