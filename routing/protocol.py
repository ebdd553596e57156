"""Request models the ingress validates before anything reaches an engine.

They mirror OpenAI's Chat Completions and Completions APIs plus the vLLM sampling extras
Tandem forwards. Unknown fields are rejected (400), as OpenAI does, instead of being silently
ignored; vLLM re-validates the forwarded body against its own models on the worker.

A body is bounded before it is parsed (`parse_body`): its JSON values are counted in a few
passes over its bytes, without building anything, and a body with more than
`admission.max_json_values` is refused before the parser makes an object of it; then
pydantic-core parses and validates the bytes itself (`model_validate_json`: no intermediate
dicts of Python's json module, nesting deeper than 200 refused). The lists below have hard
caps (`max_length`), the most any setting may allow; `admission.max_messages` and
`max_prompts`, the operator's knobs, are checked by the ingress under them.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The caps admission settings may lower: defined with those settings, enforced here.
from control_plane.settings import MAX_MESSAGES, MAX_N, MAX_PROMPTS

# Hard caps of the request models.
MAX_CONTENT_PARTS = 1024  # content parts of one message
MAX_PROMPT_TOKENS = 1 << 20  # token ids of one prompt
MAX_STOP = 4  # stop sequences (OpenAI's limit)
MAX_LOGIT_BIAS = 1024  # logit_bias entries
MAX_TOOLS = 128  # tools (OpenAI's limit)
MAX_TOKEN_ID_LIST = 1 << 18  # allowed_token_ids, logprob_token_ids (a vocabulary's worth)
MAX_STOP_TOKEN_IDS = 1024
MAX_BAD_WORDS = 1024
MAX_DOCUMENTS = 1024
MAX_ID_CHARS = 256  # request_id, session_id, cache_salt
# vLLM copies vllm_xargs into the engine request's extra args, where it also reads the P/D
# handoff: a client must never set that (a forged one would send decode to pull from any
# address), only Tandem's orchestration does.
RESERVED_XARGS = frozenset({"kv_transfer_params", "ec_transfer_params"})


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Forbid):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


def _at_most(value: Any, limit: int, what: str) -> Any:
    """A list longer than ``limit`` is refused (for fields whose type is a union, where a
    `max_length` error would name the union's member instead of the field). An after-check:
    a before-validator would make a Python copy of the whole JSON input first, and the body's
    JSON values are already bounded before parsing."""
    if isinstance(value, list) and len(value) > limit:
        raise ValueError(f"at most {limit} {what}, got {len(value)}")
    return value


class ChatMessage(BaseModel):
    # Content parts, tool calls and names vary by role and model; vLLM checks the details.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_parts_bounded(cls, value: Any) -> Any:
        return _at_most(value, MAX_CONTENT_PARTS, "content parts")


class _SamplingFields(_Forbid):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    user: str | None = None
    # vLLM sampling extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    # More vLLM extras, as vLLM 0.32's server accepts them (it checks them again on the
    # engine; here they are bounded). Not accepted: kv_transfer_params and
    # ec_transfer_params, which Tandem's orchestration sets.
    add_special_tokens: bool | None = None
    allowed_token_ids: list[int] | None = Field(None, max_length=MAX_TOKEN_ID_LIST)
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)
    cache_salt: str | None = Field(None, max_length=MAX_ID_CHARS)
    include_stop_str_in_output: bool | None = None
    length_penalty: float | None = None
    logprob_token_ids: list[int] | None = Field(None, max_length=MAX_TOKEN_ID_LIST)
    mm_payload: Literal["tensors", "none"] | None = None
    priority: int | None = None
    prompt_logprobs: int | None = Field(None, ge=-1)
    repetition_detection: dict[str, Any] | None = None
    request_id: str | None = Field(None, max_length=MAX_ID_CHARS)
    return_mm_kwargs: bool | None = None
    return_token_ids: bool | None = None
    return_token_offsets: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    routed_experts_prompt_start: int | None = Field(None, ge=0)
    session_id: str | None = Field(None, max_length=MAX_ID_CHARS)
    spaces_between_special_tokens: bool | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    stream_interval: int | None = Field(None, ge=1)
    structured_outputs: dict[str, Any] | None = None
    thinking_token_budget: int | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    use_beam_search: bool | None = None
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    watermarking: bool | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: Any) -> Any:
        return _at_most(value, MAX_STOP, "stop sequences")

    @field_validator("vllm_xargs")
    @classmethod
    def _no_reserved_xargs(cls, value: Any) -> Any:
        reserved = sorted(RESERVED_XARGS & set(value or ()))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} may not be set by a client")
        return value


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's chat extras
    add_generation_prompt: bool | None = None
    chat_template: str | None = None  # refused by the engine unless it trusts request templates
    continue_final_message: bool | None = None
    documents: list[dict[str, str]] | None = Field(None, max_length=MAX_DOCUMENTS)
    echo: bool | None = None
    include_reasoning: bool | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    return_prompt_text: bool | None = None

    def output_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    # Accepted and ignored, as by vLLM 0.32 (its V1 engine has no best_of).
    best_of: int | None = Field(None, ge=1, le=16)
    prompt_embeds: str | list[str] | None = None  # base64 tensors (engines started to take them)
    response_format: dict[str, Any] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty_and_bounded(cls, value: Any) -> Any:
        if isinstance(value, (str, list)) and len(value) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and isinstance(value[0], (str, list)):
            _at_most(value, MAX_PROMPTS, "prompts")
            for one in value:
                _at_most(one, MAX_PROMPT_TOKENS, "token ids in a prompt")
            return value
        return _at_most(value, MAX_PROMPT_TOKENS, "token ids in a prompt")

    def output_budget(self) -> int | None:
        return self.max_tokens


def forwarded_body(request: _SamplingFields) -> dict[str, Any]:
    """What goes to the engine: only the fields the client set (as
    ``model_dump(mode="json", exclude_unset=True)``), sharing the free-form parts (content
    parts, tools, schemas: already plain JSON values) instead of copying them."""
    return _plain(request)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        set_fields = value.model_fields_set
        fields = {name: _plain(getattr(value, name)) for name in type(value).model_fields if name in set_fields}
        return {**fields, **(value.__pydantic_extra__ or {})}
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return [_plain(item) for item in value]
    return value


# ---- bounding a body before it is parsed

_Request = TypeVar("_Request", bound=BaseModel)
_BOM = b"\xef\xbb\xbf"
_SCAN_CHUNK = 1 << 20
_QUOTE, _COMMA, _OPEN_BRACE, _OPEN_BRACKET = b'"'[0], b","[0], b"{"[0], b"["[0]


class TooManyValues(ValueError):
    """A body with more JSON values than the limit (refused before it is parsed)."""

    def __init__(self, limit: int):
        super().__init__(f"Request body too complex: more than {limit} JSON values.")
        self.limit = limit


def json_values_bound(raw: bytes, limit: int) -> int:
    """An upper bound on the JSON values in ``raw`` without parsing it: 1 + the commas and
    opening brackets outside strings (each container holds its commas + 1 values; exact for
    a valid document but for one per empty container). Counting stops once past ``limit``.

    Costs a few C-speed passes over the bytes and, only for bodies whose raw counts are past
    the limit, two copies of them and a chunk's worth of numpy arrays. A malformed body can
    be miscounted only past its first error, where the parser stops anyway.
    """
    count = raw.count(b",") + raw.count(b"{") + raw.count(b"[") + 1
    if count <= limit:
        return count  # separators inside strings counted too: still an upper bound
    import numpy as np

    if b"\\" in raw:
        # Escapes out of the way, paired left to right as a JSON parser pairs them (an escaped
        # backslash, then an escaped quote), so that every quote left opens or closes a string.
        raw = raw.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    data = np.frombuffer(raw, dtype=np.uint8)
    count, inside = 1, False
    for start in range(0, len(data), _SCAN_CHUNK):
        chunk = data[start:start + _SCAN_CHUNK]
        # True inside a string (its opening quote included, its closing quote not).
        in_string = np.logical_xor.accumulate(chunk == _QUOTE)
        if inside:
            np.logical_not(in_string, out=in_string)
        inside = bool(in_string[-1])
        separators = (chunk == _COMMA) | (chunk == _OPEN_BRACE) | (chunk == _OPEN_BRACKET)
        separators &= ~in_string
        count += int(np.count_nonzero(separators))
        if count > limit:
            break
    return count


def parse_body(model: type[_Request], raw: bytes, max_values: int) -> _Request:
    """Bound, parse and validate a request body; raises TooManyValues or pydantic's
    ValidationError (errors of type ``json_invalid`` for what is not JSON)."""
    if raw.startswith(_BOM):  # Python's json accepted it; pydantic-core's parser does not
        raw = raw[len(_BOM):]
    if json_values_bound(raw, max_values) > max_values:
        raise TooManyValues(max_values)
    return model.model_validate_json(raw)


# ---- response shapes (the OpenAPI document the ingress serves; clients and the fuzz tests
# check answers against them). Extra fields are allowed: vLLM adds its own.


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class ChatChoice(_Open):
    index: int
    message: dict[str, Any]
    finish_reason: str | None


class ChatCompletionResponse(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: str | None


class CompletionResponse(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "unhealthy", "draining"]
    mode: str
    pools: dict[str, str] | None = None
