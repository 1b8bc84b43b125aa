"""Chat templates and stopping, on every family's real template (tests/families.py).

- answer masks: each answer (and its end-of-turn token) is a target, multi-turn included, for
  templates that render earlier turns differently (Qwen3) or close the conversation with EOS (Phi);
- the prompt `ask` feeds is, token for token, what preceded the answer in training;
- Qwen3 never learns (nor returns) an empty think block; data with a think block keeps it;
- template refusals name their cause; Gemma-2's missing system role takes the system prompt
  into the first user turn;
- generation stops on any of the model's end tokens (Gemma's <end_of_turn>), torch and MLX;
- a model without a chat template is asked in plain text.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from afinar import data, models
from afinar.backends import answering_backend
from afinar.data import Example, encode, prompt_ids
from afinar.errors import AfinarError
from afinar.inference import Predictor
from afinar.train import run_training
from conftest import tiny_config, write_jsonl
from families import FAMILIES, family_models  # noqa: F401  (family_models: a session fixture)

MULTI = [{"role": "user", "content": "Olá, quem és?"}, {"role": "assistant", "content": "Sou o assistente do Farense."},
         {"role": "user", "content": "E onde joga o clube?"}, {"role": "assistant", "content": "No Estádio de São Luís."}]


@pytest.fixture(scope="module")
def tokenizers(family_models):  # noqa: F811
    from transformers import AutoTokenizer

    return lambda name: AutoTokenizer.from_pretrained(family_models(name))


def target_runs(enc) -> list[tuple[int, list[int]]]:
    """(start index, token ids) of each contiguous run of target tokens."""
    runs, start = [], None
    for i, m in enumerate([*enc.loss_mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, enc.input_ids[start:i]))
            start = None
    return runs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_multi_turn_answers_are_the_targets(name, tokenizers):
    tok = tokenizers(name)
    enc = encode(Example(MULTI, None), tok, 1024)
    end = data.turn_end_token(tok)
    runs = target_runs(enc)
    assert [tok.decode(ids).strip() for _, ids in runs] == [MULTI[1]["content"] + end, MULTI[3]["content"] + end]
    prompt = tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if not m])
    assert MULTI[0]["content"] in prompt and MULTI[2]["content"] in prompt and "<think>" not in tok.decode(runs[1][1])
    # `ask` with the conversation so far feeds exactly the tokens that preceded the last answer
    assert prompt_ids(tok, MULTI[:3]) == enc.input_ids[: runs[1][0]]
    single = encode(Example(MULTI[:2], None), tok, 1024)
    assert prompt_ids(tok, MULTI[0]["content"]) == single.input_ids[: target_runs(single)[0][0]]


def test_qwen3_learns_no_empty_think_block(tokenizers):
    tok = tokenizers("qwen3")
    enc = encode(Example(MULTI[:2], None), tok, 1024)
    (start, ids), = target_runs(enc)
    assert tok.decode(ids) == MULTI[1]["content"] + "<|im_end|>"
    assert tok.decode(enc.input_ids[:start]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # in the prompt
    assert tok.decode(prompt_ids(tok, "Olá?")).endswith("<think>\n\n</think>\n\n")  # and so in `ask`'s
    reasoned = [MULTI[0], {"role": "assistant", "content": "<think>Sou eu.</think>Sou o assistente."}]
    (_, ids), = target_runs(encode(Example(reasoned, None), tok, 1024))
    assert tok.decode(ids) == "<think>\nSou eu.\n</think>\n\nSou o assistente.<|im_end|>"  # data's own reasoning is trained


def test_clean_answer_and_ask_drop_an_empty_think_block(tokenizers):
    assert data.clean_answer("<think>\n\n</think>\n\nSim.") == "Sim."
    assert data.clean_answer(" <think></think>Sim. ") == "Sim."
    assert data.clean_answer("<think>Penso.</think>Sim.") == "<think>Penso.</think>Sim."  # real reasoning stays
    tok = tokenizers("qwen3")
    fake = SimpleNamespace(tokenizer=tok, cfg=SimpleNamespace(model=SimpleNamespace(base="x")), run="run")
    out = data._token_ids(tok, "<think>\n\n</think>\n\nSim, em Faro.<|im_end|>")
    assert Predictor.answer(fake, [1, 2], out, 0.5)["answer"] == "Sim, em Faro."


def test_template_refusal_names_the_cause(tokenizers):
    tok = tokenizers("gemma2")
    bad = Example([MULTI[0], MULTI[2], MULTI[1]], None, source="train.jsonl:7")
    with pytest.raises(AfinarError) as e:
        encode(bad, tok, 1024)
    msg = str(e.value)
    assert msg.startswith("train.jsonl:7: ") and "Conversation roles must alternate" in msg
    assert "message 2 is 'user' where 'assistant' was expected" in msg and "after the first turn" not in msg
    odd = tok.chat_template.replace("message['content'] | trim", "message['content'] | upper")
    tok.chat_template = odd  # a template that rewrites answers: they cannot be found, and the error says so
    with pytest.raises(AfinarError, match="does not print assistant message 2 as written"):
        encode(Example(MULTI[:2], None), tok, 1024)


def test_system_prompt_without_a_system_role(tokenizers, caplog):
    tok = tokenizers("gemma2")
    system = "Responde em português europeu."
    assert not data.has_system_role(tok) and data.has_system_role(tokenizers("gemma3"))
    with caplog.at_level(logging.WARNING, logger="afinar"):
        enc = encode(Example(MULTI[:2], None), tok, 1024, system_prompt=system)
        encode(Example(MULTI[:2], None), tok, 1024, system_prompt=system)
    assert [r.message for r in caplog.records].count(
        "This model's chat template has no system role: the system prompt is put at the start of the first user turn.") <= 1
    (start, _), = target_runs(enc)
    text = tok.decode(enc.input_ids[:start])
    assert text.startswith(f"<bos><start_of_turn>user\n{system}\n\n{MULTI[0]['content']}<end_of_turn>")
    assert prompt_ids(tok, MULTI[0]["content"], system) == enc.input_ids[:start]
    # Gemma-3's own template takes a system message: it is left to do so
    g3 = tokenizers("gemma3")
    assert data.with_system(MULTI[:2], system, g3)[0] == {"role": "system", "content": system}


def test_stop_token_ids(family_models, tokenizers, tmp_path):  # noqa: F811
    def named(name):
        tok = tokenizers(name)
        return {tok.convert_ids_to_tokens(i) for i in data.stop_token_ids(tok, family_models(name))}

    assert named("gemma2") == {"<eos>", "<end_of_turn>"}
    assert named("phi3.5") == {"<|end|>", "<|endoftext|>"}
    assert named("llama3") == {"<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"}
    tok = tokenizers("qwen2.5")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert data.stop_token_ids(tok, tmp_path) == [tok.eos_token_id, 7]  # an int, not a list
    assert data.stop_token_ids(tok, tmp_path / "missing") == [tok.eos_token_id]


@pytest.fixture(scope="module")
def memorised(family_models, tmp_path_factory):  # noqa: F811
    """A Gemma-2 run that learned one answer by heart: it ends the answer with <end_of_turn>, not EOS."""
    root = tmp_path_factory.mktemp("memorised")
    row = {"question": "Onde joga o Farense?", "answer": "No Estádio de São Luís, em Faro."}
    train = write_jsonl(root / "train.jsonl", [row, row])
    cfg = tiny_config(family_models("gemma2"), "lora.target_modules=all-linear", "lora.rank=16", "lora.dropout=0",
                      "train.learning_rate=3e-2", "train.max_steps=20", "train.save_every=0", "train.warmup_steps=2",
                      train=train)
    return run_training(cfg, root / "run").output, row


def test_generation_stops_on_end_of_turn_torch(memorised):
    run, row = memorised
    predictor = Predictor(run)
    end = predictor.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end != predictor.tokenizer.eos_token_id
    reply = predictor.ask(row["question"], max_tokens=40)
    assert reply["answer"] == row["answer"]
    assert reply["completion_tokens"] == len(data._token_ids(predictor.tokenizer, row["answer"]))  # stopped at the end
    streamed = []
    prompt = predictor.prompt(row["question"])
    hooked = predictor.backend.generate([prompt], 40, on_token=lambda r, t: streamed.append(t))
    assert hooked[0] == streamed == predictor.backend.generate([prompt], 40)[0] and end not in streamed


def test_generation_stops_on_end_of_turn_mlx(memorised):
    pytest.importorskip("mlx.core")
    from afinar.runs import load_run

    run, row = memorised
    cfg, _ = load_run(run)
    cfg.backend = "mlx"
    backend = answering_backend(cfg)
    tok = backend.load(models.resolve(cfg.model.base), run)
    out = backend.generate([prompt_ids(tok, row["question"])], 40)[0]
    assert tok.decode(out, skip_special_tokens=True) == row["answer"]
    assert out == data._token_ids(tok, row["answer"])


def test_model_without_chat_template_is_asked_in_plain_text(family_models, tmp_path):  # noqa: F811
    model = family_models("llama3-base")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "O Farense joga no Estádio de São Luís, em Faro."}] * 2)
    run = run_training(tiny_config(model, "train.max_steps=2", "train.save_every=0", train=train), tmp_path / "run").output
    predictor = Predictor(run)
    question = "O Farense joga no"
    reply = predictor.ask(question, max_tokens=5)
    assert reply["prompt_tokens"] == len(predictor.tokenizer(question)["input_ids"])
    assert 1 <= reply["completion_tokens"] <= 5
    assert prompt_ids(predictor.tokenizer, question, "Sê breve.") == predictor.tokenizer("Sê breve.\n\n" + question)["input_ids"]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"question": "Onde?", "answer": "Em Faro."}] * 2)
    with pytest.raises(AfinarError, match="no chat template"):
        run_training(tiny_config(model, "train.max_steps=1", train=chat), tmp_path / "chat-run")
