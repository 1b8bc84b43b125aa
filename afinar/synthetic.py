"""Random-weight models of real shapes, with Mistral's real tokenizer, for tests and benchmarks.

Shipped with afinar so that a user can test an integration (their backend against `afinar
serve`) without a model download: `python -m afinar.synthetic tiny-run FOLDER` trains a tiny
real run in seconds. It needs the `mistral-common` package (the `[test]` extra) and nothing
from the repository: the data it trains on are the bundled sample (`bundled:farense/...`).

Speed and memory do not depend on weight values, so a random Mistral-7B-shaped model is a
faithful benchmark model; a 2-layer one is a fast, realistic unit-test model. The tokenizer
is Mistral-7B's own (v1, 32k vocab) as shipped by the `mistral-common` package, with the
chat template mistral-common generates for it. Nothing is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from afinar import atomic
from afinar.errors import AfinarError

SHAPES = {
    # name: MistralConfig overrides
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=2048),
    # Big enough that a training step's activations outweigh the framework (tests/test_memory.py).
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, max_position_embeddings=2048),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=32768),
}


def mistral_tokenizer(folder: str | Path):
    """Write Mistral-7B's tokenizer (from mistral-common) with its chat template into `folder`."""
    try:
        import mistral_common
        from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template
    except ImportError:
        raise AfinarError("The Mistral tokenizer comes from the 'mistral-common' package: "
                          "pip install 'afinar[test]' (or pip install mistral-common)") from None
    from transformers import LlamaTokenizer

    source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, folder / "tokenizer.model")
    # In transformers 5, LlamaTokenizerFast(vocab_file=...) silently ignores the file: use this path.
    tok = LlamaTokenizer.from_pretrained(folder, legacy=False, add_bos_token=True)
    tok.chat_template = convert_tokenizer_to_chat_template(source)
    tok.save_pretrained(folder)
    return tok


def make_random_model(folder: str | Path, shape: str = "tiny", seed: int = 0, dtype: str = "float32") -> Path:
    """A MistralForCausalLM with random weights and the real tokenizer, saved as an HF folder (atomic)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    if shape not in SHAPES:
        raise AfinarError(f"Unknown model shape {shape!r}; choose from {sorted(SHAPES)}.")
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    with atomic.folder(folder) as tmp:
        tok = mistral_tokenizer(tmp)
        config = MistralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               tie_word_embeddings=False, **SHAPES[shape])
        torch.manual_seed(seed)
        model = MistralForCausalLM(config).to(getattr(torch, dtype))
        model.save_pretrained(tmp)
    return folder


def make_tiny_run(folder: str | Path, steps: int = 2) -> Path:
    """A real run folder on the tiny model, trained `steps` steps on the bundled data (seconds on CPU).

    What the serving tests, the Express example's test and benchmarks/serve_load.py serve:
    every layer of a real run (adapter, config, metadata) at a size that answers instantly.
    The model is kept beside the run, in `<folder>-model/`.
    """
    from afinar.config import load_config
    from afinar.train import run_training

    folder = Path(folder)
    if (folder / "metadata.json").is_file():
        return folder
    model = make_random_model(folder.with_name(folder.name + "-model"), "tiny")
    cfg = load_config(None, [
        f"model.base={model}", "model.quantization=none", "model.compute_dtype=float32",
        "data.train=bundled:farense/train.jsonl", "data.val=null", "train.batch_size=2", "train.grad_accumulation=1",
        "train.max_seq_length=128", "train.warmup_steps=1", f"train.max_steps={steps}", "train.save_every=0",
    ])
    return run_training(cfg, folder).output


if __name__ == "__main__":  # python -m afinar.synthetic tiny-run FOLDER: prints the run folder
    import sys

    from afinar.quiet import quiet_libraries

    quiet_libraries()
    if len(sys.argv) != 3 or sys.argv[1] != "tiny-run":
        sys.exit("usage: python -m afinar.synthetic tiny-run FOLDER")
    print(make_tiny_run(sys.argv[2]))
