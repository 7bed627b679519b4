"""Request bodies of the OpenAI API as pydantic models, and OpenAI's error shape.

Bodies are parsed from the raw bytes in strict JSON mode (`parse_body`), so a string
where a number belongs, an out-of-range value or an unknown field is a 400 that names
the field, never a coercion and never a 500. Ranges are OpenAI's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Float = Annotated[float, Field(allow_inf_nan=False)]


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Loose):
    type: Literal["text"]
    text: str


class Message(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool | None = None


class JsonSchemaFormat(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


Stop = Union[Annotated[str, Field(min_length=1)], Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)], None]


class _Sampling(_Body):
    model: str
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # Accepted and ignored, as by OpenAI-compatible servers.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self


PromptIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: Union[str, Annotated[list[str], Field(min_length=1)], PromptIds, Annotated[list[PromptIds], Field(min_length=1)]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "Message", "StreamOptions",
               "ResponseFormat", "JsonSchemaFormat"}


def _loc(loc: tuple) -> str | None:
    """'messages.0.content' from pydantic's location, without its union-member tags."""
    parts = [str(p) for p in loc if isinstance(p, int) or not ("[" in p or "-" in p or p in _UNION_TAGS)]
    return ".".join(parts) or None


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """The validated body, or an ApiError (400) naming the first bad field."""
    try:
        return model.model_validate_json(raw or b"", strict=True)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        kind = err["type"]
        if kind == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {err['ctx'].get('error', err['msg'])}") from None
        if kind == "model_type" and not err["loc"]:
            raise ApiError(400, "the request body must be a JSON object") from None
        param = _loc(err["loc"])
        if kind == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        msg = err["msg"]
        raise ApiError(400, f"{param}: {msg}" if param else msg, param=param) from None
