"""OpenAI-compatible request and response bodies (chat completions, completions, models, errors).

Requests are validated in strict JSON mode: a string where a number belongs is a 400, not a silent coercion.
Fields OpenAI defines that this server cannot honour (suffix, best_of != n) are refused with a 400 naming the
field, rather than ignored; fields it does not know at all are ignored, as clients send provider-specific extras.
Beside OpenAI's fields it reads vLLM's extensions: guided_json / guided_regex / guided_choice / guided_grammar
and their newer form structured_outputs (structured outputs), top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, chat_template_kwargs. Value
ranges are checked by SamplingParams.validate(), which names the field in its message.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.guided import GuidedDecoding
from ..engine.sampling import SamplingParams

FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---- requests ---------------------------------------------------------------------------------------------------

class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's newer form of the guided_* fields: one of json / regex / choice / grammar / json_object."""
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # what an earlier turn thought; chat templates drop it

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by both endpoints; the names and defaults are OpenAI's, the last four are extensions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        self.bias()
        self.guided()

    def bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for key, value in self.logit_bias.items():
            if not key.isdigit() or not key.isascii() or len(key) > 12:
                raise APIError(400, f"logit_bias keys must be token ids written as decimal strings, got {key!r}",
                               param="logit_bias", code="invalid_value")
            out[int(key)] = value
        return out

    def guided(self, tool_guided: GuidedDecoding | None = None) -> GuidedDecoding | None:
        """The one output constraint the request asks for (tool_guided: what tool_choice needs), or None."""
        asked: list[tuple[str, dict]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema (the JSON "
                               "schema the answer must follow)", param="response_format.json_schema",
                               code="invalid_value")
            asked.append(("response_format", {"json": rf.json_schema.schema_,
                                              "strict": bool(rf.json_schema.strict)}))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                asked.append((name, {key: value}))
        so = self.structured_outputs
        if so is not None:
            given = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                       ("grammar", so.grammar), ("json_object", so.json_object or None))
                     if v is not None}
            if len(given) != 1:
                raise APIError(400, "structured_outputs needs exactly one of json, regex, choice, grammar, "
                               f"json_object; got {', '.join(given) or 'none'}", param="structured_outputs",
                               code="invalid_value")
            asked.append(("structured_outputs", given))
        if tool_guided is not None:
            asked.append(("tool_choice", {}))
        if len(asked) > 1:
            raise APIError(400, f"{' and '.join(n for n, _ in asked)} both constrain the output; send only one",
                           param=asked[1][0], code="invalid_value")
        if not asked:
            return None
        name, fields = asked[0]
        if name == "tool_choice":
            return tool_guided
        try:
            return GuidedDecoding(**fields)
        except ValueError as e:
            raise APIError(400, f"{name}: {str(e).removeprefix('GuidedDecoding.')}", param=name,
                           code="invalid_value") from None

    @property
    def guided_param(self) -> str:
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
            if getattr(self, name) is not None:
                return name
        return "tool_choice"

    def sampling_params(self, max_tokens: int, logprobs: int | None, guided: GuidedDecoding | None = None,
                        skip_special_tokens: bool = True, defaults: dict | None = None) -> SamplingParams:
        """defaults: the checkpoint's generation_config.json values for the fields this request leaves out."""
        defaults = defaults or {}

        def pick(value, default, name=None):
            if value is not None:
                return value
            return defaults.get(name, default) if name else default

        # SamplingParams validates itself; its ValueError names the field and becomes a 400.
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick(self.temperature, 1.0, "temperature"),
            top_k=pick(self.top_k, 0, "top_k"), top_p=pick(self.top_p, 1.0, "top_p"),
            min_p=pick(self.min_p, 0.0, "min_p"), repetition_penalty=pick(self.repetition_penalty, 1.0,
                                                                          "repetition_penalty"),
            presence_penalty=pick(self.presence_penalty, 0.0, "presence_penalty"),
            frequency_penalty=pick(self.frequency_penalty, 0.0, "frequency_penalty"),
            seed=self.seed, stop=self.stop, stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, logprobs=logprobs, n=self.n, logit_bias=self.bias(), guided=guided,
            skip_special_tokens=skip_special_tokens)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        self.check_common()
        self.check_tools()
        if self.chat_template_kwargs:
            reserved = {"messages", "add_generation_prompt", "tools", "bos_token", "eos_token"} & set(
                self.chat_template_kwargs)
            if reserved:
                raise APIError(400, f"chat_template_kwargs may not set {sorted(reserved)} (the server sets them)",
                               param="chat_template_kwargs", code="invalid_value")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        if not self.messages:
            raise APIError(400, "messages is empty: a conversation needs at least one message", param="messages")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_tools(self) -> None:
        tools = self.tools or []
        if len(tools) > MAX_TOOLS:
            raise APIError(400, f"{len(tools)} tools given; at most {MAX_TOOLS} are allowed", param="tools",
                           code="invalid_value")
        names = set()
        for i, t in enumerate(tools):
            name = t.function.name
            if not FUNCTION_NAME.fullmatch(name):
                raise APIError(400, f"tools[{i}].function.name {name!r} must be 1-64 letters, digits, '_' or '-'",
                               param=f"tools[{i}].function.name", code="invalid_value")
            if name in names:
                raise APIError(400, f"tools[{i}].function.name {name!r} is given twice",
                               param=f"tools[{i}].function.name", code="invalid_value")
            names.add(name)
        choice = self.tool_choice
        if choice in ("required",) or isinstance(choice, NamedToolChoice):
            if not tools:
                raise APIError(400, "tool_choice needs tools: there is no tool to call", param="tool_choice",
                               code="invalid_value")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not among the "
                           f"tools ({', '.join(sorted(names))})", param="tool_choice", code="invalid_value")

    def conversation(self) -> list[dict[str, Any]]:
        # "developer" is OpenAI's newer name for the system role; chat templates only know "system".
        out = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                if m.content is None:
                    msg["content"] = None
                msg["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                     for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                msg["name"] = m.name
            out.append(msg)
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for this endpoint
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix",
                           code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported by this server", param="best_of",
                           code="unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported (prompt logprobs are not computed)",
                           param="echo", code="unsupported_parameter")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# ---- responses --------------------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dsv3"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
