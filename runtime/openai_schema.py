"""The request bodies `odlora serve` reads, as pydantic models, and OpenAI's error JSON.

    ChatCompletionRequest.model_validate_json(raw)     # via parse_body(), which turns a failure into an APIError

pydantic parses the raw bytes itself (its Rust JSON parser), which is what makes bad input cheap
and harmless: invalid UTF-8, a lone surrogate (`"\\ud800"`), nesting past its recursion limit
and integers of thousands of digits are invalid JSON; NaN, Infinity and 1e400 fail the finiteness
check; every type is strict (`"max_tokens": "8"` or `true` is a wrong type, as JSON has it) and
every number has its range. The first problem becomes a 400 that names the field in `param`
(`messages[0].content`), never a 500.

A field that is absent or null takes odlora's default (greedy, 128 tokens: `SamplingConfig`'s),
not OpenAI's. Fields odlora does not read are ignored, as before.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse

from ..config import SamplingConfig
from ..formats.schemas import field_path

MAX_SEED = 2**63 - 1  # what a torch.Generator takes (and a signed 64-bit seed field in any client)
MAX_TOKENS = 2**31 - 1  # the generation also stops at the end of the export's KV cache
MAX_TEMPERATURE = 2.0  # OpenAI's range
DEFAULTS = SamplingConfig()

# pydantic's error types -> OpenAI's `code`; any other type is a value out of its range.
CODES = {"missing": "missing_required_parameter", "json_invalid": "invalid_json", "json_type": "invalid_json",
         "unsupported_value": "unsupported_value"}


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
    """JSON's types as they are (no "8" for 8), finite numbers only, unknown fields ignored."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class Message(Schema):
    role: str
    content: str


class StreamOptions(Schema):
    include_usage: bool = False  # one more chunk at the end, with the token counts


StopString = Annotated[str, Field(min_length=1)]


class GenerationRequest(Schema):
    """The fields both completion endpoints read."""

    model: str  # `base`, an adapter id or a blend `a:0.7+b:0.3`
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS)
    temperature: Optional[float] = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: Optional[list[StopString]] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None

    @field_validator("stop", mode="before")
    @classmethod
    def one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("n")
    @classmethod
    def one_choice(cls, value: Optional[int]) -> Optional[int]:
        if value not in (None, 1):
            raise PydanticCustomError("unsupported_value", "only n=1 is supported")
        return value

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=DEFAULTS.max_new_tokens if self.max_tokens is None else self.max_tokens,
                              temperature=DEFAULTS.temperature if self.temperature is None else self.temperature,
                              top_p=DEFAULTS.top_p if self.top_p is None else self.top_p,
                              seed=self.seed, stop=list(self.stop or []))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)  # rendered with the export's chat template

    @property
    def prompt(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


class CompletionRequest(GenerationRequest):
    prompt: str  # raw text, no template


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
    return APIError(400, f"{param!r}: {problem['msg']}", param=param, code=code)
