"""The MLX backend (MLX's CPU build on Linux): training, resume, run folder, adapter formats, merged export.

The adapter formats are checked across frameworks: an adapter trained with MLX must give the
same logits in plain PEFT (torch), and one trained with torch the same logits in plain mlx-lm.
Tiny random Mistral-shaped model, fp32, a few steps each.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from afinar import adapters, data, models  # noqa: E402
from afinar.backends import answering_backend, resolve_name, training_backend  # noqa: E402
from afinar.backends.mlx_answer import MLXAnswerer  # noqa: E402
from afinar.backends.mlx_train import MLXTrainer  # noqa: E402
from afinar.errors import AfinarError  # noqa: E402
from afinar.export import export_adapter, export_merged  # noqa: E402
from afinar.train import run_training  # noqa: E402
from conftest import Boom, crash_on_step  # noqa: E402

# A high learning rate so a few steps move the adapter far enough for logit comparisons to mean something.
FAST = ("train.max_steps=4", "train.learning_rate=3e-2", "train.eval_every=2", "train.save_every=2", "lora.dropout=0.0",
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]")
PROMPT = "Quando foi fundado o Farense?"


def mlx_logits(backend, ids: list[int]) -> np.ndarray:
    return np.array(backend.model(mx.array([ids])).astype(mx.float32))[0]


def torch_peft_logits(base_path, adapter_dir, ids: list[int], quantized: bool = False) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def mlx_run(tiny_model, tmp_path_factory):
    """A finished MLX LoRA run (unquantized, so torch can compute exactly the same function)."""
    from conftest import qa_rows, tiny_config, write_jsonl

    root = tmp_path_factory.mktemp("mlx")
    train = write_jsonl(root / "train.jsonl", qa_rows())
    cfg = tiny_config(tiny_model, "backend=mlx", *FAST, train=train, val=train)
    return cfg, run_training(cfg, root / "run").output


def prompt(tokenizer) -> list[int]:
    return data.prompt_ids(tokenizer, PROMPT)


def test_mlx_training_lowers_the_loss(make_cfg, qa_files, tiny_tokenizer):
    train, _ = qa_files
    for quant in ("none", "int4"):
        cfg = make_cfg("backend=mlx", f"model.quantization={quant}", "lora.dropout=0.0",
                       "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]", train=train)
        backend = training_backend(cfg)
        assert isinstance(backend, MLXTrainer)
        tok = backend.load(models.resolve(cfg.model.base))
        batch = [data.encode(e, tok, 128) for e in data.read_jsonl(train)][:4]
        first, n = backend.eval_loss(batch)
        for _ in range(6):
            backend.forward_backward(batch, 1 / n)
            backend.optimizer_step(1e-2)
        last, _ = backend.eval_loss(batch)
        assert last / n < first / n - 0.05, (quant, first / n, last / n)  # as the torch backend's test
        if quant == "int4":
            assert "MLX has no NF4" in backend.describe()["quantization"]


def test_mlx_loss_equals_torch_loss(make_cfg, qa_files):
    """Same weights, same batch: the MLX loss (answer positions only) equals the torch backend's."""
    train, _ = qa_files
    losses = {}
    for name in ("torch", "mlx"):
        cfg = make_cfg(f"backend={name}", train=train)
        backend = training_backend(cfg)
        tok = backend.load(models.resolve(cfg.model.base))
        batch = [data.encode(e, tok, 128) for e in data.read_jsonl(train)][:3]
        losses[name] = backend.eval_loss(batch)
    assert losses["mlx"][1] == losses["torch"][1]
    assert losses["mlx"][0] == pytest.approx(losses["torch"][0], rel=1e-4)


def test_mlx_run_folder_has_the_same_files_as_a_torch_run(mlx_run, tiny_model, tmp_path):
    from conftest import qa_rows, tiny_config, write_jsonl

    cfg, run = mlx_run
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows())
    torch_run = run_training(tiny_config(tiny_model, *FAST, train=train, val=train), tmp_path / "torch").output

    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                      if not {"optimizer.pt", "rng_state.pt", "optimizer.safetensors", "rng_state.pkl"} & {p.name})
    assert files(run) == files(torch_run)
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["device"]["backend"] == "mlx" and "mlx" in meta["device"]["versions"]


def test_mlx_adapter_gives_the_same_logits_in_plain_peft(mlx_run, tiny_model):
    cfg, run = mlx_run
    backend = answering_backend(cfg)
    tok = backend.load(models.resolve(cfg.model.base), run)
    ids = prompt(tok)
    ours = mlx_logits(backend, ids)
    peft = torch_peft_logits(tiny_model, run, ids)
    base = torch_peft_logits(tiny_model, None, ids)
    assert np.abs(peft - base).max() > 1e-2  # the adapter changes the logits...
    assert np.abs(ours - peft).max() < 1e-4  # ...and both frameworks agree on how
    from mlx_lm import load  # and the run's mlx/ copy loads in plain mlx-lm

    plain, _ = load(str(tiny_model), adapter_path=str(run / adapters.MLX_SUBDIR))
    assert np.abs(np.array(plain(mx.array([ids])))[0] - ours).max() < 1e-5


def test_torch_adapter_gives_the_same_logits_in_plain_mlx_lm(make_cfg, qa_files, tiny_model, tmp_path):
    from mlx_lm import load

    train, _ = qa_files
    run = run_training(make_cfg(*FAST, train=train), tmp_path / "torch").output
    model, _ = load(str(tiny_model), adapter_path=str(run / adapters.MLX_SUBDIR))
    from transformers import AutoTokenizer

    ids = prompt(AutoTokenizer.from_pretrained(tiny_model))
    ours = np.array(model(mx.array([ids])))[0]
    peft = torch_peft_logits(tiny_model, run, ids)
    assert np.abs(peft - torch_peft_logits(tiny_model, None, ids)).max() > 1e-2
    assert np.abs(ours - peft).max() < 1e-4


def test_conversion_round_trips_exactly(mlx_run, tmp_path):
    from safetensors.numpy import load_file

    _, run = mlx_run
    mlx_dir = export_adapter(run / adapters.MLX_SUBDIR, "peft", tmp_path / "back")  # mlx -> peft
    again = export_adapter(mlx_dir, "mlx", tmp_path / "again")  # peft -> mlx
    original, back = load_file(str(run / adapters.PEFT_WEIGHTS)), load_file(str(mlx_dir / adapters.PEFT_WEIGHTS))
    assert original.keys() == back.keys() and all(np.array_equal(original[k], back[k]) for k in original)
    assert json.loads((again / adapters.MLX_CONFIG).read_text()) == json.loads((run / "mlx" / adapters.MLX_CONFIG).read_text())
    peft_cfg = json.loads((mlx_dir / adapters.PEFT_CONFIG).read_text())
    assert peft_cfg["r"] == 8 and peft_cfg["lora_alpha"] == 16.0
    with pytest.raises(AfinarError, match="already exists"):
        export_adapter(run, "mlx", again)
    with pytest.raises(AfinarError, match="no adapter found"):
        export_adapter(tmp_path, "mlx", tmp_path / "x")


def test_mlx_resume_after_crash_equals_uninterrupted_run(make_cfg, qa_files, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    train, val = qa_files
    cfg = make_cfg("backend=mlx", "train.max_steps=6", "train.save_every=2", "train.eval_every=2",
                   "lora.dropout=0.1", "train.divergence_factor=0", train=train, val=val)
    straight = run_training(cfg, tmp_path / "straight").output
    crash_on_step(monkeypatch, 5, MLXTrainer)
    with pytest.raises(Boom):
        run_training(cfg, tmp_path / "crashed")
    monkeypatch.undo()
    resumed = run_training(cfg, tmp_path / "crashed", resume=True).output
    a, b = load_file(str(resumed / adapters.PEFT_WEIGHTS)), load_file(str(straight / adapters.PEFT_WEIGHTS))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    assert json.loads((resumed / "metadata.json").read_text())["resumed_from_step"] == 4


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_merged_export_matches_base_plus_adapter(name, make_cfg, qa_files, tmp_path):
    """QLoRA runs: the merged fp32 model computes what the 4-bit base + adapter computed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    train, _ = qa_files
    cfg = make_cfg(f"backend={name}", "model.quantization=nf4", *FAST, train=train)
    run = run_training(cfg, tmp_path / "run").output
    merged = export_merged(run, tmp_path / "merged")
    assert not (merged / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(merged)
    ids = prompt(tok)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    if name == "mlx":
        backend = answering_backend(cfg)
        backend.load(models.resolve(cfg.model.base), run)
        reference = mlx_logits(backend, ids)
    else:
        reference = torch_peft_logits(cfg.model.base, run, ids, quantized=True)
    assert np.abs(plain - reference).max() < 1e-3


def test_ask_on_an_mlx_run(mlx_run):
    from typer.testing import CliRunner

    from afinar.cli import app

    _, run = mlx_run
    result = CliRunner().invoke(app, ["ask", str(run), PROMPT, "--max-tokens", "5"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["completion_tokens"] <= 5 and isinstance(answer["answer"], str)


def test_generate_hooks_stream_and_stop(mlx_run):
    cfg, run = mlx_run
    backend = answering_backend(cfg)
    tok = backend.load(models.resolve(cfg.model.base), run)
    prompts = [prompt(tok), data.prompt_ids(tok, "Onde joga o Farense?")]
    plain = backend.generate(prompts, 6)
    seen: list[tuple[int, int]] = []
    hooked = backend.generate(prompts, 6, on_token=lambda r, t: seen.append((r, t)),
                              should_stop=lambda r: r == 1 and sum(1 for x, _ in seen if x == 1) >= 2)
    assert hooked[0] == plain[0] and [t for r, t in seen if r == 0] == plain[0]
    assert hooked[1] == plain[1][: len(hooked[1])] and 2 <= len(hooked[1]) < len(plain[1])


def test_auto_backend_and_errors(make_cfg, monkeypatch):
    from afinar.backends import mlx_model

    cfg = make_cfg()
    monkeypatch.setattr(mlx_model, "on_apple_silicon", lambda: False)
    assert resolve_name(cfg) == "torch"
    monkeypatch.setattr(mlx_model, "on_apple_silicon", lambda: True)
    assert resolve_name(cfg) == "mlx"
    with pytest.raises(AfinarError, match=r"target_modules=\['nope'\].*Linear layers in this model"):
        backend = training_backend(make_cfg("backend=mlx", "lora.target_modules=[nope]"))
        backend.load(models.resolve(backend.cfg.model.base))


def test_serve_an_mlx_run(mlx_run):
    """`afinar serve` on an MLX run: the openai client, plain and streamed, gets the greedy answer."""
    import openai

    from afinar.config import ServeConfig
    from afinar.inference import Predictor
    from afinar.serve import create_app, serve_in_thread

    _, run = mlx_run
    predictor = Predictor(run)
    expected = predictor.ask(PROMPT, max_tokens=6)["answer"]
    app = create_app(predictor=predictor, cfg=ServeConfig(batch_window_ms=20, max_tokens=16), api_key=None)
    with serve_in_thread(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        messages = [{"role": "user", "content": PROMPT}]
        reply = client.chat.completions.create(model="run", messages=messages, max_tokens=6)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="run", messages=messages, max_tokens=6, stream=True) if chunk.choices)
    assert reply.choices[0].message.content.strip() == expected
    assert streamed.strip() == expected
