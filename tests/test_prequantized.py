"""Pre-quantized bases: a bitsandbytes 4-bit folder on torch, an MLX 4-bit folder on MLX, each used as saved
(never quantized a second time); and the 8 GB Mac preset's 4-bit Mistral-7B fits its memory budget."""

from __future__ import annotations

import json
import warnings

import pytest

from afinar.errors import AfinarError

from conftest import QA, qa_rows, tiny_config, write_jsonl


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequantized-data")
    return write_jsonl(root / "train.jsonl", qa_rows(QA[:6])), write_jsonl(root / "val.jsonl", qa_rows(QA[6:]))


def trained(cfg, output):
    """(trainer after run(), result); the trainer keeps its loaded backend for inspection."""
    from afinar.train import Trainer

    trainer = Trainer(cfg, output)
    return trainer, trainer.run()


# ---------------------------------------------------------------- bitsandbytes 4-bit on torch


@pytest.fixture(scope="module")
def bnb_folder(tiny_model, tmp_path_factory):
    """The tiny model as a `*-bnb-4bit` hub model ships: transformers' save_pretrained of a 4-bit model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    folder = tmp_path_factory.mktemp("bnb") / "tiny-bnb-4bit"
    quantized = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    quantized.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_bnb_4bit_folder_trains_as_saved(bnb_folder, data_files, tmp_path):
    import torch
    from safetensors.torch import load_file

    from afinar.inference import Predictor

    train, val = data_files
    cfg = tiny_config(bnb_folder, "model.quantization=nf4", "train.max_steps=2", train=train, val=val)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, result = trained(cfg, tmp_path / "run")
    # transformers warns when a second quantization config meets the saved one: none was passed
    assert not [w for w in caught if "quantization_config" in str(w.message)], [str(w.message) for w in caught]
    saved = load_file(bnb_folder / "model.safetensors")
    layer = trainer.backend.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit"
    assert torch.equal(layer.weight.data.cpu(), saved["model.layers.0.self_attn.q_proj.weight"])  # the packed bytes as saved
    assert layer.compute_dtype == torch.float32  # the run's dtype, not the bfloat16 the folder was saved with
    meta = json.loads((result.output / "metadata.json").read_text())
    assert result.steps == 2 and meta["final_val_loss"] > 0 and meta["device"]["quantization"].startswith("bitsandbytes NF4")
    answer = Predictor(result.output).ask("Onde joga o Farense?", max_tokens=3)
    assert 0 < answer["completion_tokens"] <= 3


def test_bnb_4bit_folder_refuses_plain_lora_and_mlx(bnb_folder, data_files, tmp_path):
    pytest.importorskip("mlx_lm")
    from afinar.train import run_training

    train, _ = data_files
    with pytest.raises(AfinarError, match=r"4-bit \(bitsandbytes\).*model.quantization=nf4"):
        run_training(tiny_config(bnb_folder, "train.max_steps=1", train=train), tmp_path / "lora")
    with pytest.raises(AfinarError, match="quantized with 'bnb-4bit'.*MLX backend cannot load"):
        run_training(tiny_config(bnb_folder, "backend=mlx", "model.quantization=nf4", "train.max_steps=1", train=train),
                     tmp_path / "mlx")
    assert not (tmp_path / "lora").exists() and not (tmp_path / "mlx").exists()


# ---------------------------------------------------------------- MLX 4-bit on MLX


@pytest.fixture(scope="module")
def mlx_folder(tiny_model, tmp_path_factory):
    """The tiny model as mlx-community ships models: mlx_lm.convert with 4-bit quantization."""
    pytest.importorskip("mlx_lm")
    from mlx_lm import convert

    folder = tmp_path_factory.mktemp("mlx") / "tiny-4bit"
    convert(hf_path=str(tiny_model), mlx_path=str(folder), quantize=True, q_group_size=64, q_bits=4)
    assert json.loads((folder / "config.json").read_text())["quantization"]["bits"] == 4
    return folder


def test_mlx_4bit_folder_trains_as_saved(mlx_folder, data_files, tmp_path, monkeypatch):
    import mlx.core as mx
    import numpy as np

    from afinar.backends import mlx_model
    from afinar.inference import Predictor

    def no_second_quantization(net):
        raise AssertionError("quantize_base ran on an already quantized model")

    monkeypatch.setattr(mlx_model, "quantize_base", no_second_quantization)
    train, val = data_files
    cfg = tiny_config(mlx_folder, "backend=mlx", "model.quantization=nf4", "train.max_steps=2", train=train, val=val)
    trainer, result = trained(cfg, tmp_path / "run")
    saved = mx.load(str(mlx_folder / "model.safetensors"))
    q_proj = trainer.backend.model.model.layers[0].self_attn.q_proj.linear  # under the LoRA layer
    assert type(q_proj).__name__ == "QuantizedLinear" and q_proj.bits == 4
    assert np.array_equal(np.array(q_proj.weight), np.array(saved["model.layers.0.self_attn.q_proj.weight"]))
    meta = json.loads((result.output / "metadata.json").read_text())
    assert result.steps == 2 and meta["final_val_loss"] > 0 and "as saved in the model folder" in meta["device"]["quantization"]
    answer = Predictor(result.output).ask("Onde joga o Farense?", max_tokens=3)
    assert 0 < answer["completion_tokens"] <= 3


def test_mlx_4bit_folder_refuses_plain_lora_and_torch(mlx_folder, data_files, tmp_path):
    from afinar.train import run_training

    train, _ = data_files
    with pytest.raises(AfinarError, match=r"in MLX 4-bit.*model.quantization=nf4"):
        run_training(tiny_config(mlx_folder, "backend=mlx", "train.max_steps=1", train=train), tmp_path / "lora")
    with pytest.raises(AfinarError, match="MLX's 4-bit format.*backend=mlx"):
        run_training(tiny_config(mlx_folder, "backend=torch", "model.quantization=nf4", "train.max_steps=1", train=train),
                     tmp_path / "torch")


# ---------------------------------------------------------------- the 8 GB Mac preset


MAC_8GB_BUDGET = 8 * 2**30 * 2 // 3  # Metal's recommended working set on an 8 GB Mac: about two thirds (~5.3 GiB)


def test_mac_8gb_preset_fits_its_budget():
    """The estimate (memory.py) for the preset's step on the 4-bit Mistral-7B, from the shapes alone.

    mlx-lm builds the real Mistral-7B module tree, quantized as mlx-community's folder is (every
    Linear and the embedding, 4-bit, group 64, bfloat16 scales), with the preset's LoRA layers; MLX
    arrays are lazy, so the sizes come from the shapes and no weight is ever materialised.
    """
    mx = pytest.importorskip("mlx.core")
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import _get_classes

    from afinar import memory
    from afinar.config import load_config, preset_path
    from afinar.synthetic import SHAPES

    cfg = load_config(preset_path("mac-8gb"))
    assert cfg.model.base == "mlx-community/Mistral-7B-Instruct-v0.3-4bit" and cfg.model.quantization != "none"
    config = {"model_type": "mistral", "vocab_size": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
              "tie_word_embeddings": False, **SHAPES["mistral-7b"]}
    model_class, args_class = _get_classes(config)
    net = model_class(args_class.from_dict(config))
    net.set_dtype(mx.bfloat16)
    nn.quantize(net, group_size=64, bits=4)
    net.freeze()
    lora = cfg.lora
    keys = [f"self_attn.{name}" for name in lora.target_modules]
    linear_to_lora_layers(net, len(net.layers), {"rank": lora.rank, "scale": lora.alpha / lora.rank,
                                                   "dropout": lora.dropout, "keys": keys})
    trainable = {k for k, _ in tree_flatten(net.trainable_parameters())}
    params = tree_flatten(net.parameters())
    weight_bytes = sum(v.nbytes for k, v in params if k not in trainable)
    lora_bytes = sum(v.nbytes for k, v in params if k in trainable)
    # 7.25 billion parameters at 4.5 bits (4 + a bfloat16 scale and bias per 64): about 3.8 GiB, as the model card's files
    assert 3.6 * 2**30 < weight_bytes < 4.0 * 2**30
    t = cfg.train
    facts = memory.ModelFacts(
        in_use_bytes=weight_bytes + lora_bytes, weight_bytes=weight_bytes, lora_bytes=lora_bytes,
        trainable_params=sum(v.size for k, v in params if k in trainable), hidden=config["hidden_size"],
        layers=len(net.layers), vocab=config["vocab_size"], activation_itemsize=2,  # bfloat16 on the Mac's GPU
        available_bytes=MAC_8GB_BUDGET, lora_inputs=len(keys) * config["hidden_size"], lora_dropout=lora.dropout)
    # the worst step: a micro-batch of the longest examples, every token an answer token
    estimate = memory.estimate(facts, t.batch_size * t.max_seq_length, t.batch_size * t.max_seq_length,
                               t.gradient_checkpointing)
    assert estimate["total"] < estimate["available"], estimate


def test_mlx_downloads_a_hub_model_before_reading_it(monkeypatch, tmp_path):
    """MLX reads files itself: a hub id (the Mac presets' base) is fetched into the hub cache first."""
    import huggingface_hub

    from afinar import models

    asked = {}

    def snapshot_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub = models.ResolvedModel("mlx-community/Mistral-7B-Instruct-v0.3-4bit", "mlx-community/Mistral-7B-Instruct-v0.3-4bit", "hub")
    assert models.local_folder(hub) == tmp_path and asked["repo_id"] == hub.path and "*.safetensors" in asked["patterns"]

    def offline(repo_id, allow_patterns):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(AfinarError, match="Could not load model.base=.*OSError: no network"):
        models.local_folder(hub)
    local = models.ResolvedModel("x", str(tmp_path), "folder")
    assert models.local_folder(local) == tmp_path
