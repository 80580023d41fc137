"""From a validated request body to an OpenAI response: tokenise, check the context, run the group, shape the
output (one JSON body, or SSE chunks ending with `data: [DONE]`)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..engine.request import RequestOutput
from ..engine.sampling import LogprobEntry, SamplingParams
from .engine_loop import AsyncEngine, EngineStopped, QueueFullError, RequestAborted, RequestGroup
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
)

log = logging.getLogger(__name__)

SYSTEM_FINGERPRINT = "dsv3"


class ClientDisconnected(Exception):
    pass


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    api_key: str | None = None
    max_queue: int = 1024
    shutdown_grace: float = 30.0
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    tool_call_parser: str = "auto"  # "auto": the chat template's format; "none"; or a tool_parsers.FORMATS name
    reasoning_parser: str = "auto"  # "auto": when the template knows the think tags; "none"; "think"
    sampling_defaults: dict = field(default_factory=dict)  # generation_config.json's, for fields a request omits

    def __post_init__(self):
        e = self.engine.engine
        self.tokenizer = e.tokenizer
        self.max_model_len = e.max_model_len
        self.cache_tokens = e.cache.capacity_tokens
        self.eos_ids = frozenset(e.eos_ids)
        self.tokens = TokenPieces(self.tokenizer)


# ---- token strings for logprobs ---------------------------------------------------------------------------------

def _byte_level_decoder() -> dict[str, int]:
    # The GPT-2 byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes are moved to
    # code points 256 and up, in byte order. Inverting it recovers a token's raw bytes.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, moved = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + moved)] = b
            moved += 1
    return out


class TokenPieces:
    """A token id's text and raw bytes as OpenAI logprobs show them (a token may hold part of a character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int] | None]] = {}
        self._bytes_of = _byte_level_decoder() if tokenizer is not None and tokenizer.byte_level else None

    def __call__(self, token_id: int) -> tuple[str, list[int] | None]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        tok = self.tokenizer
        if tok is None:
            piece: tuple[str, list[int] | None] = (f"token_id:{token_id}", None)
        else:
            raw = tok.id_to_token(token_id) or ""
            if self._bytes_of is not None and token_id not in tok.special_ids and all(
                    c in self._bytes_of for c in raw):
                data = bytes(self._bytes_of[c] for c in raw)
            else:
                data = tok.decode([token_id]).encode()
            piece = (data.decode("utf-8", errors="replace"), list(data))
        self._cache[token_id] = piece
        return piece


# ---- shared steps -----------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{state.model_name}' "
                       "(see GET /v1/models)", param="model", code="model_not_found")


def resolve_max_tokens(state: ServerState, prompt_lens: list[int], requested: int | None, what: str) -> int:
    limit = state.max_model_len
    longest = max(prompt_lens)
    if requested is not None and requested < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {requested}", param="max_tokens",
                       code="invalid_value")
    if requested is None:
        if longest >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the {what} has "
                           f"{longest} tokens, which leaves no room for a completion. Please shorten the {what}.",
                           param=what, code="context_length_exceeded")
        # OpenAI's "no limit": up to the context, and never more than the whole cache can hold.
        return max(1, min(limit, state.cache_tokens) - longest)
    if longest + requested > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{longest + requested} tokens ({longest} in the {what}, {requested} in the completion). "
                       f"Please reduce the length of the {what} or completion.", param=what,
                       code="context_length_exceeded")
    return requested


def make_params(state: ServerState, req, max_tokens: int, logprobs: int | None,
                renamed: dict[str, str] | None = None, **extra: Any) -> SamplingParams:
    """`renamed` maps SamplingParams field names to the request's own, for the error's param; `extra` goes to
    req.sampling_params (guided, skip_special_tokens)."""
    try:
        params = req.sampling_params(max_tokens, logprobs, defaults=state.sampling_defaults, **extra)
        params.validate(state.engine.engine.cfg.vocab_size)
    except ValueError as e:
        msg = str(e)
        param = None
        if msg.startswith("SamplingParams."):
            param, _, rest = msg[len("SamplingParams."):].partition(" ")
            msg = f"{(renamed or {}).get(param, param)} {rest}"
            param = param.partition("[")[0]  # logit_bias[5] -> the field, logit_bias
            param = (renamed or {}).get(param, param)
        raise APIError(400, msg, param=param, code="invalid_value") from None
    return params


async def submit(state: ServerState, prompts: list[list[int]], params: SamplingParams, arrival: float,
                 response_id: str) -> RequestGroup:
    if len(prompts) * params.n > state.max_queue:
        raise APIError(400, f"this request asks for {len(prompts) * params.n} completions (prompts x n) but the "
                       f"server queues at most {state.max_queue}; split it up", param="n", code="invalid_value")
    try:
        return await state.engine.add(prompts, params, arrival, prefix=response_id)
    except QueueFullError as e:
        raise APIError(429, f"The server is overloaded ({e}); retry later.", type="rate_limit_exceeded",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except EngineStopped as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down",
                       headers={"Retry-After": "5"}) from None
    except ValueError as e:  # the engine's own checks (e.g. the cache could never hold this request)
        raise APIError(400, str(e), code="invalid_value") from None


async def compile_guided(state: ServerState, guided, param: str) -> None:
    """Compile the request's grammar on a worker thread (cached by the engine's backend, which then finds it when
    the request is added), so the engine thread keeps stepping; a grammar xgrammar refuses is a 400 here."""
    if guided is None:
        return
    engine = state.engine.engine
    try:
        await asyncio.to_thread(lambda: engine.guided_backend().compile(guided))
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_grammar") from None


def finite_logprob(value: float) -> float:
    # A token a grammar or a -100 bias ruled out has logprob -inf, which JSON cannot carry; OpenAI writes -9999.
    return value if value > -9999.0 else -9999.0


def shown_logprobs(state: ServerState, out: RequestOutput, params: SamplingParams) -> list:
    """A finished output's logprob entries as OpenAI lists them (without a hidden stop token's)."""
    entries = out.logprobs or []
    return entries[:-1] if hidden_stop_token(state, out, params) else entries


def hidden_stop_token(state: ServerState, out: RequestOutput, params: SamplingParams) -> bool:
    """Whether the last token ended the completion without showing in its text (eos or a stop token id), so
    OpenAI would not list it among the logprobs."""
    if not out.finished or out.finish_reason != "stop" or not out.token_ids:
        return False
    tok = out.token_ids[-1]
    return (tok in state.eos_ids and not params.ignore_eos) or tok in params.stop_token_ids


async def _watch_disconnect(request: Request, group: RequestGroup) -> None:
    # The body is read, so the next ASGI message can only be the client going away.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            group.abort(ClientDisconnected())
            return


async def collect(request: Request, group: RequestGroup) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(group)
    watcher = asyncio.create_task(_watch_disconnect(request, group))
    try:
        async for index, out in group:
            if out.finished:
                finals[index] = out
    except RequestAborted as e:
        raise APIError(e.status, str(e), type="server_error", code="aborted") from None
    finally:
        watcher.cancel()
        group.abort()
    return finals  # type: ignore[return-value]


class EngineStreamingResponse(StreamingResponse):
    """Aborts the group however the response ends: finished, client gone (Starlette cancels the body iterator
    when it sees http.disconnect), or cancelled at shutdown; even if the iterator never started."""

    def __init__(self, content: AsyncIterator[str], group: RequestGroup):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.group = group

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.group.abort()
            await self.body_iterator.aclose()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def stream_error(e: RequestAborted) -> str:
    # Headers are already sent, so the status cannot change; OpenAI's clients raise on an "error" event.
    return sse(APIError(e.status, str(e), type="server_error", code="aborted").body())


def usage(prompt_tokens: int, finals: list[RequestOutput]) -> Usage:
    completion = sum(len(o.token_ids) for o in finals)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def stream_head(state: ServerState, obj: str, rid: str, created: int, include_usage: bool) -> dict:
    """The fields every chunk of a stream repeats (usage: null until the final usage chunk, when asked for)."""
    head = {"id": rid, "object": obj, "created": created, "model": state.model_name,
            "system_fingerprint": SYSTEM_FINGERPRINT}
    if include_usage:
        head["usage"] = None
    return head


# ---- completions ------------------------------------------------------------------------------------------------

class _CompletionLogprobBuilder:
    def __init__(self, state: ServerState, offset: int):
        self.state = state
        self.offset = offset

    def build(self, entries: list[LogprobEntry]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for e in entries:
            text = self.state.tokens(e.token_id)[0]
            out.tokens.append(text)
            out.token_logprobs.append(finite_logprob(e.logprob))
            out.top_logprobs.append({self.state.tokens(t)[0]: finite_logprob(lp) for t, lp in e.top})
            out.text_offset.append(self.offset)
            self.offset += len(text)
        return out


async def completions(state: ServerState, request: Request, req: CompletionRequest) -> Response:
    arrival = time.perf_counter()
    req.check()
    check_model(state, req.model)
    raw = req.prompts()
    prompts = []
    for i, p in enumerate(raw):
        try:
            prompts.append(state.engine.engine.encode_prompt(p))
        except ValueError as e:
            raise APIError(400, f"prompt[{i}]: {e}" if len(raw) > 1 else str(e), param="prompt") from None
    max_tokens = resolve_max_tokens(state, [len(p) for p in prompts], req.max_tokens, "prompt")
    guided = req.guided()
    await compile_guided(state, guided, req.guided_param)
    params = make_params(state, req, max_tokens, req.logprobs, guided=guided)
    rid = new_id("cmpl")
    created = int(time.time())
    echo = [_prompt_text(state, r, p) if req.echo else "" for r, p in zip(raw, prompts) for _ in range(params.n)]
    group = await submit(state, prompts, params, arrival, rid)
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        return EngineStreamingResponse(_completion_stream(state, req, params, group, rid, created, prompt_tokens,
                                                          echo), group)
    finals = await collect(request, group)
    choices = []
    for i, out in enumerate(finals):
        lp = None
        if params.logprobs is not None:
            lp = _CompletionLogprobBuilder(state, len(echo[i])).build(shown_logprobs(state, out, params))
        choices.append(CompletionChoice(index=i, text=echo[i] + out.text, logprobs=lp,
                                        finish_reason=out.finish_reason))
    body = Completion(id=rid, created=created, model=state.model_name, system_fingerprint=SYSTEM_FINGERPRINT,
                      choices=choices, usage=usage(prompt_tokens, finals))
    return JSONResponse(body.model_dump())


def _prompt_text(state: ServerState, raw: str | list[int], ids: list[int]) -> str:
    if isinstance(raw, str):
        return raw
    return state.tokenizer.decode(ids, skip_special_tokens=True) if state.tokenizer is not None else ""


async def _completion_stream(state: ServerState, req: CompletionRequest, params: SamplingParams,
                             group: RequestGroup, rid: str, created: int, prompt_tokens: int,
                             echo: list[str]) -> AsyncIterator[str]:
    head = stream_head(state, "text_completion", rid, created, req.include_usage)

    def chunk(index: int, text: str, logprobs=None, finish_reason=None) -> str:
        return sse({**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]})

    builders = [_CompletionLogprobBuilder(state, len(e)) for e in echo]
    for i, text in enumerate(echo):
        if text:
            yield chunk(i, text)
    finals: list[RequestOutput | None] = [None] * len(group)
    try:
        async for i, out in group:
            entries = out.new_logprobs
            if entries and hidden_stop_token(state, out, params):
                entries = entries[:-1]
            lp = builders[i].build(entries).model_dump() if params.logprobs is not None and entries else None
            if out.finished:
                finals[i] = out
            if out.new_text or lp or out.finished:
                yield chunk(i, out.new_text, lp, out.finish_reason if out.finished else None)
    except RequestAborted as e:
        yield stream_error(e)
        return
    if req.include_usage:
        yield sse({**head, "choices": [], "usage": usage(prompt_tokens, finals).model_dump()})
    yield "data: [DONE]\n\n"


def disconnected_response() -> Response:
    # Nobody is listening any more; 499 (nginx's "client closed request") only labels the metrics.
    return Response(status_code=499)
