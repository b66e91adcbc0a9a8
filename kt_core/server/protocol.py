"""Request bodies of the OpenAI-compatible API (the subset kt-core implements, plus
vLLM-style extensions top_k, min_p, repetition_penalty, ignore_eos) and the OpenAI
error body. Unknown fields are ignored, as the OpenAI API ignores most of them;
fields kt-core cannot honour (n > 1, logprobs, echo, presence / frequency penalties, logit_bias,
a JSON response_format, tools) are refused with a clear 400 unless sent at their no-op value.

Sampling fields are bounded to what the sampler can take (the ranges of
``kt_core.runtime.sampling``); NaN and infinities are refused. The response models at
the end only describe the answers in the OpenAPI document."""
from __future__ import annotations

from typing import Annotated, Any, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from kt_core.runtime.sampling import (REPETITION_PENALTY_MAX, REPETITION_PENALTY_MIN, SEED_MAX, SEED_MIN,
                                      TEMPERATURE_FLOOR, TOP_K_MAX)


STOP_MAX_CHARS = 1024  # a stop sequence's length at most: each token checks the text's tail against it
CACHE_SALT_MAX_CHARS = 1024  # a request's cache_salt at most (it is hashed into every block name of its prompt)

# What the OpenAPI document says a field takes, where the server's own checks (which answer with
# a clear 400 naming the field) accept less than the Python type does: the document describes
# what the server takes, the validation stays where its message is best.
_NULL = {"type": "null"}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA = WithJsonSchema({"anyOf": [
    {"type": "string", "minLength": 1}, _IDS,
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
    {"type": "array", "items": _IDS, "minItems": 1, "maxItems": 1}],
    "description": "one prompt: text or token ids (a list of one of them is accepted too)"})
STOP_SCHEMA = WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                               "maxItems": 4}, _NULL]})
UNSUPPORTED = WithJsonSchema({**_NULL, "description": "not supported by kt-core: omit it or send null"})
FALSE_ONLY = WithJsonSchema({"anyOf": [{"type": "boolean", "enum": [False]}, _NULL],
                             "description": "not supported by kt-core: omit it, false or null"})
NO_TOOLS = WithJsonSchema({"anyOf": [{"type": "array", "maxItems": 0}, _NULL],
                           "description": "tools are not supported by kt-core"})


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    # sampling floats are strict: a number (an integer is fine), never a boolean or a string
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True,
                               description=f"0, or anything below {TEMPERATURE_FLOOR:g}: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Annotated[Optional[Union[str, List[str]]], STOP_SCHEMA] = None
    seed: Annotated[Optional[int], WithJsonSchema({"anyOf": [{"type": "integer", "minimum": SEED_MIN,
                                                                "maximum": SEED_MAX}, _NULL]})] = \
        Field(None, ge=SEED_MIN, le=SEED_MAX, strict=True)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, strict=True)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, strict=True)
    user: Optional[str] = None
    # extensions (as in vLLM)
    top_k: int = Field(0, ge=0, le=TOP_K_MAX, strict=True, description="0, or any value >= the vocabulary size: off")
    min_p: float = Field(0.0, ge=0.0, le=1.0, strict=True)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_MIN, le=REPETITION_PENALTY_MAX,
                                      description="1: off", strict=True)
    ignore_eos: bool = False
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=CACHE_SALT_MAX_CHARS, strict=True, description=(
        "requests share cached prompt prefixes (and usage.prompt_tokens_details.cached_tokens counts them) only with "
        "requests of the same cache_salt: give each tenant its own to keep their prompts apart"))

    # sent but not honoured by kt-core: refused unless at their no-op value (a client that sets them
    # expects them to act)
    logit_bias: Annotated[Optional[dict], WithJsonSchema({"anyOf": [{"type": "object", "maxProperties": 0}, _NULL],
                                                           "description": "not supported by kt-core"})] = None
    response_format: Annotated[Optional[dict], WithJsonSchema({"anyOf": [
        {"type": "object", "properties": {"type": {"enum": ["text"]}}}, _NULL],
        "description": "only {'type': 'text'}: kt-core has no JSON mode"})] = None
    top_logprobs: Annotated[Optional[int], UNSUPPORTED] = None
    tool_choice: Annotated[Optional[Any], WithJsonSchema({"anyOf": [{"enum": ["none"]}, _NULL],
                                                         "description": "tools are not supported by kt-core"})] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        for s in [v] if isinstance(v, str) else v or []:
            if len(s) > STOP_MAX_CHARS:
                raise ValueError(f"a stop sequence is {len(s)} characters; at most {STOP_MAX_CHARS}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v, info):
        if v != 0:
            raise ValueError(f"{info.field_name} is not supported by kt-core (send 0 or omit it); "
                             "repetition_penalty is")
        return v

    @field_validator("logit_bias", "top_logprobs")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported by kt-core: omit it")
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        if v and v.get("type", "text") != "text":
            raise ValueError(f"response_format {v.get('type')!r} is not supported by kt-core (no JSON mode): "
                             "omit it or send {'type': 'text'}")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if v not in (None, "none"):
            raise ValueError("tools are not supported by kt-core: omit tool_choice or send 'none'")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: Annotated[Union[str, List[int], List[str], List[List[int]]], PROMPT_SCHEMA]
    max_tokens: Optional[int] = Field(16, ge=0, strict=True)
    logprobs: Annotated[Optional[int], UNSUPPORTED] = None
    echo: Annotated[Optional[bool], FALSE_ONLY] = False
    suffix: Annotated[Optional[str], UNSUPPORTED] = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[TextPart]]] = None
    name: Optional[str] = None

    def plain(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0, strict=True)
    max_completion_tokens: Optional[int] = Field(None, ge=0, strict=True)
    logprobs: Annotated[Optional[bool], FALSE_ONLY] = None
    tools: Annotated[Optional[List[Any]], NO_TOOLS] = None


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- answers, for the OpenAPI document ------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: List[ModelCard]
