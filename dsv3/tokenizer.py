"""Tokenizer of a checkpoint directory: tokenizer.json, the chat template, streaming detokenisation, stop strings.

Legend: ids are plain Python lists of token ids (the engine hands over host-side ids once per step); V vocabulary
size including added tokens; N tokens fed so far to an IncrementalDetokenizer.

Sources of truth, in the order they win:
  tokenizer.json         the vocabulary, merges and the decoder (read with the `tokenizers` library);
  tokenizer_config.json  bos/eos token strings, add_bos_token, chat_template (or chat_template.jinja beside it);
  generation_config.json / config.json  bos_token_id / eos_token_id: extra stop ids (an int or a list), and the bos
                         id when tokenizer_config.json names none.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """The chat template failed: a syntax error, an unsafe operation, or the template's own raise_exception."""


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 bos_id: int | None = None, eos_ids: Sequence[int] = (), add_bos: bool = False,
                 chat_templates: Mapping[str, str] | None = None, source: str = "<memory>"):
        self._tok = tok
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.add_bos = add_bos
        self.chat_templates = dict(chat_templates or {})
        self._compiled: dict[str, jinja2.Template] = {}
        added = tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        # Byte-level BPE (all DeepSeek checkpoints) decodes with UTF-8 replacement of maximal invalid subparts,
        # which the detokenizer relies on to find settled boundaries inside broken byte streams.
        self.byte_level = isinstance(tok.decoder, tokenizers.decoders.ByteLevel)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (expected a checkpoint directory "
                                    "holding tokenizer.json)")
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{tok_file} not found: dsv3 reads the tokenizer from tokenizer.json (the "
                                    "`tokenizers` format that every DeepSeek checkpoint ships); copy it from the "
                                    "original checkpoint")
        try:
            tok = tokenizers.Tokenizer.from_file(tok_file)
        except Exception as e:  # the Rust side raises a bare Exception with its parser message
            raise ValueError(f"{tok_file} is not a valid tokenizers file ({e}); the file is corrupt or truncated, "
                             "copy it again from the original checkpoint") from e

        conf = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen = _read_json(os.path.join(path, "generation_config.json"))
        model = _read_json(os.path.join(path, "config.json"))
        conf_file = os.path.join(path, "tokenizer_config.json")

        def token_id(field: str) -> tuple[str | None, int | None]:
            token = conf.get(field)
            if isinstance(token, Mapping):  # AddedToken serialised as {"content": ..., "special": ...}
                token = token.get("content")
            if token is None:
                return None, None
            if not isinstance(token, str):
                raise ValueError(f"{conf_file}: {field} must be a string or a {{'content': ...}} dict, "
                                 f"got {token!r}")
            tid = tok.token_to_id(token)
            if tid is None:
                raise ValueError(f"{conf_file}: {field} {token!r} is not in the vocabulary of {tok_file}")
            return token, tid

        bos_token, bos_id = token_id("bos_token")
        eos_token, eos_id = token_id("eos_token")
        vocab = tok.get_vocab_size(with_added_tokens=True)

        def model_ids(field: str) -> tuple[list[int], str | None]:
            # generation_config.json is what HF's generate() stops on; config.json is its fallback.
            for data, name in ((gen, "generation_config.json"), (model, "config.json")):
                value = data.get(field)
                if value is None:
                    continue
                values = value if isinstance(value, list) else [value]
                for v in values:
                    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
                        raise ValueError(f"{os.path.join(path, name)}: {field} {value!r} must be token ids in "
                                         f"[0, {vocab}) (the vocabulary of {tok_file})")
                return values, name
            return [], None

        model_bos, bos_src = model_ids("bos_token_id")
        if bos_id is None and model_bos:
            bos_id = model_bos[0]
            bos_token = tok.id_to_token(bos_id)
        elif bos_id is not None and model_bos and model_bos[0] != bos_id:
            logger.warning("bos id %d in %s differs from tokenizer_config.json's %r (id %d); using the tokenizer's",
                           model_bos[0], bos_src, bos_token, bos_id)
        model_eos, eos_src = model_ids("eos_token_id")
        if eos_id is not None and model_eos and eos_id not in model_eos:
            logger.warning("eos ids %s in %s do not include tokenizer_config.json's %r (id %d); stopping on all "
                           "of them", model_eos, eos_src, eos_token, eos_id)
        eos_ids = list(dict.fromkeys(([eos_id] if eos_id is not None else []) + model_eos))
        if eos_token is None and eos_ids:
            eos_token = tok.id_to_token(eos_ids[0])

        add_bos = conf.get("add_bos_token")
        if add_bos is None:
            # Without the flag, follow whatever tokenizer.json's post-processor would have done.
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
        return cls(tok, bos_token=bos_token, eos_token=eos_token, bos_id=bos_id, eos_ids=eos_ids,
                   add_bos=bool(add_bos) and bos_id is not None,
                   chat_templates=_read_chat_templates(path, conf, conf_file), source=path)

    # -- vocabulary ---------------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    # -- text <-> ids -------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode() takes a str, got {type(text).__name__}")
        # The post-processor is bypassed so bos is added exactly once, by this flag, whatever tokenizer.json says;
        # special tokens written in the text are still matched.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            *, chat_template: str | None = None, **extra: Any) -> str:
        """Render a conversation as the model's prompt text. `chat_template` picks a named template (when
        tokenizer_config.json holds several) or is a template source itself; `extra` (tools, documents, ...) is
        passed to the template as variables."""
        messages = validate_messages(messages)
        source = self._template_source(chat_template, extra)
        template = self._compiled.get(source)
        if template is None:
            if len(self._compiled) >= 32:  # callers may pass their own template sources; keep the cache bounded
                self._compiled.clear()
            template = self._compiled[source] = compile_chat_template(source)
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        variables.update(extra)
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt)
        return render_chat_template(template, variables)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> list[int]:
        # The template writes bos itself (as HF's apply_chat_template(tokenize=True) assumes); never add another.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), add_bos=False)

    def chat_template_source(self, chat_template: str | None = None, **extra: Any) -> str:
        """The template source apply_chat_template would render with these arguments (servers read the tool-call
        and reasoning formats from it). Raises ChatTemplateError when there is none."""
        return self._template_source(chat_template, extra)

    def _template_source(self, chat_template: str | None, extra: Mapping[str, Any]) -> str:
        if chat_template is not None and chat_template not in self.chat_templates:
            if "{" not in chat_template:
                raise ChatTemplateError(f"no chat template named {chat_template!r} in {self.source}; available: "
                                        f"{sorted(self.chat_templates) or 'none'}")
            return chat_template
        if not self.chat_templates:
            raise ChatTemplateError(f"{self.source} has no chat template (no chat_template in "
                                    "tokenizer_config.json, no chat_template.jinja); pass chat_template=... or "
                                    "use plain prompts")
        if chat_template is None:
            # HF's rule for lists of templates: "tool_use" when tools are given and it exists, else "default".
            chat_template = "tool_use" if extra.get("tools") and "tool_use" in self.chat_templates else "default"
            if chat_template not in self.chat_templates:
                if len(self.chat_templates) != 1:
                    raise ChatTemplateError(f"{self.source} has several chat templates "
                                            f"({sorted(self.chat_templates)}) and none is named 'default'; pass "
                                            "chat_template=<name>")
                chat_template = next(iter(self.chat_templates))
        return self.chat_templates[chat_template]

    def detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
                    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    def stop_checker(self, stop: str | Sequence[str] | None) -> StopChecker:
        return StopChecker(stop)


def _read_json(file: str) -> dict[str, Any]:
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); fix or remove it") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_chat_templates(path: str, conf: Mapping[str, Any], conf_file: str) -> dict[str, str]:
    raw = conf.get("chat_template")
    if raw is None:
        # Recent transformers save the template beside the config instead of inside it.
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                return {"default": f.read()}
        return {}
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list) and all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                     and isinstance(t.get("template"), str) for t in raw):
        return {t["name"]: t["template"] for t in raw}
    raise ValueError(f"{conf_file}: chat_template must be a string or a list of {{'name': ..., 'template': ...}} "
                     f"dicts, got {type(raw).__name__}")


# ---- chat template ------------------------------------------------------------------------------------------

def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation and return plain-dict copies of its messages (the template sees copies only)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts, got "
                         f"{type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]['role'] is {role!r}; expected one of {', '.join(ROLES)}")
        if "content" not in m:
            raise ValueError(f"messages[{i}] ({role}) has no 'content'")
        content = m["content"]
        # An assistant turn that only calls tools has no text, as in the OpenAI API.
        if not isinstance(content, str) and not (content is None and role == "assistant" and m.get("tool_calls")):
            raise ValueError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")
        out.append(dict(m))
    return out


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ' ; prompts are not HTML, and models were trained on plain JSON.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox refuses attribute escapes (__class__, __globals__, ...) and mutation of the
    arguments. Jinja's sandbox answers a single refused attribute with an undefined value that prints as "";
    here it is an error, so a template that tries one fails loudly instead of rendering a quietly wrong prompt."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.sandbox.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} "
                                           "object is not allowed")


def compile_chat_template(source: str) -> jinja2.Template:
    # trim/lstrip and loop controls match how transformers renders the same templates.
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


def render_chat_template(template: jinja2.Template, variables: Mapping[str, Any]) -> str:
    try:
        return template.render(**variables)
    except ChatTemplateError:
        raise
    except jinja2.sandbox.SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation and was stopped by the sandbox: {e}") from e
    except Exception as e:  # anything else the template did wrong (undefined names, bad operand types, ...)
        raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e


# ---- streaming --------------------------------------------------------------------------------------------------

# When this many fed tokens still end in an unfinished character, look for an earlier token boundary that can
# no longer change (bounds the decoded window for streams of broken UTF-8, e.g. from a random model). Only for
# byte-level decoders: sentencepiece's ByteFallback turns a whole run of bytes into U+FFFDs when any of them is
# invalid, so inside a run no boundary is settled before the run ends.
_SPLIT_AFTER = 4
_SPLIT_TRIES = 8
# Prompt tokens decoded in front of the first output tokens, so that decoders which treat the start of a text
# specially (Metaspace drops its leading space) render the first token as it reads after the prompt.
_PROMPT_CONTEXT = 4
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas for a stream of token ids, safe to print as they come.

    Two offsets into the ids: text for ids[:read] has been emitted, and ids[prefix:read] is the context decoded
    with each new window. Each step decodes only ids[prefix:] (a few tokens), so the cost per token does not
    grow with N. A delta is held back while the window's text ends in U+FFFD: the last tokens hold part of a
    multi-byte character (byte-level BPE splits emoji and CJK across tokens), which a later token completes.
    The invariant, for output ids `out` after `prompt_ids`:
        "".join(deltas) + flush() == decode(prompt_ids + out)[len(decode(prompt_ids)):]
    which for byte-level BPE is simply decode(out).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Skipped special tokens decode to nothing wherever they stand, so dropping them on entry is exact and
        # keeps every id in the window contributing text.
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        context = [t for t in map(int, prompt_ids) if t not in self._skip][-_PROMPT_CONTEXT:]
        # Context that starts or ends inside a character would decode differently once joined to the output.
        while context and _REPLACEMENT in self._decode(context):
            context = context[1:]
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)
        self._prefix_text = self._decode(context) if context else ""

    @property
    def window(self) -> int:
        return len(self._ids) - self._prefix

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: int | Sequence[int]) -> str:
        """Take the next token id(s); return the text they complete (possibly "")."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self._ids.extend(t for t in map(int, token_ids) if t not in self._skip)
        if len(self._ids) == self._read:
            return ""
        text = self._decode(self._ids[self._prefix:])
        if not text.endswith(_REPLACEMENT):
            return self._advance(text, len(self._ids))
        if self._tokenizer.byte_level and len(self._ids) - self._read >= _SPLIT_AFTER:
            return self._split_settled(text)
        return ""

    def _advance(self, text: str, read: int) -> str:
        delta = text[len(self._prefix_text):]
        # The previous read offset is a settled boundary, so the next window starts there. Its context text is
        # decoded on its own rather than taken from the delta: decoders such as Metaspace drop a leading space
        # at the start of a window, and the context must be measured the way the next window will render it.
        self._prefix, self._read = self._read, read
        self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        return delta

    def _split_settled(self, text: str) -> str:
        # A boundary m is settled when decoding both sides separately gives the same text as decoding them
        # together: then the first byte after m does not continue an unfinished sequence before it, so nothing
        # later can join a character before m. (Had it continued one, the joined bytes would decode to one
        # character or one U+FFFD, not to the two pieces' separate texts.)
        lo = max(self._read + 1, len(self._ids) - _SPLIT_TRIES)
        for m in range(len(self._ids) - 1, lo - 1, -1):
            head = self._decode(self._ids[self._prefix:m])
            tail = self._decode(self._ids[m:])
            if tail and head + tail == text and head.startswith(self._prefix_text):
                return self._advance(head, m)
        return ""

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back (an unfinished character decodes as U+FFFD)."""
        if len(self._ids) == self._read:
            return ""
        text = self._decode(self._ids[self._prefix:])
        return self._advance(text, len(self._ids))


class StopChecker:
    """Finds stop strings in streamed text. feed(delta) returns (text safe to emit, hit): once a stop string
    appears, the text before it and hit=True (`matched` names the string; later feeds return ""); until then the
    text minus a tail that could still be the start of a stop string. flush(final_delta) checks a last delta and
    releases the held tail when the stream ends without a stop."""

    def __init__(self, stop_strings: Sequence[str] | str | None):
        if stop_strings is None:
            stop_strings = []
        elif isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop_strings)!r}")
        self.stop_strings = list(dict.fromkeys(stop_strings))
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self._held = ""
        self.hit = False
        self.matched: str | None = None

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.hit:
            return "", True
        if not self.stop_strings:
            return delta, False
        # Emitted text never contains the start of a match (it is held back), so searching the held text suffices.
        # The match that completes first wins (generation would have stopped there, so a longer one that ends
        # later never happens); on a tie the one starting earlier. This makes the result independent of how the
        # text was cut into deltas.
        text = self._held + delta
        best = None
        for s in self.stop_strings:
            i = text.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[0]):
                best = ((i + len(s), i), s)
        if best is not None:
            self.hit, self.matched, self._held = True, best[1], ""
            return text[:best[0][1]], True
        keep = self._partial_match(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def _partial_match(self, text: str) -> int:
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return n
        return 0

    def flush(self, final_delta: str = "") -> str:
        text, hit = self.feed(final_delta)
        held, self._held = self._held, ""
        return text if hit else text + held
