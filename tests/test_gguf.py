"""GGUF export, read back by an independent reader: transformers' own GGUF loader (model and tokenizer).

Tiny random models of each supported architecture, saved by the installed transformers, are written
as f16 and q8_0 and loaded with `from_pretrained(..., gguf_file=...)`. Errors are measured relative to
the largest logit of the HF model. Measured here (2 prompts each): f16 0.04-0.12%, q8_0 1.0-2.7%.
Tolerances: F16_REL = 0.5%, Q8_REL = 6%. Using the default rope theta instead of the model's moves the
llama logits by 34% (checked below), leaving out the Q/K permutation by 69%: neither could pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from afinar import models
from afinar.cli import app
from afinar.errors import AfinarError
from afinar.gguf_export import rope_settings, write_gguf

F16_REL, Q8_REL = 0.005, 0.06
PROMPTS = ["Qual foi a melhor classificação do Farense?", "Onde joga o Farense? No Estádio de São Luís, em Faro."]
SENTENCE = "O Farense foi fundado em 1910 e jogou na Taça UEFA em 1995/96; o estádio é o São Luís, em Faro."
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048, initializer_range=0.1)  # 0.1: logits large enough that rope errors show


def _smollm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.resolve("smollm2-135m-instruct").path)


def _llama(folder: Path) -> Path:
    """Llama shape, non-default rope theta, SmolLM2's byte-level BPE tokenizer with its chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _smollm_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **SHAPE)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _qwen2(folder: Path) -> Path:
    """Qwen2 with q/k/v biases, tied embeddings, a padded vocabulary (as Qwen2 ships) and Qwen2's pre-tokenizer."""
    import torch
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = _smollm_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    config = Qwen2Config(vocab_size=len(tok) + 8, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True, **SHAPE)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # HF initialises biases to zero: make them matter
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _mistral(folder: Path) -> Path:
    from afinar.synthetic import make_random_model

    return make_random_model(folder, "tiny")  # Mistral's SentencePiece tokenizer.model


BUILDERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2}
HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = BUILDERS[arch](tmp_path_factory.mktemp("gguf") / arch)
        return built[arch]

    return get


def logits(model, tok, text: str) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([tok(text)["input_ids"]])).logits[0].numpy()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def hf_model(folder: Path, **config_changes):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    for key, value in config_changes.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_f16_logits_tokenizer_and_chat_template_read_back(arch, hf_folder):
    from transformers import AutoTokenizer

    folder = hf_folder(arch)
    out = write_gguf(folder, folder.parent / f"{arch}-f16.gguf", "f16")
    assert [p.name for p in folder.parent.iterdir() if p.is_file()] == [out.name]  # no temporary file left
    model, tok = hf_model(folder), AutoTokenizer.from_pretrained(folder)
    loaded = load_gguf(out)
    assert type(loaded).__name__ == HF_CLASS[arch]
    want = model.config
    for key in ("max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(loaded.config, key) == getattr(want, key), key
    assert loaded.config.rms_norm_eps == pytest.approx(want.rms_norm_eps)
    for text in PROMPTS:
        assert rel_err(logits(loaded, tok, text), logits(model, tok, text)) < F16_REL

    gguf_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in (SENTENCE, *PROMPTS):
        assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"], text
    assert gguf_tok.chat_template == tok.chat_template
    assert (gguf_tok.bos_token, gguf_tok.eos_token) == (tok.bos_token, tok.eos_token)
    chat = [{"role": "user", "content": SENTENCE}]
    assert gguf_tok.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)

    if arch == "llama":  # the comparison can see rope errors: the default theta is far off
        default_theta = hf_model(folder, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        assert rel_err(logits(default_theta, tok, PROMPTS[0]), logits(model, tok, PROMPTS[0])) > 20 * F16_REL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # mistral q8_0: the CLI test below
def test_q8_0_logits_read_back_and_tensor_types(arch, hf_folder):
    import gguf
    from transformers import AutoTokenizer

    folder = hf_folder(arch)
    out = write_gguf(folder, folder.parent / f"{arch}-q8_0.gguf", "q8_0")
    model, tok = hf_model(folder), AutoTokenizer.from_pretrained(folder)
    loaded = load_gguf(out)
    for text in PROMPTS:
        assert rel_err(logits(loaded, tok, text), logits(model, tok, text)) < Q8_REL
    if arch == "qwen2":  # llama.cpp's rule: 2-D weights (embeddings too) Q8_0; norms and biases F32
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
        Q = gguf.GGMLQuantizationType
        assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == Q.Q8_0
        assert types["blk.0.attn_q.bias"] == types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == Q.F32
        assert "output.weight" not in types  # tied: llama.cpp reuses token_embd


def test_older_config_form_and_llama3_rope_scaling(hf_folder, tmp_path):
    """`rope_theta` + `rope_scaling` at the top level (transformers 4 configs); Llama 3.x frequency scaling."""
    import gguf
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = tmp_path / "old"
    shutil.copytree(hf_folder("mistral"), folder)
    config = json.loads((folder / "config.json").read_text())
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    config.pop("rope_parameters", None)
    config.update(model_type="llama", rope_theta=500000.0, rope_scaling=scaling)
    (folder / "config.json").write_text(json.dumps(config))
    assert rope_settings(config) == (500000.0, scaling)
    assert rope_settings({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}) == (1e6, {"rope_type": "default"})

    reader = gguf.GGUFReader(write_gguf(folder, tmp_path / "old.gguf"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("llama.rope.freq_base") == 500000.0
    assert (field("llama.context_length"), field("llama.rope.dimension_count")) == (2048, 16)
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.add_bos_token")) == ("llama", True)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    # llama.cpp divides each base frequency by its factor; transformers computes the scaled ones directly.
    hf = LlamaConfig(**{**SHAPE, "rope_parameters": {"rope_theta": 500000.0, **scaling}})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    np.testing.assert_allclose(np.asarray(freqs.data), (base / scaled).numpy(), rtol=1e-5)
    assert len(set(np.asarray(freqs.data).round(3))) > 2  # the window holds unscaled, scaled and smoothed ones


def test_unsupported_architecture_and_type_are_clear_errors(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(AfinarError, match=r"'gpt2'.*llama, mistral, qwen2"):
        write_gguf(folder, tmp_path / "x.gguf")
    with pytest.raises(AfinarError, match=r"'q4_k'.*f16, q8_0"):
        write_gguf(folder, tmp_path / "x.gguf", "q4_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_cli_export_run_to_gguf(tmp_path):
    """A real 2-step run through `afinar export RUN --to gguf --type q8_0`: reads back as base + adapter in plain PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.synthetic import make_tiny_run

    run = make_tiny_run(tmp_path / "run", steps=2)
    base = tmp_path / "run-model"
    out = tmp_path / "out" / "model.gguf"
    invoke = lambda *args: CliRunner().invoke(app, ["export", *map(str, args)])  # noqa: E731
    result = invoke(run, "--to", "gguf", out, "--type", "q8_0")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]  # the merged folder is gone

    # The merged folder had only tokenizer.json (transformers 5 drops tokenizer.model on save):
    # the SentencePiece scores were rebuilt from the merges and must tokenize the same.
    tok = AutoTokenizer.from_pretrained(base)
    gguf_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in (SENTENCE, *PROMPTS):
        assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"], text
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(run)).eval()
    loaded = load_gguf(out)
    for text in PROMPTS:
        assert rel_err(logits(loaded, tok, text), logits(reference, tok, text)) < Q8_REL

    def assert_user_error(result, needle):
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output

    assert_user_error(invoke(run, "--to", "gguf", out), "already exists")
    assert_user_error(invoke(run, "--to", "gguf", tmp_path / "model.bin"), "must end in .gguf")
    assert_user_error(invoke(run, "--to", "gguf", tmp_path / "m.gguf", "--type", "q4_k"), "choose one of f16, q8_0")
    assert_user_error(invoke(run, "--to", "gguf"), "afinar export RUN --to gguf OUT.gguf")
    assert_user_error(invoke(run, "--to", "peft", "--type", "q8_0"), "--type goes with --to gguf")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    # The run is verified against its base first (verify.py): a base changed under the run is named before
    # any export work; the architecture refusal itself is test_unsupported_architecture_and_type_are_clear_errors.
    assert_user_error(invoke(run, "--to", "gguf", tmp_path / "m.gguf"), "does not belong to model.base")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "model.bin").exists()
