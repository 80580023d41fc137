"""POST /v1/chat/completions: render the conversation (tools, tool results and chat_template_kwargs through the
model's chat template), constrain the output when asked (response_format, guided_*, tool_choice), run the group and
shape each choice as reasoning_content / content / tool_calls (chat_output.py), in one body or as SSE chunks."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine.request import RequestOutput
from ..engine.sampling import LogprobEntry, SamplingParams
from .chat_output import ChatOutputMode, ChoiceOutput, tool_choice_guided
from .engine_loop import RequestAborted, RequestGroup
from .protocol import (
    APIError,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    NamedToolChoice,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
)
from .reasoning import starts_in_reasoning, template_reasons
from .serving import (
    SYSTEM_FINGERPRINT,
    EngineStreamingResponse,
    ServerState,
    check_model,
    collect,
    compile_guided,
    finite_logprob,
    hidden_stop_token,
    make_params,
    new_id,
    resolve_max_tokens,
    shown_logprobs,
    sse,
    stream_error,
    stream_head,
    submit,
    usage,
)
from .tool_parsers import FORMATS, detect_tool_format

__all__ = ["chat_completions"]


def _chat_logprobs(state: ServerState, entries: list[LogprobEntry]) -> ChoiceLogprobs:
    content = []
    for e in entries:
        text, data = state.tokens(e.token_id)
        top = [TopLogprob(token=state.tokens(t)[0], logprob=finite_logprob(lp), bytes=state.tokens(t)[1])
               for t, lp in e.top]
        content.append(TokenLogprob(token=text, logprob=finite_logprob(e.logprob), bytes=data, top_logprobs=top))
    return ChoiceLogprobs(content=content)


def _render(state: ServerState, req: ChatCompletionRequest) -> tuple[str, str | None]:
    """(the prompt text, the chat template's source)."""
    tok = state.tokenizer
    extra: dict[str, Any] = dict(req.chat_template_kwargs or {})
    if req.tools:
        extra["tools"] = [{"type": "function", "function": t.function.model_dump(by_alias=True, exclude_none=True)}
                          for t in req.tools]
    try:
        template = tok.chat_template_source(**extra)
        text = tok.apply_chat_template(req.conversation(), add_generation_prompt=True, **extra)
    except ValueError as e:  # validate_messages, a missing template, or the template's own raise_exception
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # noqa: BLE001 - a template tripping over unusual input is the input's problem
        raise APIError(400, f"the chat template could not render these messages ({type(e).__name__}: {e})",
                       param="messages") from None
    return text, template


def _output_mode(state: ServerState, req: ChatCompletionRequest, prompt_text: str, template: str | None,
                 guided) -> ChatOutputMode:
    choice = req.tool_choice or ("auto" if req.tools else "none")
    names = [t.function.name for t in req.tools or []]
    mode = ChatOutputMode(tool_names=names, parallel=req.parallel_tool_calls)
    if isinstance(choice, NamedToolChoice):
        mode.forced = choice.function.name
    elif choice == "required":
        mode.forced = "required"
    elif choice == "auto" and req.tools and guided is None and state.tool_call_parser != "none":
        parser = state.tool_call_parser
        mode.tool_format = detect_tool_format(template) if parser == "auto" else FORMATS[parser]
    # A constrained answer starts with its first token, so it has no think block to split off.
    reasons = {"auto": template_reasons(template), "none": False, "think": True}[state.reasoning_parser]
    if guided is None and reasons:
        mode.reasoning = True
        mode.starts_in_reasoning = starts_in_reasoning(prompt_text)
    return mode


async def chat_completions(state: ServerState, request: Request, req: ChatCompletionRequest) -> Response:
    arrival = time.perf_counter()
    req.check()
    check_model(state, req.model)
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat; use /v1/completions with token ids",
                       param="messages")
    text, template = _render(state, req)
    prompt = state.tokenizer.encode(text, add_bos=False)  # the template writes bos itself
    max_tokens = resolve_max_tokens(state, [len(prompt)], req.requested_max_tokens, "messages")
    guided = req.guided(tool_choice_guided(req.tools or [], req.tool_choice, req.parallel_tool_calls))
    await compile_guided(state, guided, req.guided_param)
    mode = _output_mode(state, req, text, template, guided)
    # Parsers read the marker tokens (think tags, tool-call tokens), which are special tokens in real vocabularies.
    params = make_params(state, req, max_tokens, req.num_logprobs, {"logprobs": "top_logprobs"}, guided=guided,
                         skip_special_tokens=not mode.parses)
    rid = new_id("chatcmpl")
    created = int(time.time())
    group = await submit(state, [prompt], params, arrival, rid)
    if req.stream:
        return EngineStreamingResponse(_chat_stream(state, req, params, mode, group, rid, created, len(prompt)),
                                       group)
    finals = await collect(request, group)
    choices = []
    for i, out in enumerate(finals):
        lp = None
        if params.logprobs is not None:
            lp = _chat_logprobs(state, shown_logprobs(state, out, params))
        fields, finish = ChoiceOutput(mode).message(out.text, out.finish_reason)
        choices.append(ChatChoice(index=i, message=ResponseMessage(**fields), logprobs=lp, finish_reason=finish))
    body = ChatCompletion(id=rid, created=created, model=state.model_name, system_fingerprint=SYSTEM_FINGERPRINT,
                          choices=choices, usage=usage(len(prompt), finals))
    return JSONResponse(body.model_dump())


async def _chat_stream(state: ServerState, req: ChatCompletionRequest, params: SamplingParams, mode: ChatOutputMode,
                       group: RequestGroup, rid: str, created: int, prompt_len: int) -> AsyncIterator[str]:
    head = stream_head(state, "chat.completion.chunk", rid, created, req.include_usage)

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> str:
        return sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]})

    readers = [ChoiceOutput(mode) for _ in range(len(group))]
    for i in range(len(group)):
        yield chunk(i, {"role": "assistant", "content": ""})
    finals: list[RequestOutput | None] = [None] * len(group)
    try:
        async for i, out in group:
            entries = out.new_logprobs
            if entries and hidden_stop_token(state, out, params):
                entries = entries[:-1]
            deltas = readers[i].feed(out.new_text) if out.new_text else []
            if entries and not deltas:
                deltas = [{"content": ""}]
            lp = _chat_logprobs(state, entries).model_dump() if entries else None
            for k, delta in enumerate(deltas):
                yield chunk(i, delta, lp if k == 0 else None)
            if out.finished:
                finals[i] = out
                rest, finish = readers[i].finish(out.finish_reason)
                for delta in rest:
                    yield chunk(i, delta)
                yield chunk(i, {}, finish_reason=finish)
    except RequestAborted as e:
        yield stream_error(e)
        return
    if req.include_usage:
        yield sse({**head, "choices": [], "usage": usage(prompt_len, finals).model_dump()})
    yield "data: [DONE]\n\n"
