"""Request bodies of `afinar serve`, following OpenAI's chat completions schema.

Unknown fields are ignored (clients send many: `user`, `logprobs`, ...); a known field with
a bad value is a 422. Defaults differ from OpenAI in one place: temperature 0 (greedy,
reproducible), as `afinar ask`.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]] = Field(description="A string, or a list of text parts.")

    def plain(self) -> dict:
        """{'role', 'content'} as the chat template wants it ('developer' is OpenAI's newer name for system)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    max_tokens: Optional[int] = Field(None, ge=1, description="Most new tokens; capped by serve.max_tokens.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, description="Sampling seed (requests batch together only with equal seeds).")


class ChatRequest(Sampling):
    model: Optional[str] = Field(None, description="Ignored: the server answers with its one run.")
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 strings that end the answer (not included).")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        return stops


class AskRequest(Sampling):
    question: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(128, ge=1, description="As `afinar ask --max-tokens`.")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the question is blank")
        return v
