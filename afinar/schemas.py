"""Request bodies of `afinar serve`, following OpenAI's chat completions schema, with every range checked.

What one request sends can never hurt another: every number has a validated range and every
string must be encodable text, so a bad value is a 400 naming the field (`messages[2].content`),
never a failure inside the batch it would have joined. The ranges:

- `temperature` 0 to 2; 0 is greedy, and so is anything below `TEMPERATURE_FLOOR` (1e-2): such
  temperatures only magnify rounding (1e-300 turns logits into inf), and greedy is their limit.
- `top_p` in (0, 1]; `max_tokens` / `max_completion_tokens` >= 1 (then capped by serve.max_tokens).
- `seed` any int64; it seeds this request's own sampling stream (used modulo 2**64). Without a
  seed a sampled request gets a fresh random one.
- `stop`: up to 4 non-empty strings; `stop_token_ids` (vLLM's extension): up to 16 token ids.
- Types are OpenAI's, strictly: `"stream": "yes"`, `"max_tokens": "4"` or `true` are 400s, not
  guesses. `null` means the default, as in OpenAI's API, for every optional field.

Features afinar does not implement are refused, not silently ignored: `n` > 1, `tools` /
`tool_choice` / `functions`, `logprobs` / `top_logprobs`, a `response_format` other than text,
non-zero `presence_penalty` / `frequency_penalty`, a non-empty `logit_bias`. Other unknown fields
(`user`, `metadata`, ...) are ignored. Defaults differ from OpenAI in one place: temperature 0
(greedy, reproducible), as `afinar ask`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from afinar.engine.request import TEMPERATURE_FLOOR

INT64 = 2**63


def _encodable(value: str) -> str:
    """Text the tokenizer can take: a lone surrogate ("\\ud800" in JSON) has no UTF-8 form."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: a lone surrogate {value[e.start]!r} at character {e.start} "
                         "(send the whole character, or remove it)") from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]


def field_path(loc) -> str:
    """A pydantic location as the field is written in the body: messages[2].content."""
    out = ""
    for part in loc:
        if part == "body" or isinstance(part, str) and "[" in part:  # 'body', and union members: list[TextPart]
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def describe_errors(errors: list[dict]) -> tuple[str, str]:
    """(one message naming each bad field and its value, the first field's path) of pydantic errors."""
    import json

    parts = []
    for e in errors[:5]:
        got = f" (got {json.dumps(e['input'], default=str)[:80]})" if "input" in e and e.get("type") != "missing" else ""
        parts.append(f"{field_path(e.get('loc', ()))}: {e.get('msg', 'invalid').removeprefix('Value error, ')}{got}")
    return "; ".join(parts), field_path(errors[0].get("loc", ())) if errors else "body"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]] = Field(description="A string, or a list of text parts.")

    @field_validator("content")
    @classmethod
    def _text(cls, v):
        return _encodable(v) if isinstance(v, str) else v

    def plain(self) -> dict:
        """{'role', 'content'} as the chat template wants it ('developer' is OpenAI's newer name for system)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(_Body):
    include_usage: Optional[StrictBool] = False


def _null_is(default):
    """A field validator (mode="before"): JSON null means the field's default, as in OpenAI's API."""
    def check(cls, v):
        return default if v is None else v
    return classmethod(check)


class Sampling(_Body):
    max_tokens: Optional[StrictInt] = Field(None, ge=1, description="Most new tokens; capped by serve.max_tokens.")
    temperature: StrictFloat = Field(0.0, ge=0.0, le=2.0, description=f"0 = greedy; below {TEMPERATURE_FLOOR} counts as 0.")
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[StrictInt] = Field(None, ge=-INT64, le=INT64 - 1,
                                      description="Seeds this request's own sampling stream (any int64); none = random.")

    _temperature_null = field_validator("temperature", mode="before")(_null_is(0.0))
    _top_p_null = field_validator("top_p", mode="before")(_null_is(1.0))

    @field_validator("temperature")
    @classmethod
    def _greedy_below_floor(cls, v: float) -> float:
        # Every engine sees the same request: below the floor a temperature only magnifies rounding
        # (1e-300 turns logits into inf), and greedy is its limit.
        return 0.0 if v < TEMPERATURE_FLOOR else v


def _refuse(what: str):
    def check(cls, v):
        if v not in (None, False, [], {}, 0, "none"):
            raise ValueError(f"{what} is not supported by afinar serve")
        return v
    return check


class ChatRequest(Sampling):
    model: Optional[Text] = Field(None, description="Ignored: the server answers with its one run.")
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 strings that end the answer (not included).")
    stop_token_ids: list[StrictInt] = Field([], max_length=16, description="Token ids that end the answer (vLLM's extension).")
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = Field(1, description="Only 1: one choice per request.")
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Any = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None

    _stop_ids_null = field_validator("stop_token_ids", mode="before")(_null_is([]))
    _stream_null = field_validator("stream", mode="before")(_null_is(False))
    _n_null = field_validator("n", mode="before")(_null_is(1))

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        return [_encodable(s) for s in stops]

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if any(not 0 <= t < INT64 for t in v):
            raise ValueError("token ids are >= 0")
        return v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            fix = f"send {v} requests (with seeds)" if v > 1 else "send n=1 or leave it out"
            raise ValueError(f"n={v}: afinar serve returns one choice per request; {fix}")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v != {"type": "text"}:
            raise ValueError('only {"type": "text"} is supported (no JSON mode or JSON schema)')
        return v

    _tools = field_validator("tools", "functions")(classmethod(_refuse("tool calling")))
    _tool_choice = field_validator("tool_choice", "function_call")(classmethod(_refuse("tool calling")))
    _logprobs = field_validator("logprobs", "top_logprobs")(classmethod(_refuse("returning log probabilities")))
    _penalties = field_validator("presence_penalty", "frequency_penalty")(classmethod(_refuse("a non-zero penalty")))
    _bias = field_validator("logit_bias")(classmethod(_refuse("logit_bias")))


class AskRequest(Sampling):
    question: Text = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(128, ge=1, description="As `afinar ask --max-tokens`.")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the question is blank")
        return v
