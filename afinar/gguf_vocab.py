"""The tokenizer of an HF folder as GGUF metadata, the way llama.cpp's converter writes it.

Three tokenizer kinds cover the llama, mistral and qwen2 families:
  tokenizer.model (SentencePiece)          -> `llama` model, pieces, scores and types from the file
  tokenizer.json BPE with byte fallback    -> `llama` model (what a re-saved Mistral/Llama 2 tokenizer
                                              becomes); scores rebuilt from the merge order
  tokenizer.json byte-level BPE            -> `gpt2` model with merges and a pre-tokenizer name
Special token ids, merges and the chat template come from `gguf.SpecialVocab`, llama.cpp's helper.
"""

from __future__ import annotations

import json
from pathlib import Path

from afinar.errors import AfinarError

# How tokenizer.json splits text before BPE -> the name llama.cpp gives that split (llama-vocab.cpp
# implements each by name). llama.cpp's converter recognises a model by hashing the ids of a probe
# text instead; reading the split itself also recognises a re-saved or extended tokenizer.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    ("bytelevel-gpt2",): "gpt-2",
    ("digits", "bytelevel-gpt2"): "smollm",
    (_LLAMA3, "bytelevel"): "llama-bpe",
    (_QWEN2, "bytelevel"): "qwen2",
    (_TEKKEN, "bytelevel"): "tekken",
}


def add_tokenizer(writer, folder: Path, n_vocab: int) -> None:
    """Write tokens, scores, types, merges, special ids, add_bos/add_eos and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    folder = Path(folder)
    tok_json = _read_json(folder / "tokenizer.json")
    if (folder / "tokenizer.model").is_file():
        model, pre, base = "llama", "default", _sentencepiece_tokens(folder)
    elif tok_json.get("model", {}).get("type") == "BPE" and tok_json["model"].get("byte_fallback"):
        model, pre, base = "llama", "default", _byte_fallback_tokens(tok_json)
    elif tok_json.get("model", {}).get("type") == "BPE":
        model, pre, base = "gpt2", bpe_pre_tokenizer(tok_json, folder), _bpe_tokens(tok_json)
    else:
        raise AfinarError(f"{folder}: no tokenizer.model and no BPE tokenizer.json; afinar exports SentencePiece "
                          "and BPE tokenizers to GGUF (the llama, mistral and qwen2 families use one of them).")
    tokens, scores, types = _fill(base, tok_json.get("added_tokens", []), n_vocab, folder)

    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if model == "llama":  # llama.cpp's SentencePiece tokenizer merges by score; byte-level BPE by merge rank
        writer.add_token_scores(scores)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=n_vocab)
    # Whether BOS/EOS are added is read off the tokenizer's behaviour: a transformers 5
    # tokenizer_config.json often does not say, and llama.cpp's default differs by model.
    hf = AutoTokenizer.from_pretrained(folder)
    ids = hf("Olá")["input_ids"]
    special.add_special_token["bos"] = hf.bos_token_id is not None and ids[:1] == [hf.bos_token_id]
    special.add_special_token["eos"] = hf.eos_token_id is not None and ids[-1:] == [hf.eos_token_id]
    special.add_to_gguf(writer, quiet=True)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _sentencepiece_tokens(folder: Path) -> dict[int, tuple[str, float, int]]:
    """id -> (piece, score, type) from tokenizer.model, typed as llama.cpp types them."""
    from gguf.vocab import SentencePieceVocab

    spm = SentencePieceVocab(folder)
    return {i: (text.decode("utf-8"), score, int(kind)) for i, (text, score, kind) in enumerate(spm.sentencepiece_tokens())}


def _byte_fallback_tokens(tok_json: dict) -> dict[int, tuple[str, float, int]]:
    """id -> (piece, score, type) for a SentencePiece-style BPE saved as tokenizer.json.

    llama.cpp merges the adjacent pair whose joined piece has the highest score; BPE applies the
    lowest-ranked merge. Scoring each piece by minus the rank of the merge that makes it gives
    both the same order.
    """
    import gguf

    rank = {}
    for i, merge in enumerate(tok_json["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    out = {}
    for piece, i in tok_json["model"]["vocab"].items():
        is_byte = len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
        kind = gguf.TokenType.BYTE if is_byte else gguf.TokenType.NORMAL
        out[i] = (piece, -float(rank.get(piece, -1) + 1), int(kind))
    return out


def _bpe_tokens(tok_json: dict) -> dict[int, tuple[str, float, int]]:
    import gguf

    return {i: (piece, 0.0, int(gguf.TokenType.NORMAL)) for piece, i in tok_json["model"]["vocab"].items()}


def _looks_special(text: str) -> bool:
    """Added tokens some models forget to mark special (llama.cpp's does_token_look_special)."""
    return (text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")))


def _fill(base: dict, added: list[dict], n_vocab: int, folder: Path) -> tuple[list[str], list[float], list[int]]:
    """Exactly `n_vocab` entries: the base vocabulary, then added tokens, then `[PADi]` for unused ids."""
    import gguf

    T = gguf.TokenType
    tokens, scores, types = [f"[PAD{i}]" for i in range(n_vocab)], [-1000.0] * n_vocab, [int(T.UNUSED)] * n_vocab
    for entries, what in ((base.items(), "vocabulary"), (((a["id"], a) for a in added), "added tokens")):
        for i, entry in entries:
            if i >= n_vocab:
                raise AfinarError(f"{folder}: the tokenizer's {what} has id {i}, but config.json vocab_size is {n_vocab}: "
                                  "the embedding matrix has no row for it. Resize the embeddings (resize_token_embeddings) and save again.")
            if what == "vocabulary":
                tokens[i], scores[i], types[i] = entry
            else:  # llama.cpp marks added tokens control (special) or user-defined, matched whole in text
                special = entry.get("special") or _looks_special(entry["content"])
                tokens[i], scores[i] = entry["content"], -1000.0
                types[i] = int(T.CONTROL if special else T.USER_DEFINED)
    return tokens, scores, types


def _pre_steps(tok_json: dict) -> tuple:
    """tokenizer.json's pre-tokenizer as a comparable tuple of steps."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    out = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space", False):
            out.append("bytelevel-gpt2" if step.get("use_regex", True) else "bytelevel")
        elif kind == "Digits" and step.get("individual_digits"):
            out.append("digits")
        elif kind == "Split" and "Regex" in step.get("pattern", {}) and step.get("behavior", "").lower() == "isolated" and not step.get("invert"):
            out.append(step["pattern"]["Regex"])
        else:
            out.append(json.dumps(step, sort_keys=True))
    return tuple(out)


def bpe_pre_tokenizer(tok_json: dict, folder: Path | str = "tokenizer.json") -> str:
    """llama.cpp's name for this byte-level BPE's pre-tokenizer, or a clear error."""
    name = PRE_TOKENIZERS.get(_pre_steps(tok_json))
    if name is None:
        raise AfinarError(
            f"{folder}: the BPE pre-tokenizer {json.dumps(tok_json.get('pre_tokenizer'))[:300]} is not one afinar can "
            f"name for llama.cpp (known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}). Export with --merged and "
            "convert that folder with llama.cpp's convert_hf_to_gguf.py, which knows more tokenizers."
        )
    return name
