"""Every model family a user brings (tests/families.py), cell by cell, against independent readers.

Matrix (family x cell), each cell its own test:
  qlora         torch QLoRA (NF4): a few steps on one batch lower its loss; the preset's layer names
                reach every layer they mean (Phi's fused qkv_proj / gate_up_proj too)
  lora          a LoRA run folder (torch, 3 steps) with finite losses and the adapter PEFT expects
  ask           `ask` answers through the model's chat template, stopping within max_tokens
  merged        `afinar export --merged` loaded by plain transformers == plain PEFT (base + adapter)
  mlx-base      afinar's MLX load of the base == transformers' logits (rope read right)
  mlx-adapter   afinar's MLX load of the run's adapter == plain PEFT's logits
  mlx-merged    plain `mlx_lm.load(merged export)` == transformers on the same folder
Logits are compared in fp32 with atol 1e-4 (observed differences are ~2e-5 on logits of size ~10).

Multimodal checkpoints (gemma3-vision) take every cell, text only; then: both backends' merged export
keeps the vision tower, the loss is HF's, an MLX-trained adapter loads in PEFT, the run's mlx/ adapter
loads in plain mlx-lm. Then: LoRA target resolution (afinar/targets.py), the loss of models that scale their logits
(Granite, Cohere, Falcon-H1, Gemma-2's softcap) against HF's own `labels=` loss, fuse_pointwise
leaving alone the modules whose forward is not the one it replaces, and mlx_config's translation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from afinar import data, models, targets
from afinar.backends import answering_backend, mlx_config, torch_fast, torch_head, training_backend
from afinar.backends.torch_train import TorchTrainer
from afinar.errors import AfinarError
from afinar.export import export_merged
from afinar.runs import load_run
from afinar.train import run_training
from conftest import QA, tiny_config, write_jsonl
from families import FAMILIES, family_models  # noqa: F401  (family_models: a session fixture)

NAMES = list(FAMILIES)
PRESET = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
ATOL = 1e-4
PROMPT = "Quando foi fundado o Farense?"
MULTI = [{"role": "user", "content": "Olá, quem és?"}, {"role": "assistant", "content": "Sou o assistente do Farense."},
         {"role": "user", "content": "E onde joga o clube?"}, {"role": "assistant", "content": "No Estádio de São Luís."}]


def expected_kinds(family) -> set[str]:
    return {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if family.fused else \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def chat_rows() -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "keywords": k}
            for q, a, k in QA[:5]]
    return [*rows, {"messages": MULTI}]


def family_config(model: Path, *overrides: str, train: Path):
    return tiny_config(model, PRESET, "lora.dropout=0", "train.max_seq_length=256", "train.learning_rate=3e-2",
                       "train.max_steps=3", "train.save_every=0", *overrides, train=train)


@pytest.fixture(scope="module")
def runs(family_models, tmp_path_factory):  # noqa: F811
    """`runs(name) -> (run folder, base folder)`: one LoRA run per family (torch, fp32, 3 steps), built once."""
    root = tmp_path_factory.mktemp("family-runs")
    train = write_jsonl(root / "train.jsonl", chat_rows())
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str):
        if name not in done:
            model = family_models(name)
            done[name] = (run_training(family_config(model, train=train), root / name).output, model)
        return done[name]

    return get


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    """`merged(name) -> folder`: the family run's `afinar export --merged`, built once."""
    root = tmp_path_factory.mktemp("family-merged")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            done[name] = export_merged(runs(name)[0], root / name)
        return done[name]

    return get


def probe_ids(tokenizer) -> list[int]:
    """A prompt plus a few answer tokens: positions where rope, template and adapter all matter."""
    return data.prompt_ids(tokenizer, PROMPT) + data._token_ids(tokenizer, "Em 1910, em Faro.")


def hf_logits(folder, ids, adapter=None) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoConfig

    from afinar.backends.torch_model import lm_class

    # AutoModelForCausalLM, or AutoModelForImageTextToText where transformers maps a multimodal checkpoint only there
    model = lm_class(AutoConfig.from_pretrained(folder).model_type).from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


def mlx_backend_logits(cfg, folder, ids, adapter=None) -> np.ndarray:
    import mlx.core as mx

    cfg = cfg.model_copy(deep=True)
    cfg.backend, cfg.model.base, cfg.model.quantization = "mlx", str(folder), "none"
    backend = answering_backend(cfg)
    backend.load(models.resolve(str(folder)), adapter)  # adapter None: the base alone
    return np.array(backend.model(mx.array([ids])).astype(mx.float32))[0]


def assert_close(got: np.ndarray, want: np.ndarray, what: str):
    assert got.shape == want.shape, what
    worst = float(np.abs(got - want).max())
    assert worst < ATOL, f"{what}: max |dlogit| {worst:.2e} (logits up to {np.abs(want).max():.1f})"


# ---------------------------------------------------------------- the matrix


@pytest.mark.parametrize("name", NAMES)
def test_qlora(name, family_models, tmp_path):  # noqa: F811
    model = family_models(name)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    cfg = family_config(model, "model.quantization=nf4", train=train)
    backend = TorchTrainer(cfg)
    tok = backend.load(models.resolve(str(model)))
    batch = [data.encode(e, tok, 256) for e in data.read_jsonl(train)][:3]
    first, n = backend.eval_loss(batch)
    for _ in range(3):
        backend.forward_backward(batch, 1 / n)
        backend.optimizer_step(1e-2)
    last, _ = backend.eval_loss(batch)
    assert np.isfinite(first) and last < first, (first / n, last / n)
    by_module = backend.describe()["trainable_parameters_by_module"]
    assert set(by_module) == expected_kinds(FAMILIES[name]) and all(by_module.values())


@pytest.mark.parametrize("name", NAMES)
def test_lora(name, runs):
    run, _ = runs(name)
    meta = json.loads((run / "metadata.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s and "step" in s]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    adapter = json.loads((run / "adapter_config.json").read_text())
    # Short names, or full ones where a short name would also reach a vision tower (multimodal checkpoints)
    assert {t.rsplit(".", 1)[-1] for t in adapter["target_modules"]} == expected_kinds(FAMILIES[name])
    assert not any("vision" in t for t in adapter["target_modules"])
    assert meta["device"]["trainable_parameters_by_module"].keys() == expected_kinds(FAMILIES[name])


@pytest.mark.parametrize("name", NAMES)
def test_ask(name, runs):
    from afinar.inference import Predictor

    run, _ = runs(name)
    predictor = Predictor(run)
    reply = predictor.ask(PROMPT, max_tokens=8)
    assert isinstance(reply["answer"], str) and "<think>" not in reply["answer"]
    assert 1 <= reply["completion_tokens"] <= 8
    assert reply["prompt_tokens"] == len(data.prompt_ids(predictor.tokenizer, PROMPT))


@pytest.mark.parametrize("name", NAMES)
def test_merged(name, runs, merged):
    from transformers import AutoTokenizer

    run, base = runs(name)
    out = merged(name)
    ids = probe_ids(AutoTokenizer.from_pretrained(out))
    assert_close(hf_logits(out, ids), hf_logits(base, ids, adapter=run), "merged export vs PEFT")


@pytest.mark.parametrize("name", NAMES)
def test_mlx_base(name, family_models):  # noqa: F811
    from transformers import AutoTokenizer

    pytest.importorskip("mlx.core")
    model = family_models(name)
    ids = probe_ids(AutoTokenizer.from_pretrained(model))
    cfg = tiny_config(model, PRESET)
    assert_close(mlx_backend_logits(cfg, model, ids), hf_logits(model, ids), "MLX base vs transformers")


@pytest.mark.parametrize("name", NAMES)
def test_mlx_adapter(name, runs):
    from transformers import AutoTokenizer

    pytest.importorskip("mlx.core")
    run, base = runs(name)
    ids = probe_ids(AutoTokenizer.from_pretrained(base))
    cfg, _ = load_run(run)
    assert_close(mlx_backend_logits(cfg, base, ids, adapter=run), hf_logits(base, ids, adapter=run),
                 "MLX with the torch-trained adapter vs PEFT")


@pytest.mark.parametrize("name", NAMES)
def test_mlx_merged(name, runs, merged):
    """The merged export carries both config forms: plain mlx-lm reads its rope as transformers does."""
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load
    from transformers import AutoTokenizer

    run, _ = runs(name)
    out = merged(name)
    ids = probe_ids(AutoTokenizer.from_pretrained(out))
    config = json.loads((out / "config.json").read_text())
    config = config.get("text_config", config)  # a multimodal checkpoint's language model
    assert "rope_parameters" in config and "rope_theta" in config  # both forms
    if (config.get("rope_scaling") or {}).get("type") == "longrope":
        # mlx-lm 0.32.2 applies longrope's long factors at every length (transformers: the short ones up to
        # original_max_position_embeddings); the file keeps transformers' values, afinar's own load corrects it.
        cfg, _ = load_run(run)
        assert_close(mlx_backend_logits(cfg, out, ids), hf_logits(out, ids), "afinar MLX on the merged export")
        return
    net, _ = load(str(out))
    assert_close(np.array(net(mx.array([ids])).astype(mx.float32))[0], hf_logits(out, ids), "plain mlx_lm.load(merged)")


# ---------------------------------------------------------------- multimodal checkpoints

MULTIMODAL = [name for name, family in FAMILIES.items() if family.vision]


def tower_state(folder) -> dict[str, torch.Tensor]:
    """The vision tower and projector as transformers loads them from `folder` (random if the file lacked them)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    return {k: v for k, v in model.state_dict().items() if targets.in_tower(k)}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_merged_export_is_the_complete_checkpoint(name, backend, runs, tmp_path):
    """Either backend's merged export keeps the vision tower (mlx-lm drops it at load) and loads as the
    image-text model in transformers, with the language model equal to PEFT's."""
    from transformers import AutoTokenizer

    if backend == "mlx":
        pytest.importorskip("mlx.core")
    run, base = runs(name)
    out = export_merged(run, tmp_path / "merged", backend=backend)
    want, got = tower_state(base), tower_state(out)
    assert want and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ids = probe_ids(AutoTokenizer.from_pretrained(out))
    assert_close(hf_logits(out, ids), hf_logits(base, ids, adapter=run), f"{backend} merged export vs PEFT")
    # The class the CLI's message and the run's INTEGRATION_GUIDE.md name loads it (AutoModelForCausalLM does not
    # know Mistral3ForConditionalGeneration).
    from afinar.models import auto_class_name

    assert auto_class_name(out) == auto_class_name(base) == "AutoModelForImageTextToText"
    guide = (run / "INTEGRATION_GUIDE.md").read_text(encoding="utf-8")
    assert "base = AutoModelForImageTextToText.from_pretrained(" in guide


@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_loss_is_the_models_own(name, family_models, tmp_path):  # noqa: F811
    """Text-only training takes the head-on-answers path through the text+vision model: HF's `labels=` loss."""
    from transformers import AutoConfig, AutoTokenizer

    from afinar.backends.torch_model import lm_class

    config = AutoConfig.from_pretrained(family_models(name))
    base = lm_class(config.model_type).from_pretrained(family_models(name), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(family_models(name))
    assert type(base).__name__.endswith("ForConditionalGeneration") and torch_head.head_transform(base) is not None
    backend = backend_on(base, tok, tmp_path)
    batch = [data.encode(e, tok, 256) for e in data.read_jsonl(tmp_path / "t.jsonl")][:3]
    with torch.no_grad():
        loss, n = backend.loss_sum(batch)
    assert float(loss) / n == pytest.approx(hf_labels_loss(backend, batch), rel=1e-5)


@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_mlx_run(name, family_models, tmp_path):  # noqa: F811
    """Trained on MLX: the PEFT adapter names transformers' modules (plain PEFT loads it), and `ask` answers."""
    pytest.importorskip("mlx.core")
    from transformers import AutoTokenizer

    from afinar.inference import Predictor

    base = family_models(name)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    run = run_training(family_config(base, "backend=mlx", "model.compute_dtype=float32", train=train), tmp_path / "run").output
    ids = probe_ids(AutoTokenizer.from_pretrained(base))
    cfg, _ = load_run(run)
    assert_close(mlx_backend_logits(cfg, base, ids, adapter=run), hf_logits(base, ids, adapter=run),
                 "MLX-trained adapter: MLX vs plain PEFT")
    assert 1 <= Predictor(run).ask(PROMPT, max_tokens=4)["completion_tokens"] <= 4


@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_run_adapter_loads_in_plain_mlx_lm(name, runs):
    """The run's mlx/ adapter carries mlx-lm's names for the language model (language_model.model.*)."""
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load
    from transformers import AutoTokenizer

    from afinar import adapters

    run, base = runs(name)
    ids = probe_ids(AutoTokenizer.from_pretrained(base))
    net, _ = load(str(base), adapter_path=str(run / adapters.MLX_SUBDIR), model_config=mlx_config.read_mlx_keys(base))
    assert_close(np.array(net(mx.array([ids])).astype(mx.float32))[0], hf_logits(base, ids, adapter=run),
                 "plain mlx_lm.load(base, adapter_path=run/mlx) vs PEFT")


# ---------------------------------------------------------------- LoRA targets

LLAMA = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")] + ["lm_head"]
PHI = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")] + ["lm_head"]
VLM = [f"model.language_model.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj")] + \
      [f"model.vision_tower.encoder.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj")] + \
      ["model.multi_modal_projector.linear_1", "lm_head"]


def test_targets_map_preset_names_onto_fused_layers():
    chosen = targets.resolve(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], PHI)
    assert chosen.kinds == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert set(chosen.modules) == set(PHI) - {"lm_head"}
    assert len(chosen.notices) == 2 and "fuses q_proj, k_proj, v_proj into qkv_proj" in chosen.notices[0]
    assert chosen.peft_target_modules == chosen.kinds  # short names select exactly these layers
    assert chosen.block_keys() == ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"]
    plain = targets.resolve(["q_proj", "v_proj"], LLAMA)
    assert plain.kinds == ["q_proj", "v_proj"] and not plain.notices


def test_targets_all_linear_and_towers():
    assert set(targets.resolve(["all-linear"], LLAMA).modules) == set(LLAMA) - {"lm_head"}
    vlm = targets.resolve(["all-linear"], VLM)
    assert set(vlm.modules) == {"model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.v_proj"}
    named = targets.resolve(["q_proj"], VLM)  # a name never reaches the vision tower either
    assert named.modules == ("model.language_model.layers.0.self_attn.q_proj",)
    assert named.peft_target_modules == ["model.language_model.layers.0.self_attn.q_proj"]  # the short name would
    asked = targets.resolve(["q_proj", "vision_tower.encoder.layers.0.self_attn.q_proj"], VLM)  # named: the user means it
    assert set(asked.modules) == {"model.language_model.layers.0.self_attn.q_proj", "model.vision_tower.encoder.layers.0.self_attn.q_proj"}
    assert len(asked.notices) == 1 and "their LoRA stays zero" in asked.notices[0]
    with_head = targets.resolve(["q_proj", "lm_head"], LLAMA)
    assert "lm_head" in with_head.modules
    with pytest.raises(AfinarError, match="outside the decoder blocks"):
        with_head.block_keys()


def test_targets_unknown_name_lists_the_models_layers():
    with pytest.raises(AfinarError) as e:
        targets.resolve(["q_proj", "c_attn"], PHI)
    msg = str(e.value)
    assert "['c_attn'] match no linear layer" in msg and "self_attn.qkv_proj" in msg and "mlp.gate_up_proj" in msg
    assert "all-linear" in msg


def test_target_counts_by_kind():
    counts = targets.count_by_kind([
        ("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.default.weight", 8 * 64),
        ("base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.default.weight", 96 * 8),
        ("model.layers.0.mlp.down_proj.lora_a", 128 * 8)])
    assert counts == {"down_proj": 1024, "qkv_proj": 512 + 768}


def test_all_linear_on_both_backends(family_models, tmp_path):  # noqa: F811
    pytest.importorskip("mlx.core")
    model = family_models("phi4-mini")
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    cfg = tiny_config(model, "lora.target_modules=all-linear", train=train)
    torch_backend = TorchTrainer(cfg)
    torch_backend.load(models.resolve(str(model)))
    cfg.backend = "mlx"
    mlx_backend = training_backend(cfg)
    mlx_backend.load(models.resolve(str(model)))
    expected = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert torch_backend.describe()["trainable_parameters_by_module"] == mlx_backend.describe()["trainable_parameters_by_module"]
    assert set(torch_backend.describe()["trainable_parameters_by_module"]) == expected


# ---------------------------------------------------------------- the model's own loss


SCALED = ["granite", "gemma2", "cohere", "falcon_h1"]  # logits / logits_scaling, softcap, * logit_scale, * lm_head_multiplier


def scaled_model(name: str, family_models):  # noqa: F811
    """(model, tokenizer) of a model that transforms its logits after the head; Cohere and Falcon-H1 built here."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name in FAMILIES:
        return AutoModelForCausalLM.from_pretrained(family_models(name), dtype=torch.float32), \
            AutoTokenizer.from_pretrained(family_models(name))
    tok_folder = family_models("granite")  # any tokenizer: these two have no family fixture
    shape = dict(vocab_size=AutoConfig.from_pretrained(tok_folder).vocab_size, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    extra = dict(logit_scale=0.25) if name == "cohere" else dict(
        head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1,
        mamba_chunk_size=16, lm_head_multiplier=0.3, mlp_multipliers=[0.7, 1.3])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **shape, **extra))
    with torch.no_grad():  # as tests/families.py does: logits far from uniform, so a lost scaling shows
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model, AutoTokenizer.from_pretrained(tok_folder)


def backend_on(base, tokenizer, tmp_path, targets_list="[q_proj,v_proj,down_proj]") -> TorchTrainer:
    train = write_jsonl(tmp_path / "t.jsonl", chat_rows())
    backend = TorchTrainer(tiny_config(Path("."), f"lora.target_modules={targets_list}", "lora.dropout=0", train=train))
    backend.attach(base, tokenizer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter a value so it counts
        for p in backend.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return backend


def hf_labels_loss(backend, batch) -> float:
    from tests.test_torch_backend import hf_batch

    ids, attn, labels = hf_batch(batch, data.pad_id(backend.tokenizer))  # Mistral's has no pad token
    with torch.no_grad():
        return float(backend.model(input_ids=ids, attention_mask=attn, labels=labels).loss)


@pytest.mark.parametrize("name", SCALED)
def test_scaled_logits_loss_equals_hf_loss(name, family_models, tmp_path, monkeypatch):  # noqa: F811
    base, tok = scaled_model(name, family_models)
    assert torch_head.head_transform(base) is not None  # the fast path, with the model's scaling
    backend = backend_on(base, tok, tmp_path)
    batch = [data.encode(e, tok, 256) for e in data.read_jsonl(tmp_path / "t.jsonl")][:3]
    with torch.no_grad():
        loss, n = backend.loss_sum(batch)
        monkeypatch.setattr(torch_head, "head_transform", lambda model: lambda model, x: x)
        unscaled = float(backend.loss_sum(batch)[0]) / n  # the head alone, as before: visibly another objective
    hf = hf_labels_loss(backend, batch)
    assert float(loss) / n == pytest.approx(hf, rel=1e-5)
    assert abs(unscaled - hf) > 1e-3 * hf


def test_unknown_head_step_takes_the_full_forward(family_models, tmp_path):  # noqa: F811
    """A causal LM whose forward does something torch_head.py does not know: the loss is still HF's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    class Biased(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            labels = kwargs.pop("labels", None)
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + torch.linspace(0, 3, out.logits.shape[-1])
            if labels is not None:
                out.loss = self.loss_function(logits=out.logits, labels=labels, vocab_size=self.config.vocab_size)
            return out

    folder = family_models("llama3")
    base = Biased.from_pretrained(folder, dtype=torch.float32)
    assert torch_head.head_transform(base) is None
    assert torch_head.head_transform(AutoModelForCausalLM.from_pretrained(folder)) is not None
    tok = AutoTokenizer.from_pretrained(folder)
    backend = backend_on(base, tok, tmp_path)
    batch = [data.encode(e, tok, 256) for e in data.read_jsonl(tmp_path / "t.jsonl")][:3]
    with torch.no_grad():
        loss, n = backend.loss_sum(batch)
    assert float(loss) / n == pytest.approx(hf_labels_loss(backend, batch), rel=1e-5)


def test_fuse_pointwise_leaves_other_forwards_alone(family_models, tmp_path):  # noqa: F811
    """Falcon-H1's MLP (multipliers) and Gemma's norm (1 + w) are not patched; the loss is unchanged."""
    patched_kinds = {}
    for name in ("falcon_h1", "gemma2", "granite"):
        base, tok = scaled_model(name, family_models)
        backend = backend_on(base, tok, tmp_path)
        batch = [data.encode(e, tok, 256) for e in data.read_jsonl(tmp_path / "t.jsonl")][:3]
        with torch.no_grad():
            before = float(backend.loss_sum(batch)[0])
            torch_fast.fuse_pointwise(backend.model, compile=False)
            after = float(backend.loss_sum(batch)[0])
        assert after == pytest.approx(before, rel=1e-6), name
        patched_kinds[name] = {type(m).__name__ for m in backend.model.modules()
                               if "_afinar_norm" in vars(m) or "_afinar_act" in vars(m)}
        torch_fast.unfuse(backend.model)
    assert patched_kinds["falcon_h1"] == {"FalconH1RMSNorm"}  # its norm is Llama's; its MLP is not
    assert patched_kinds["gemma2"] == set()
    assert patched_kinds["granite"] == {"GraniteRMSNorm", "GraniteMLP"}


# ---------------------------------------------------------------- mlx_config


def test_mlx_keys_translate_transformers5_configs(family_models):  # noqa: F811
    config = json.loads((family_models("gemma3") / "config.json").read_text())
    keys = mlx_config.mlx_keys(config)
    assert keys == {"rope_theta": 60000.0, "rope_local_base_freq": 7000.0, "sliding_window_pattern": 2,
                    "rope_scaling": {"factor": 8.0, "type": "linear", "rope_type": "linear"}}
    phi = json.loads((family_models("phi3.5") / "config.json").read_text())
    runtime, on_file = mlx_config.mlx_keys(phi), mlx_config.mlx_keys(phi, runtime=False)
    assert on_file["rope_scaling"]["long_factor"] == phi["rope_parameters"]["long_factor"]
    assert runtime["rope_scaling"]["long_factor"] == phi["rope_parameters"]["short_factor"]
    assert mlx_config.mlx_keys({"model_type": "llama", "rope_theta": 1e6}) == {}  # transformers 4 configs: as they are
    with pytest.raises(AfinarError, match="not one global layer every 2"):
        mlx_config.mlx_keys({"model_type": "gemma3_text", "layer_types": ["sliding_attention", "full_attention",
                                                                          "full_attention"]})
    with pytest.raises(AfinarError, match="no full_attention layer"):
        mlx_config.mlx_keys({"model_type": "gemma3_text", "layer_types": ["sliding_attention"] * 2})


def test_plain_mlx_lm_misreads_nested_rope(family_models):  # noqa: F811
    """The bug docs/MLX_ROPE.md reports: mlx-lm 0.32.2 on a transformers-5 folder. When this fails,
    mlx-lm reads rope_parameters itself and afinar's translation can go."""
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.utils import load_model
    from transformers import AutoTokenizer

    model = family_models("qwen2.5")
    ids = probe_ids(AutoTokenizer.from_pretrained(model))
    net, _ = load_model(model)
    assert float(np.abs(np.array(net(mx.array([ids])))[0] - hf_logits(model, ids)).max()) > 1.0
