"""The request bodies `odlora serve` reads, as pydantic models, and OpenAI's error JSON.

    ChatCompletionRequest.model_validate_json(raw)     # via parse_body(), which turns a failure into an APIError

pydantic parses the raw bytes itself (its Rust JSON parser), which is what makes bad input cheap
and harmless: invalid UTF-8, a lone surrogate (`"\\ud800"`), nesting past its recursion limit
and integers of thousands of digits are invalid JSON; NaN, Infinity and 1e400 fail the finiteness
check; every type is strict (`"max_tokens": "8"` or `true` is a wrong type, as JSON has it) and
every number has OpenAI's range. The first problem becomes a 400 that names the field in `param`
(`messages[0].content`), never a 500.

Every field is either honoured or refused: a field these models do not name (`tools`, `audio`,
`suffix`, ...) is a 400 `unsupported_parameter` naming it, never silently dropped. A field that
is absent or null takes odlora's default (greedy, 128 tokens: `SamplingConfig`'s), not OpenAI's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse

from ..config import SamplingConfig
from ..formats.schemas import field_path

MAX_SEED = 2**63 - 1  # what a torch.Generator takes (and a signed 64-bit seed field in any client)
MAX_TOKENS = 2**31 - 1  # the generation also stops at the end of the export's KV cache
MAX_TEMPERATURE = 2.0  # OpenAI's ranges, from here on
MAX_STOPS = 4
MAX_CHOICES = 128
MAX_TOP_LOGPROBS = 20  # chat; completions' `logprobs` takes up to 5
DEFAULTS = SamplingConfig()

# pydantic's error types -> OpenAI's `code`; any other type is a value out of its range.
CODES = {"missing": "missing_required_parameter", "json_invalid": "invalid_json", "json_type": "invalid_json",
         "unsupported_value": "unsupported_value", "extra_forbidden": "unsupported_parameter"}


class APIError(Exception):
    """A failed request, answered with OpenAI's error JSON (and `headers`, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


class Schema(BaseModel):
    """JSON's types as they are (no "8" for 8), finite numbers only, no field we do not honour."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


def unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_value", message)


class ContentPart(Schema):
    type: Literal["text"]  # images, audio and files: this server serves text models
    text: str


class Message(Schema):
    role: Literal["system", "developer", "user", "assistant"]  # no `tool`: tools are not supported
    content: list[ContentPart]  # a string is one text part
    name: Optional[str] = None  # handed to the chat template with the message

    @field_validator("content", mode="before")
    @classmethod
    def text_as_part(cls, value: Any) -> Any:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value

    def to_dict(self) -> dict:
        """The message as a chat template reads it (`developer` is the newer name of `system`)."""
        out = {"role": "system" if self.role == "developer" else self.role,
               "content": "".join(part.text for part in self.content)}
        return out if self.name is None else {**out, "name": self.name}


class StreamOptions(Schema):
    include_usage: bool = False  # one more chunk at the end, with the token counts


class JsonSchemaFormat(Schema):
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")  # None: any JSON object
    strict: Optional[bool] = None  # the answer always matches the schema here, strict or not


class ResponseFormat(Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def schema_for_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise unsupported("`json_schema` is given with, and only with, type 'json_schema'")
        return self


StopString = Annotated[str, Field(min_length=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Bias = Annotated[float, Field(ge=-100, le=100)]


class GenerationRequest(Schema):
    """The fields both completion endpoints read."""

    model: str  # `base`, an adapter id or a blend `a:0.7+b:0.3`
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS)
    temperature: Optional[float] = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)  # not OpenAI's, but vLLM's and llama.cpp's: 0 is off
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: Optional[list[StopString]] = Field(None, max_length=MAX_STOPS)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(None, ge=1, le=MAX_CHOICES)
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    logit_bias: Optional[dict[str, Bias]] = None  # token id (as JSON keys are strings) -> bias
    user: Optional[str] = None  # an end user's id, for the caller's own records: not used here

    @field_validator("stop", mode="before")
    @classmethod
    def one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("logit_bias")
    @classmethod
    def token_ids(cls, value: Optional[dict]) -> Optional[dict]:
        for key in value or {}:
            if not (key.isascii() and key.isdigit()):
                raise unsupported(f"{key!r} is not a token id")
        return value

    @field_validator("stream_options")
    @classmethod
    def only_when_streaming(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise unsupported("stream_options is only allowed when stream is true")
        return value

    def max_new_tokens(self) -> Optional[int]:
        return self.max_tokens

    def sampling(self, grammar: Optional[str] = None, choice: int = 0) -> SamplingConfig:
        """The SamplingConfig of choice number `choice` (each of `n` choices has its own seed: seed + choice)."""
        def given(value, default):
            return default if value is None else value

        return SamplingConfig(max_new_tokens=given(self.max_new_tokens(), DEFAULTS.max_new_tokens),
                              temperature=given(self.temperature, DEFAULTS.temperature),
                              top_k=given(self.top_k, DEFAULTS.top_k),
                              top_p=given(self.top_p, DEFAULTS.top_p),
                              seed=None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1),
                              stop=list(self.stop or []),
                              presence_penalty=given(self.presence_penalty, 0.0),
                              frequency_penalty=given(self.frequency_penalty, 0.0),
                              logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
                              grammar=grammar)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def choices(self) -> int:
        return self.n or 1


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)  # rendered with the export's chat template
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS)  # the newer name of max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None

    @field_validator("max_completion_tokens")
    @classmethod
    def not_both(cls, value, info):
        if value is not None and info.data.get("max_tokens") not in (None, value):
            raise unsupported("give max_completion_tokens or max_tokens, not both")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def with_logprobs(cls, value, info):
        if value is not None and not info.data.get("logprobs"):
            raise unsupported("top_logprobs needs logprobs: true")
        return value

    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def prompts(self) -> list:
        return [[m.to_dict() for m in self.messages]]

    @property
    def logprobs_asked(self) -> Optional[int]:
        """How many alternatives to report per token; None: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    prompt: list  # raw text (no template) or token ids; a list of either asks for several completions
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: Optional[bool] = None  # the prompt's text before the completion's
    best_of: Optional[int] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def prompt_list(cls, value: Any) -> list:
        """A string, a list of strings, a list of token ids or a list of such lists -> a list of prompts."""
        if isinstance(value, str) or (isinstance(value, list) and value and all(is_token(t) for t in value)):
            return [value]
        if isinstance(value, list) and value and all(
                isinstance(p, str) or (isinstance(p, list) and p and all(is_token(t) for t in p)) for p in value):
            return value
        raise PydanticCustomError("invalid_type", "a string, a list of strings, or token ids (a list of "
                                                  "non-negative integers, or a list of such lists), none empty")

    @field_validator("echo")
    @classmethod
    def without_logprobs(cls, value, info):
        if value and info.data.get("logprobs") is not None:
            raise unsupported("echo with logprobs would need the prompt's log-probabilities, which this server "
                              "does not compute")
        return value

    @field_validator("best_of")
    @classmethod
    def as_many_as_n(cls, value, info):
        if value not in (None, info.data.get("n") or 1):
            raise unsupported("best_of must equal n: this server returns every choice it generates")
        return value

    @property
    def prompts(self) -> list:
        return self.prompt

    @property
    def logprobs_asked(self) -> Optional[int]:
        return self.logprobs


def is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_body(schema: type[Schema], raw: bytes) -> Any:
    """`raw` as an instance of `schema`, or the APIError (400) for its first problem."""
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise error_for(e.errors(include_url=False, include_input=False)[0]) from None


def error_for(problem: dict) -> APIError:
    """OpenAI's error for one of pydantic's problems: `param` the field's path, `code` its kind."""
    param = field_path(problem["loc"]) or None
    kind = problem["type"]
    code = CODES.get(kind) or ("invalid_type" if kind.endswith("_type") else "invalid_value")
    if param is None:  # the body itself: not JSON, or not an object
        return APIError(400, f"the body must be one JSON object: {problem['msg']}", code="invalid_json")
    if kind == "missing":
        return APIError(400, f"missing required parameter {param!r}", param=param, code=code)
    if kind == "extra_forbidden":
        return APIError(400, f"{param!r}: this server does not support this parameter", param=param, code=code)
    return APIError(400, f"{param!r}: {problem['msg']}", param=param, code=code)
