"""The OpenAI wire format the server speaks, as pydantic models.

Requests forbid unknown fields, so a parameter the server would not honour is a 400 naming it
rather than something silently ignored. OpenAI parameters that only have a neutral value here
(penalties, logprobs; top_p for LLaDA models, whose sampler has no nucleus sampling) are accepted
at that value and refused otherwise (see app.py).
Diffusion parameters ride as extra top-level fields, which is what the official client's
`extra_body={...}` sends. In responses, optional fields marked `omit_none` are left out when None
(`usage` on the last stream chunk only, `diffusion` on progress chunks only, `delta.role`), while
fields the format requires as null (`finish_reason`, `logprobs`) stay.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Request):
    include_usage: bool = False


class DiffusionParams(Request):
    """unmask's sampler settings; each falls back to the server default when absent."""

    steps: int | None = None
    block_length: int | None = None
    cfg_scale: float | None = None
    remasking: str | None = None
    threshold: float | None = None
    cache: str | None = None
    reuse_uncond: bool = False           # with cfg_scale: the unconditional branch only at refreshes (LLaDA2.x: per block)
    guidance: str | None = None          # the form of CFG, e.g. "linear", "span:0:-4", "acfg:0.7" (docs/guidance.md)
    top_k: int | None = None             # block-diffusion (LLaDA2.x) models: sample among the k likeliest tokens
    diffusion_progress: bool = False     # stream chunks carry the canvas in an extra `diffusion` field
    infill: bool = False                 # parse special tokens in the text: each mask token is a position to fill


class SamplingRequest(DiffusionParams):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False


def omit_none():
    return Field(default=None, exclude_if=lambda v: v is None)


class Response(BaseModel):
    def dump(self) -> dict:
        return self.model_dump(mode="json")


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(Response):
    role: Literal["assistant"] | None = omit_none()
    content: str | None = omit_none()


class ChunkChoice(Response):
    index: int
    delta: Delta
    finish_reason: str | None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = omit_none()
    diffusion: dict | None = omit_none()


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class Completion(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = omit_none()
    diffusion: dict | None = omit_none()


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "unmask"
    parent: str | None = None   # for a LoRA adapter, the base model it applies to (as vLLM lists them)


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Response):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())

