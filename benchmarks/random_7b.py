"""Shared by the GPU benchmarks: the random Mistral-7B-shaped model, built in GPU memory, and its data.

The model is initialised directly on the GPU in bf16 and quantized there to NF4 (double
quant, as `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)` does), so
no 14 GB checkpoint is written or read. Speed and memory do not depend on weight values.
"""

from __future__ import annotations

import datetime
import json
import platform
import random
import sys
from pathlib import Path

import torch

from afinar import data
from afinar.synthetic import SHAPES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def tokenizer(path: str | None):
    """Mistral-7B's tokenizer: a saved folder (the GPU machine has no mistral-common), or built here."""
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    from afinar.synthetic import mistral_tokenizer

    return mistral_tokenizer(REPO / ".bench" / "tok")


def build_base(shape: str, tok, seed: int = 0, quantize: bool = True, dtype=None):
    """A MistralForCausalLM with random weights on the GPU (CPU without one), NF4 unless told otherwise.

    `dtype`: bf16 on the GPU, fp32 on the CPU (CPU smoke runs: bf16 matmuls are slow there).
    """
    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           tie_word_embeddings=False, **SHAPES[shape])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device()):
        model = MistralForCausalLM._from_config(config, dtype=dtype)
    if quantize:
        quantize_nf4(model, dtype)
    model.eval()
    return model


def dtype_overrides() -> list[str]:
    """Config overrides that keep afinar's compute dtype that of `build_base`'s model (fp32 on a CPU)."""
    return [] if torch.cuda.is_available() else ["model.compute_dtype=float32"]


def quantize_nf4(model, dtype) -> None:
    """Every Linear of the decoder (not the LM head, as transformers leaves it) to bitsandbytes NF4."""
    import bitsandbytes as bnb

    for parent in list(model.model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=q)._quantize(child.weight.device)
                # bitsandbytes repacks CPU 4-bit weights at the first no-grad forward, after which they
                # no longer dequantize; the benchmarks dequantize after generating (CPU smoke runs).
                q.support_avx512bf16_for_cpu = False
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
    model.is_loaded_in_4bit = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def chat_examples(tok, n: int, seed: int = 0, max_len: int = 512, longest: int = 330) -> list[data.Encoded]:
    """Question/answer chats of 20-`longest` tokens (prompt ~3-60 words, answer ~5-250 at the default
    330, both scaled down for shorter `longest`), encoded as afinar trains them."""
    rng = random.Random(seed)
    words = sorted(w[1:] for w in tok.get_vocab() if w.startswith("▁") and w[1:].isalpha() and len(w) > 3)
    scale = min(1.0, longest / 330)
    out = []
    while len(out) < n:
        q = " ".join(rng.choices(words, k=rng.randint(3, max(3, int(60 * scale))))) + "?"
        a = " ".join(rng.choices(words, k=rng.randint(5, max(5, int(250 * scale))))) + "."
        enc = data.encode(data.Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}], None),
                          tok, max_len)
        if 20 <= len(enc.input_ids) <= longest:
            out.append(enc)
    return out


def save_bf16(shape: str, tok, folder: Path, seed: int = 0) -> Path:
    """`build_base(shape, tok, seed)`'s weights unquantized (bf16) with the tokenizer, as an HF folder.

    For stacks that load and quantize a model themselves (Unsloth): the same random weights as
    every other row. Kept between runs: a marker file names the shape and seed it holds.
    """
    marker = {"shape": shape, "seed": seed, "vocab": len(tok)}
    stamp = Path(folder) / "afinar-benchmark.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == marker:
        return Path(folder)
    model = build_base(shape, tok, seed=seed, quantize=False, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    stamp.write_text(json.dumps(marker))
    del model
    free_gpu()
    return Path(folder)


def environment(argv: list[str], gpu: bool = True) -> dict:
    """Command, date, versions and (`gpu`: asking CUDA, which starts a context) the GPU's name and memory."""
    import peft
    import transformers

    info = {"command": " ".join(["python"] + argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}}
    try:
        import bitsandbytes

        info["versions"]["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    try:
        import triton

        info["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    if gpu and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def free_gpu() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge_results(path: Path, key: str, section: dict, env: dict) -> None:
    """Write `section` under `key` of the results file, keeping what the other benchmark wrote."""
    from afinar.atomic import write_json

    path = Path(path)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = {"environment": env, **section}
    write_json(path, results)
