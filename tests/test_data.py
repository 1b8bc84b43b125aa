"""Data: JSONL shapes, clear errors, the answer mask, batching order, splitting, the bundled data."""

from __future__ import annotations

import json

import pytest

from afinar import data
from afinar.batches import batch_order
from afinar.data import Example, encode, normalise, prompt_ids, read_jsonl, split_file
from afinar.errors import AfinarError

from conftest import DATA_DIR, write_jsonl

Q, A = "Quando foi fundado o Farense?", "O Sporting Clube Farense foi fundado a 1 de abril de 1910."


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(AfinarError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def chat(q=Q, a=A) -> Example:
    return Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}], None)


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize(
    "row, user, answer",
    [
        ({"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]}, Q, A),
        ({"prompt": Q, "completion": A}, Q, A),
        ({"question": Q, "answer": A}, Q, A),
        ({"instruction": Q, "output": A}, Q, A),
        ({"instruction": "Responde.", "input": Q, "output": A}, f"Responde.\n\n{Q}", A),
        ({"instruction": Q, "input": "", "output": A}, Q, A),
    ],
    ids=["messages", "prompt_completion", "question_answer", "instruction", "instruction_input", "instruction_empty_input"],
)
def test_chat_shapes_read_into_examples(tmp_path, row, user, answer):
    path = write_jsonl(tmp_path / "d.jsonl", [{**row, "keywords": ["1910"]}, row])
    examples = read_jsonl(path)
    assert len(examples) == 2
    ex = examples[0]
    assert ex.text is None
    assert ex.messages == [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    assert ex.question == user and ex.answer == answer
    assert ex.keywords == ["1910"]
    assert examples[1].keywords == []
    assert ex.source == f"{path}:1" and examples[1].source == f"{path}:2"


def test_text_shape(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "O Farense é de Faro."}, {"text": "Joga no São Luís.", "keywords": ["São Luís"]}])
    examples = read_jsonl(path)
    assert [e.text for e in examples] == ["O Farense é de Faro.", "Joga no São Luís."]
    assert all(e.messages is None for e in examples)
    assert examples[1].keywords == ["São Luís"]
    assert examples[0].answer == "O Farense é de Faro." and examples[0].question == ""


def test_messages_keep_system_and_multiple_turns(tmp_path):
    msgs = [{"role": "system", "content": "És um adepto."}, {"role": "user", "content": "Olá"},
            {"role": "assistant", "content": "Olá!"}, {"role": "user", "content": Q}, {"role": "assistant", "content": A}]
    ex = read_jsonl(write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}]))[0]
    assert ex.messages == msgs
    assert ex.question == Q and ex.answer == A


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": Q, "answer": A}) + "\n\n   \n" + json.dumps({"question": "b", "answer": "c"}) + "\n")
    examples = read_jsonl(path)
    assert len(examples) == 2 and examples[1].source == f"{path}:4"


def test_mixed_shapes_name_line_and_first_shape(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": Q, "answer": A}, {"question": "b", "answer": "c"},
                                               {"prompt": "p", "completion": "c"}])
    msg = error_of(read_jsonl, path)
    assert f"{path}:3" in msg
    assert "prompt_completion" in msg and "question_answer" in msg
    assert "line 1" in msg


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": Q, "answer": A}) + '\n{"question": "sem fim", "answer": \n')
    msg = error_of(read_jsonl, path)
    assert f"{path}:2" in msg and "not valid JSON" in msg


def test_unknown_shape_lists_expected_shapes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"pergunta": Q, "resposta": A}])
    msg = error_of(read_jsonl, path)
    assert f"{path}:1" in msg
    assert "pergunta" in msg  # the keys it found
    for shape in ('"messages"', '"question"', '"prompt"', '"instruction"', '"text"'):
        assert shape in msg


def test_non_object_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('["a", "b"]\n')
    msg = error_of(read_jsonl, path)
    assert f"{path}:1" in msg and "an array" in msg  # JSON names for types: array, not list


GOOD = {
    "qa": {"question": "ok?", "answer": "ok."},
    "messages": {"messages": [{"role": "user", "content": "ok?"}, {"role": "assistant", "content": "ok."}]},
    "instruction": {"instruction": "ok?", "output": "ok."},
}


@pytest.mark.parametrize(
    "shape, row, needle",
    [
        ("qa", {"question": Q, "answer": "   "}, '"answer" is empty'),
        ("qa", {"question": Q, "answer": 3}, '"answer" must be a string'),
        ("messages", {"messages": [{"role": "user", "content": Q}]}, "no assistant message"),
        ("messages", {"messages": []}, '"messages" must be a non-empty list'),
        ("messages", {"messages": [{"role": "robot", "content": Q}]}, "role"),
        ("qa", {"question": Q, "answer": A, "keywords": "1910"}, '"keywords" must be a list'),
        ("qa", {"question": Q, "answer": A, "keywords": ["1910", ""]}, '"keywords" must be a list'),
        ("instruction", {"instruction": Q, "input": 5, "output": A}, '"input" must be a string'),
    ],
    ids=["empty_answer", "answer_not_string", "no_assistant", "empty_messages", "bad_role", "keywords_str",
         "keywords_empty_item", "input_not_string"],
)
def test_bad_lines_give_clear_errors(tmp_path, shape, row, needle):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[shape], row, GOOD[shape]])
    msg = error_of(read_jsonl, path)
    assert f"{path}:2" in msg
    assert needle in msg


def test_missing_and_empty_files(tmp_path):
    assert "not found" in error_of(read_jsonl, tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no examples" in error_of(read_jsonl, empty)


# ---------------------------------------------------------------- encoding


def targets(enc) -> list[int]:
    return [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]


def test_answer_mask_is_answer_plus_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode(chat(), tok, 512)
    assert len(enc.input_ids) == len(enc.loss_mask)
    assert not enc.truncated
    assert enc.input_ids[-1] == tok.eos_token_id and enc.loss_mask[-1]
    assert tok.decode(targets(enc)).strip() == A + tok.eos_token
    # the masked-in tokens are one contiguous block at the end: the prompt is all False
    first = enc.loss_mask.index(True)
    assert all(enc.loss_mask[first:]) and not any(enc.loss_mask[:first])
    assert Q in tok.decode(enc.input_ids[:first])
    assert A not in tok.decode(enc.input_ids[:first])
    assert enc.n_targets == len(targets(enc))


def test_train_on_prompt_masks_everything_in(tiny_tokenizer):
    enc = encode(chat(), tiny_tokenizer, 512, train_on_prompt=True)
    assert all(enc.loss_mask)
    assert enc.input_ids == encode(chat(), tiny_tokenizer, 512).input_ids
    assert enc.n_targets == len(enc.input_ids) - 1  # nothing predicts the first token


def test_multi_turn_both_answers_are_targets(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "user", "content": "Olá, quem és?"}, {"role": "assistant", "content": "Sou o Farense."},
            {"role": "user", "content": "E onde jogas?"}, {"role": "assistant", "content": "No São Luís."}]
    enc = encode(Example(msgs, None), tok, 512)
    # contiguous runs of target tokens
    runs, current = [], []
    for t, m in zip(enc.input_ids, enc.loss_mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tok.decode(r).strip() for r in runs] == ["Sou o Farense." + tok.eos_token, "No São Luís." + tok.eos_token]
    prompt_text = tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if not m])
    assert "Olá, quem és?" in prompt_text and "E onde jogas?" in prompt_text
    assert "Sou o Farense" not in prompt_text and "No São Luís" not in prompt_text


def test_text_shape_all_targets_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode(Example(None, "O Farense é de Faro."), tok, 512)
    assert all(enc.loss_mask)
    assert enc.input_ids[-1] == tok.eos_token_id
    assert enc.input_ids.count(tok.eos_token_id) == 1
    assert tok.decode(enc.input_ids, skip_special_tokens=True).strip() == "O Farense é de Faro."


def test_truncation(tiny_tokenizer):
    full = encode(chat(), tiny_tokenizer, 512)
    short = encode(chat(), tiny_tokenizer, 10)
    assert short.truncated and not full.truncated
    assert len(short.input_ids) == len(short.loss_mask) == 10
    assert short.input_ids == full.input_ids[:10] and short.loss_mask == full.loss_mask[:10]
    exact = encode(chat(), tiny_tokenizer, len(full.input_ids))
    assert not exact.truncated and exact.input_ids == full.input_ids


def test_system_prompt_is_rendered(tiny_tokenizer):
    tok = tiny_tokenizer
    system = "Responde sempre em português europeu."
    enc = encode(chat(), tok, 512, system_prompt=system)
    first = enc.loss_mask.index(True)
    assert system in tok.decode(enc.input_ids[:first])
    assert tok.decode(targets(enc)).strip() == A + tok.eos_token
    assert system in tok.decode(prompt_ids(tok, Q, system))
    # an example that brings its own system message keeps it and gets no second one
    own = Example([{"role": "system", "content": "Outro."}, *chat().messages], None)
    text = tok.decode(encode(own, tok, 512, system_prompt=system).input_ids)
    assert "Outro." in text and system not in text


@pytest.mark.parametrize("system", [None, "És um assistente do Farense."])
def test_prompt_ids_is_training_prefix(tiny_tokenizer, system):
    """The model sees at inference exactly the prompt it was trained on."""
    enc = encode(chat(), tiny_tokenizer, 512, system_prompt=system)
    first = enc.loss_mask.index(True)
    assert prompt_ids(tiny_tokenizer, Q, system) == enc.input_ids[:first]
    # a message list gives the same as the bare question
    assert prompt_ids(tiny_tokenizer, [{"role": "user", "content": Q}], system) == enc.input_ids[:first]


def test_tokenizer_without_chat_template(tiny_tokenizer):
    class NoTemplate:
        chat_template = None

    msg = error_of(data.render, NoTemplate(), chat().messages)
    assert "chat template" in msg and '"text"' in msg


# ---------------------------------------------------------------- batching


@pytest.mark.parametrize("group", [False, True])
def test_batch_order(group):
    lengths = [(i * 37) % 101 + 1 for i in range(203)]
    a = batch_order(lengths, 4, seed=1, epoch=0, group_by_length=group)
    assert a == batch_order(lengths, 4, seed=1, epoch=0, group_by_length=group)  # deterministic
    for epoch in range(3):
        order = batch_order(lengths, 4, seed=1, epoch=epoch, group_by_length=group)
        flat = [i for b in order for i in b]
        assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
        assert sorted(len(b) for b in order) == [3] + [4] * 50  # 203 = 50 full batches + 3
        assert order != a or epoch == 0
    assert batch_order(lengths, 4, seed=1, epoch=1, group_by_length=group) != a  # another epoch, another order
    assert batch_order(lengths, 4, seed=2, epoch=0, group_by_length=group) != a  # another seed, another order


def test_group_by_length_pads_less():
    lengths = [(i * 37) % 101 + 1 for i in range(256)]

    def padding(order):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in order)

    grouped = batch_order(lengths, 4, 0, 0, True)
    plain = batch_order(lengths, 4, 0, 0, False)
    assert padding(grouped) < padding(plain) / 2


# ---------------------------------------------------------------- split


def _split_rows(n=60):
    rows = [{"question": f"Pergunta número {i}?", "answer": f"Resposta {i}.", "keywords": [str(i)]} for i in range(n)]
    # the same question twice, with different case/spacing: must stay on one side
    rows.append({"question": "  pergunta NÚMERO 7? ", "answer": "Outra resposta 7.", "keywords": ["7"]})
    return rows


def test_split_file(tmp_path):
    src = write_jsonl(tmp_path / "all.jsonl", _split_rows())
    out1, out2 = tmp_path / "a", tmp_path / "b"
    train_path, val_path, n_train, n_val, notices = split_file(src, 0.1, seed=3, out_dir=out1)
    assert notices == []
    assert (train_path, val_path) == (out1 / "train.jsonl", out1 / "val.jsonl")
    assert n_train + n_val == 61
    assert 5 <= n_val <= 8  # ~10% of 60 distinct questions
    train, val = read_jsonl(train_path), read_jsonl(val_path)
    assert (len(train), len(val)) == (n_train, n_val)
    assert not {normalise(e.question) for e in train} & {normalise(e.question) for e in val}
    # every input line lands on exactly one side, unchanged
    src_lines = sorted(src.read_text().splitlines())
    assert sorted(train_path.read_text().splitlines() + val_path.read_text().splitlines()) == src_lines
    # deterministic: same seed, same files
    split_file(src, 0.1, seed=3, out_dir=out2)
    assert (out2 / "train.jsonl").read_text() == train_path.read_text()
    assert (out2 / "val.jsonl").read_text() == val_path.read_text()
    # another seed, another split
    split_file(src, 0.1, seed=4, out_dir=tmp_path / "c")
    assert (tmp_path / "c" / "val.jsonl").read_text() != val_path.read_text()


def test_split_refuses_to_overwrite_input(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", _split_rows())
    before = src.read_text()
    msg = error_of(split_file, src, 0.1, 0)
    assert "overwrite" in msg
    assert src.read_text() == before
    assert not (tmp_path / "val.jsonl").exists()


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_split_bad_fraction(tmp_path, fraction):
    src = write_jsonl(tmp_path / "all.jsonl", _split_rows())
    msg = error_of(split_file, src, fraction, 0, tmp_path / "out")
    assert "--val-fraction" in msg and str(fraction) in msg
    assert not (tmp_path / "out").exists()


def test_split_too_few_questions(tmp_path):
    src = write_jsonl(tmp_path / "all.jsonl", [{"question": "a", "answer": "b"}])
    assert "too few" in error_of(split_file, src, 0.5, 0, tmp_path / "out")


# ---------------------------------------------------------------- bundled data


def test_bundled_farense_data():
    train = read_jsonl(DATA_DIR / "train.jsonl")
    val = read_jsonl(DATA_DIR / "val.jsonl")
    assert len(train) + len(val) >= 600
    assert len(val) > 0
    for ex in train + val:
        assert ex.keywords, f"{ex.source}: no keywords"
        assert ex.messages is not None and ex.question and ex.answer
    train_q = {normalise(e.question) for e in train}
    leaked = [e.source for e in val if normalise(e.question) in train_q]
    assert not leaked, f"validation questions also in train: {leaked[:5]}"
