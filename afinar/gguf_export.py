"""A plain Hugging Face causal-LM folder as one GGUF file, for llama.cpp, Ollama and LM Studio.

llama.cpp's `convert_hf_to_gguf.py` is the reference for what goes in: the metadata keys, the
tensor names, which tensors stay F32, the Q/K row permutation its `llama` architecture expects,
and the tokenizer fields. The `gguf` package (llama.cpp's own Python library) does the file
format, the tensor names and the Q8_0 quantization. Tensors are converted and written one at a
time, so a 7B model needs the memory of one tensor, not of the model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afinar import atomic
from afinar.errors import AfinarError
from afinar.gguf_vocab import add_tokenizer

# Hugging Face model_type -> GGUF architecture. llama.cpp runs Mistral as `llama`.
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
QTYPES = ("f16", "q8_0")


@dataclass
class _Tensor:
    """One tensor of the output file: where it comes from and how it is stored."""

    name: str  # GGUF name
    source: str | None  # HF name in the safetensors files; None for a computed tensor
    shape: tuple[int, ...]
    ggml_type: Any  # gguf.GGMLQuantizationType
    permute_heads: int | None = None  # llama Q/K rows: reorder for this many heads
    data: Any = None  # the values of a computed tensor (numpy, float32)


def check_supported(config: dict, where: str = "config.json") -> str:
    """The GGUF architecture for an HF config, or a clear error naming the model_type."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise AfinarError(
            f"{where}: model_type {model_type!r} cannot be exported to GGUF by afinar; supported: "
            f"{', '.join(sorted(ARCHS))}. For other architectures, export with --merged and convert that "
            "folder with llama.cpp's convert_hf_to_gguf.py."
        )
    return ARCHS[model_type]


def write_gguf(hf_folder: Path, out_file: Path, qtype: str = "f16") -> Path:
    """Convert the HF causal-LM folder `hf_folder` into the GGUF file `out_file` (atomic).

    `qtype`: "f16" (2-D weights F16) or "q8_0" (2-D weights Q8_0); norms, biases and other 1-D
    tensors stay F32 either way, as llama.cpp writes them.
    """
    import gguf

    hf_folder, out_file = Path(hf_folder), Path(out_file)
    if qtype not in QTYPES:
        raise AfinarError(f"GGUF type {qtype!r} is not supported; choose one of {', '.join(QTYPES)}.")
    config_file = hf_folder / "config.json"
    if not config_file.is_file():
        raise AfinarError(f"{hf_folder}: no config.json. Pass a Hugging Face model folder (afinar export RUN --merged OUT writes one).")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    arch = check_supported(config, str(config_file))
    ftype = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    files = _safetensors_files(hf_folder)

    # gguf's notes on unusual tokenizer files ("Unknown separator token ...") are for converter authors.
    logging.getLogger("gguf").setLevel(logging.ERROR)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(out_file.stem)
    rope_freqs = _add_hparams(writer, config, arch)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, hf_folder, config["vocab_size"])
    plan = _plan(config, arch, files, qtype, rope_freqs)
    for t in plan:
        _add_tensor_info(writer, t)
    _write_atomically(writer, plan, files, out_file)
    return out_file


def _safetensors_files(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """HF tensor name -> (the safetensors file that holds it, its shape); sharded folders included."""
    from safetensors import safe_open

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            found.update({name: (path, tuple(f.get_slice(name).get_shape())) for name in f.keys()})
    if not found:
        raise AfinarError(f"{folder}: no *.safetensors weights. Save the model with save_pretrained (safetensors is its default).")
    return found


def rope_settings(config: dict) -> tuple[float | None, dict]:
    """(rope theta, scaling parameters) from a config of either transformers generation.

    transformers 5 writes both inside `rope_parameters`; older configs have a top-level
    `rope_theta` and a `rope_scaling` dict (its kind under `type` or `rope_type`).
    """
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    theta = params.pop("rope_theta", config.get("rope_theta"))
    kind, legacy_kind = params.pop("rope_type", None), params.pop("type", None)
    kind = kind or legacy_kind or "default"
    return theta, {**params, "rope_type": kind}


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_hparams(writer, config: dict, arch: str):
    """The architecture keys llama.cpp reads; returns llama3 rope frequency factors, if any."""
    import gguf

    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == "llama":
        writer.add_rope_dimension_count(_head_dim(config))
    theta, scaling = rope_settings(config)
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    kind, factor = scaling["rope_type"], scaling.get("factor")
    if kind == "default":
        return None
    if kind == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(scaling.get("original_max_position_embeddings") or config["max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast), ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):
            if scaling.get(key) is not None:
                add(scaling[key])
    elif kind == "llama3" and arch == "llama":
        return llama3_rope_factors(config, theta if theta is not None else 10000.0, scaling)
    else:
        raise AfinarError(f"config.json: rope scaling {scaling} is not supported for GGUF export (supported: linear, yarn, llama3).")
    return None


def llama3_rope_factors(config: dict, theta: float, scaling: dict):
    """Llama 3.x frequency scaling as the per-dimension divisors llama.cpp reads from `rope_freqs`."""
    import numpy as np

    dim = _head_dim(config)
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _plan(config: dict, arch: str, files: dict, qtype: str, rope_freqs) -> list[_Tensor]:
    """Every output tensor with its GGUF name, shape and storage type, before any data is read."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    plan = []
    if rope_freqs is not None:
        plan.append(_Tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, rope_freqs.shape,
                            gguf.GGMLQuantizationType.F32, data=rope_freqs))
    for source, (path, shape) in files.items():
        if source.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the rope settings by every runtime
        if source == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # tied: llama.cpp reuses token_embd when there is no output tensor
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise AfinarError(f"{path}: tensor {source!r} has no GGUF name for architecture {arch!r}; "
                              "the folder is not a plain llama/mistral/qwen2 causal LM.")
        permute = None
        if arch == "llama" and source.endswith(("q_proj.weight", "q_proj.bias")):
            permute = heads
        elif arch == "llama" and source.endswith(("k_proj.weight", "k_proj.bias")):
            permute = kv_heads
        plan.append(_Tensor(name, source, shape, _storage_type(name, shape, qtype), permute))
    return plan


def _storage_type(name: str, shape: tuple[int, ...], qtype: str):
    """llama.cpp's rule: 1-D tensors, norms and biases F32; other weights the chosen type."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return T.F32
    if qtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return T.F16  # f16, or rows Q8_0's 32-value blocks cannot cover (llama.cpp falls back the same way)


def _add_tensor_info(writer, t: _Tensor) -> None:
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if t.ggml_type == T.Q8_0:
        byte_shape = gguf.quant_shape_to_byte_shape(t.shape, T.Q8_0)
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=T.Q8_0)
    else:
        dtype = np.dtype(np.float16 if t.ggml_type == T.F16 else np.float32)
        writer.add_tensor_info(t.name, t.shape, dtype, math.prod(t.shape) * dtype.itemsize, raw_dtype=t.ggml_type)


def permute_qk(weights, n_heads: int):
    """Reorder Q/K rows from HF's rotate-half layout to the interleaved pairs llama.cpp's llama rope uses."""
    return (weights.reshape(n_heads, 2, weights.shape[0] // n_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_data(t: _Tensor, files: dict):
    import gguf
    import torch
    from safetensors import safe_open

    if t.data is not None:
        return t.data
    with safe_open(str(files[t.source][0]), framework="pt") as f:
        data = f.get_tensor(t.source).to(torch.float32).numpy()
    if t.permute_heads:
        data = permute_qk(data, t.permute_heads)
    return gguf.quants.quantize(data, t.ggml_type)


def _write_atomically(writer, plan: list[_Tensor], files: dict, out_file: Path) -> None:
    """Stream header, metadata and tensors into a temporary file beside `out_file`, then rename it."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_file.parent, prefix=f".{out_file.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(_tensor_data(t, files))
        writer.flush()
        for f in writer.fout:
            os.fsync(f.fileno())
        writer.close()
        os.chmod(tmp, 0o666 & ~atomic.umask())  # mkstemp makes 0600; a model server may run as another user
        os.replace(tmp, out_file)
        atomic.fsync_dir(out_file.parent)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
