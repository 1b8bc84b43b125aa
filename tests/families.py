"""Tiny random models of the model families users bring, each saved by the installed transformers.

Every family gets a 2-layer, hidden-64 model built from its own transformers config class and
saved with `save_pretrained` (so rope settings are nested in `rope_parameters`, as transformers
5 writes them) with a rope theta that is neither transformers' nor mlx-lm's default, a tokenizer
carrying the family's special tokens and its real chat template, and a `generation_config.json`
with the family's list of end tokens. The tokenizers are SmolLM2's BPE tokenizer (the embedded
model's, already in the test cache) plus the family's added tokens; Mistral's is the real one
from mistral-common (afinar.synthetic). Nothing is downloaded.

The chat templates in tests/data/templates/ are the models' published templates, copied verbatim
(see SOURCES below): training and answering must work with each family's quirks (Qwen3's think
blocks, Phi's trailing EOS, Gemma-2's refusal of a system role, Llama-3's date header...).

`gemma3-vision` and `mistral3-vision` are multimodal checkpoints (Gemma3ForConditionalGeneration:
the Gemma-3 language model in `text_config`, a one-layer SigLIP vision tower and its projector;
Mistral3ForConditionalGeneration: a Mistral decoder and a one-layer Pixtral tower), saved with the
checkpoint names transformers 5 writes (language_model.model.*, vision_tower.*).

`family_models` (session fixture): `family_models(name) -> Path`, building each folder once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

TEMPLATES = Path(__file__).parent / "data" / "templates"

# Where each template file comes from (all copied verbatim; llama.cpp keeps the vendors' templates
# in models/templates/, read at github.com/ggml-org/llama.cpp and its mirror ye-NX/llama.cpp).
SOURCES = {
    "llama-3.1.jinja": "llama.cpp models/templates/meta-llama-Llama-3.3-70B-Instruct.jinja (the Llama-3.1/3.3 template)",
    "llama-3.2.jinja": "llama.cpp models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja",
    "qwen2.5.jinja": "Qwen/Qwen2.5-7B-Instruct tokenizer_config.json chat_template (as quoted by xLLM's chat template benchmark)",
    "qwen3.jinja": "llama.cpp models/templates/Qwen-Qwen3-0.6B.jinja",
    "gemma-2.jinja": "llama.cpp models/templates/google-gemma-2-2b-it.jinja",
    "gemma-3.jinja": "google/gemma-3 -it tokenizer_config.json chat_template (as quoted by the Berkeley function-calling leaderboard's Gemma handler)",
    "phi-3.5.jinja": "llama.cpp models/templates/microsoft-Phi-3.5-mini-instruct.jinja",
    "phi-4-mini.jinja": "microsoft/Phi-4-mini-instruct tokenizer_config.json chat_template (as quoted by guidance's chat templates)",
    "granite-3.3.jinja": "llama.cpp models/templates/ibm-granite-granite-3.3-2B-Instruct.jinja",
}

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    config: dict  # config-class arguments beyond TINY
    template: str | None  # file in TEMPLATES; None: the tokenizer's own (Mistral) or no template at all
    bos: str | None = None
    eos: str = ""
    pad: str | None = None
    specials: tuple[str, ...] = ()  # added special tokens (bos/eos/pad are added when missing)
    plain: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's think tags)
    generation_eos: tuple[str, ...] = ()  # generation_config.json eos_token_id, in this order
    tokenizer: str = "smollm2"  # or "mistral"
    fused: bool = False  # q/k/v and gate/up are one layer each (phi3)
    # A multimodal checkpoint (...ForConditionalGeneration): its top-level config beyond text_config, which
    # gets TINY + `config`; and the config keys that name image tokens, with the tokens (added to the tokenizer).
    vision: dict | None = None
    image_tokens: tuple[tuple[str, str], ...] = ()


def _longrope(rotary_dims: int, theta: float) -> dict:
    """Phi-3.5/Phi-4-mini style longrope: per-frequency factors, short ones != 1 so they matter."""
    half = rotary_dims // 2
    return {"rope_type": "longrope", "rope_theta": theta,
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.5 + 0.25 * i for i in range(half)]}


LLAMA3_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>")
GEMMA_TOKENS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")
# Gemma-3 4B+ style: a SigLIP vision tower (hidden 32, one layer, 2x2 patches of 16 pixels) whose image
# becomes mm_tokens_per_image soft tokens; no pooling head, as the real checkpoints.
GEMMA3_VISION = dict(vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16,
                                        vision_use_head=False), mm_tokens_per_image=4)
GEMMA3_IMAGE_TOKENS = (("boi_token_index", "<start_of_image>"), ("eoi_token_index", "<end_of_image>"),
                       ("image_token_index", "<image_soft_token>"))
# Mistral-Small-3.1 style: a Pixtral vision tower (2x2 patches merged into one image token) on a Mistral decoder.
MISTRAL3_VISION = dict(vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=16, image_size=32, patch_size=16),
                       spatial_merge_size=2, tie_word_embeddings=False)
PHI_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# Gemma-3's language model: the text-only family and the image-text checkpoint's text_config alike.
GEMMA3_TEXT = dict(
    head_dim=16, query_pre_attn_scalar=24, tie_word_embeddings=True, sliding_window=512,
    layer_types=["sliding_attention", "full_attention"],
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 60000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 7000.0}})

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama3", "llama", dict(
        head_dim=16, max_position_embeddings=131072, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        "llama-3.1.jinja", bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        specials=LLAMA3_TOKENS, generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
    Family("llama3.2", "llama", dict(
        head_dim=16, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        "llama-3.2.jinja", bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        specials=LLAMA3_TOKENS, generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
    Family("qwen2.5", "qwen2", dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
           "qwen2.5.jinja", eos="<|im_end|>", pad="<|endoftext|>", generation_eos=("<|im_end|>", "<|endoftext|>")),
    Family("qwen3", "qwen3", dict(head_dim=16, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 30000.0}),
           "qwen3.jinja", eos="<|im_end|>", pad="<|endoftext|>", plain=("<think>", "</think>"),
           generation_eos=("<|im_end|>", "<|endoftext|>")),
    Family("mistral", "mistral", dict(head_dim=16, tie_word_embeddings=False, sliding_window=None,
                                      rope_parameters={"rope_type": "default", "rope_theta": 40000.0}),
           None, tokenizer="mistral", generation_eos=("</s>",)),
    Family("mistral3-vision", "mistral3", dict(head_dim=16, tie_word_embeddings=False, sliding_window=None,
                                               rope_parameters={"rope_type": "default", "rope_theta": 45000.0}),
           None, tokenizer="mistral", generation_eos=("</s>",), specials=("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
           vision=MISTRAL3_VISION, image_tokens=(("image_token_index", "[IMG]"),)),
    Family("gemma2", "gemma2", dict(
        head_dim=16, query_pre_attn_scalar=24, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
        "gemma-2.jinja", bos="<bos>", eos="<eos>", pad="<pad>", specials=GEMMA_TOKENS,
        generation_eos=("<eos>", "<end_of_turn>")),
    Family("gemma3", "gemma3_text", GEMMA3_TEXT,
        "gemma-3.jinja", bos="<bos>", eos="<eos>", pad="<pad>", specials=GEMMA_TOKENS,
        generation_eos=("<eos>", "<end_of_turn>")),
    Family("gemma3-vision", "gemma3", GEMMA3_TEXT,
        "gemma-3.jinja", bos="<bos>", eos="<eos>", pad="<pad>", specials=(*GEMMA_TOKENS, *(t for _, t in GEMMA3_IMAGE_TOKENS)),
        generation_eos=("<eos>", "<end_of_turn>"), vision=GEMMA3_VISION,
        image_tokens=GEMMA3_IMAGE_TOKENS),
    Family("phi3.5", "phi3", dict(
        tie_word_embeddings=False, max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_parameters=_longrope(16, 20000.0)),
        "phi-3.5.jinja", eos="<|endoftext|>", pad="<|endoftext|>", specials=PHI_TOKENS,
        generation_eos=("<|end|>", "<|endoftext|>"), fused=True),
    Family("phi4-mini", "phi3", dict(
        tie_word_embeddings=True, partial_rotary_factor=0.75, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_parameters={**_longrope(12, 25000.0), "partial_rotary_factor": 0.75}),
        "phi-4-mini.jinja", eos="<|endoftext|>", pad="<|endoftext|>", specials=(*PHI_TOKENS, "<|tool|>", "<|/tool|>"),
        generation_eos=("<|end|>", "<|endoftext|>"), fused=True),
    Family("granite", "granite", dict(
        tie_word_embeddings=True, logits_scaling=8.0, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=0.0078125, rope_parameters={"rope_type": "default", "rope_theta": 15000.0}),
        "granite-3.3.jinja", bos="<|end_of_text|>", eos="<|end_of_text|>", pad="<|end_of_text|>",
        specials=("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"),
        generation_eos=("<|end_of_text|>",)),
]}

# A base model without a chat template (trained on {"text"} data, asked in plain text).
BASE = Family("llama3-base", "llama", FAMILIES["llama3"].config, None, bos="<|begin_of_text|>", eos="<|end_of_text|>",
              pad="<|finetune_right_pad_id|>", specials=LLAMA3_TOKENS, generation_eos=("<|end_of_text|>",))


def _tokenizer(family: Family, folder: Path):
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    if family.tokenizer == "mistral":
        from afinar.synthetic import mistral_tokenizer

        tok = mistral_tokenizer(folder)
        if family.specials:  # Mistral-7B's vocabulary has no image tokens: add them as Tekken has them
            tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in family.specials])
            tok.save_pretrained(folder)
        return tok
    from afinar import models

    tok = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m-instruct").path)
    named = [t for t in (family.bos, family.eos, family.pad) if t]
    wanted = dict.fromkeys([*family.specials, *named])
    new = [AddedToken(t, special=True, normalized=False) for t in wanted if t not in tok.get_vocab()]
    new += [AddedToken(t, special=False, normalized=False) for t in family.plain]
    tok.add_tokens(new)
    tok.bos_token, tok.eos_token, tok.pad_token = family.bos, family.eos, family.pad
    tok.chat_template = (TEMPLATES / family.template).read_text(encoding="utf-8") if family.template else None
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build(family: Family, folder: str | Path, seed: int = 0) -> Path:
    """Write the family's tiny model folder (atomic); returns it. Seconds on CPU."""
    import torch
    from transformers import AutoConfig, GenerationConfig

    from afinar import atomic
    from afinar.backends.torch_model import lm_class

    folder = Path(folder)
    with atomic.folder(folder) as tmp:
        tok = _tokenizer(family, tmp)
        ids = lambda *tokens: [tok.convert_tokens_to_ids(t) for t in tokens]  # noqa: E731
        vocab = -(-len(tok) // 64) * 64  # padded like real checkpoints: some embedding rows have no token
        text = dict(**{**TINY, **family.config}, vocab_size=vocab, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if family.vision is None:
            config = AutoConfig.for_model(family.model_type, **text)
        else:  # the language model nested in text_config, as real multimodal checkpoints have it
            images = {key: tok.convert_tokens_to_ids(token) for key, token in family.image_tokens}
            config = AutoConfig.for_model(family.model_type, text_config=text, **family.vision, **images)
        torch.manual_seed(seed)
        model = lm_class(config.model_type).from_config(config, dtype=torch.float32)  # ...ForConditionalGeneration for vision
        with torch.no_grad():  # a random init this small gives near-uniform logits: spread them so comparisons bite
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, 0.2)
        model.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=ids(*family.generation_eos),
                         pad_token_id=tok.pad_token_id).save_pretrained(tmp)
    return folder


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """`family_models(name) -> Path`: the family's model folder, built on first use in this session."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}
    everyone = {**FAMILIES, BASE.name: BASE}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(everyone[name], root / name)
        return built[name]

    return get
