import json
import random
from datetime import datetime

import pytest

from dsv3.tokenizer import ChatTemplateError, IncrementalDetokenizer, StopChecker, Tokenizer, validate_messages
from dsv3.tokenizer_build import ASSISTANT, BOS, EOS, USER, save_tokenizer_files, train_bpe

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "def main(argv):\n    return 0\n",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "Καλημέρα κόσμε, τι κάνεις σήμερα;",
    "敏捷的棕色狐狸跳过了懒狗。你好，世界！中文文本测试。",
    "日本語のテキストと한국어 텍스트도 있습니다.",
    "emoji 😀😃😄😁🙂🚀🎉👍🏽 and flags 🇬🇷🇨🇳 done",
    "math: ∑ ∫ √ ≈ ≠ ∞ — “quotes” and ‘more’ …",
]
CORPUS = [f"{s} {i}" for i in range(40) for s in SENTENCES]
TEXT_ALPHABET = (list("abc xyz.,\n") + list("αβγδ Ωλ") + list("中文字狐狸")
                 + ["😀", "🚀", "👍🏽", "🇬🇷", "é", "\t"])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer_files(train_bpe(CORPUS, vocab_size=1000), path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


def _copy_dir(src, dst, **overrides):
    dst.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    for name, data in overrides.items():
        file = dst / f"{name}.json"
        if data is None:
            file.unlink()
        else:
            file.write_text(json.dumps(data, ensure_ascii=False) if not isinstance(data, str) else data)
    return dst


# ---- loading --------------------------------------------------------------------------------------------------

def test_reads_checkpoint_files(tok):
    assert tok.bos_id == 0 and tok.eos_ids == [1]
    assert tok.bos_token == BOS and tok.eos_token == EOS
    assert tok.token_to_id(USER) == 2 and tok.id_to_token(3) == ASSISTANT
    assert tok.token_to_id("no such token") is None
    assert 400 < tok.vocab_size <= 1000
    assert tok.special_ids == frozenset(range(5))


def test_encode_decode_roundtrip(tok):
    for s in SENTENCES + ["", "   ", "unseen ζ 🦄 龍"]:
        ids = tok.encode(s, add_bos=False)
        assert tok.decode(ids) == s
    assert tok.encode("hi")[0] == tok.bos_id  # add_bos_token is true in tokenizer_config.json
    assert tok.encode("hi", add_bos=False)[0] != tok.bos_id
    ids = tok.encode(f"{USER}hi{ASSISTANT}", add_bos=False)
    assert ids[0] == 2 and ids[-1] == 3
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_bos_eos_from_dicts_and_model_configs(tok_dir, tmp_path):
    conf = json.loads((tok_dir / "tokenizer_config.json").read_text())
    conf["bos_token"] = {"__type": "AddedToken", "content": BOS, "special": True}
    conf["eos_token"] = {"content": EOS}
    conf["chat_template"] = [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
                             {"name": "tool_use", "template": "T{{ tools | length }}"}]
    d = _copy_dir(tok_dir, tmp_path / "a", tokenizer_config=conf, generation_config=None,
                  config={"bos_token_id": 0, "eos_token_id": [1, 3]})
    t = Tokenizer.from_pretrained(d)
    assert (t.bos_id, t.eos_ids, t.bos_token, t.eos_token) == (0, [1, 3], BOS, EOS)
    msgs = [{"role": "user", "content": "x"}]
    assert t.apply_chat_template(msgs) == "Dx"
    assert t.apply_chat_template(msgs, tools=[{"a": 1}]) == "T1"  # HF's rule: tool_use when tools are given
    assert t.apply_chat_template(msgs, chat_template="tool_use", tools=[]) == "T0"
    with pytest.raises(ChatTemplateError, match="no chat template named 'other'"):
        t.apply_chat_template(msgs, chat_template="other")

    # generation_config.json wins over config.json; a missing bos_token in tokenizer_config falls back to it.
    del conf["bos_token"]
    d = _copy_dir(tok_dir, tmp_path / "b", tokenizer_config=conf, generation_config={"eos_token_id": [4, 1]},
                  config={"bos_token_id": 0, "eos_token_id": 3})
    t = Tokenizer.from_pretrained(d)
    assert (t.bos_id, t.eos_ids, t.bos_token) == (0, [1, 4], BOS)


def test_chat_template_jinja_file_and_no_template(tok_dir, tmp_path):
    conf = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del conf["chat_template"]
    d = _copy_dir(tok_dir, tmp_path / "a", tokenizer_config=conf)
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        Tokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": "x"}])
    (d / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": "x"}]) == "J1"


@pytest.mark.parametrize("case, match", [
    ("missing_dir", "does not exist"),
    ("missing", "tokenizer.json not found"),
    ("corrupt", "tokenizer.json is not a valid tokenizers file"),
    ("bad_config_json", "tokenizer_config.json is not valid JSON"),
    ("unknown_eos", "eos_token 'nope' is not in the vocabulary"),
    ("eos_out_of_range", "generation_config.json: eos_token_id .* must be token ids"),
    ("bad_template_type", "chat_template must be a string or a list"),
])
def test_load_errors_name_the_file(tok_dir, tmp_path, case, match):
    d = _copy_dir(tok_dir, tmp_path / "d")
    if case == "missing_dir":
        d = tmp_path / "nowhere"
    elif case == "missing":
        (d / "tokenizer.json").unlink()
    elif case == "corrupt":
        (d / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text()[:500])
    elif case == "bad_config_json":
        (d / "tokenizer_config.json").write_text("{not json")
    elif case == "unknown_eos":
        conf = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps(dict(conf, eos_token="nope")))
    elif case == "eos_out_of_range":
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 10**6]}))
    elif case == "bad_template_type":
        conf = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps(dict(conf, chat_template={"x": 1})))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        Tokenizer.from_pretrained(d)


# ---- chat template --------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Καλημέρα 😀"},
]


def test_deepseek_format(tok):
    expected = (f"{BOS}You are helpful.{USER}Hi{ASSISTANT}Hello!{EOS}{USER}Καλημέρα 😀{ASSISTANT}")
    assert tok.apply_chat_template(CONVERSATION) == expected
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected[:-len(ASSISTANT)]


def test_encode_chat_has_one_bos(tok):
    ids = tok.encode_chat(CONVERSATION)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids[-1] == tok.token_to_id(ASSISTANT) and tok.eos_ids[0] in ids
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION)


# A template in the style of the DeepSeek-V3/R1 ones (namespace, loop variables, tojson, selectattr, loop controls,
# tool calls, reasoning stripped from past assistant turns), written for this test.
TOOL_TEMPLATE = r"""
{%- set ns = namespace(system='', in_results=false) -%}
{%- for m in messages | selectattr('role', 'equalto', 'system') -%}
    {%- set ns.system = ns.system + ('' if loop.first else '\n') + m['content'] -%}
{%- endfor -%}
{{ bos_token }}{{ ns.system }}
{%- if tools %}
    {{- '\n# Tools (' ~ strftime_now('%Y') ~ ')\n' }}
    {%- for t in tools %}
        {{- t['function']['name'] + ': ' + (t['function'] | tojson) + '\n' }}
    {%- endfor %}
{%- endif %}
{%- for m in messages %}
    {%- if m['role'] == 'system' %}{% continue %}{% endif %}
    {%- if m['role'] != 'tool' and ns.in_results %}
        {{- '[/results]' }}
        {%- set ns.in_results = false %}
    {%- endif %}
    {%- if m['role'] == 'user' %}
        {{- '<｜User｜>' + m['content'] }}
    {%- elif m['role'] == 'assistant' and m['tool_calls'] is defined and m['tool_calls'] %}
        {{- '<｜Assistant｜>' + (m['content'] or '') }}
        {%- for call in m['tool_calls'] %}
            {{- '[call ' ~ loop.index ~ '/' ~ loop.length ~ '] ' + call['function']['name'] + ' ' }}
            {{- call['function']['arguments'] | tojson }}
        {%- endfor %}
        {{- eos_token }}
    {%- elif m['role'] == 'assistant' %}
        {{- '<｜Assistant｜>' + m['content'].split('</think>')[-1] + eos_token }}
    {%- elif m['role'] == 'tool' %}
        {%- if not ns.in_results %}
            {{- '[results]' }}
            {%- set ns.in_results = true %}
        {%- endif %}
        {{- '[result ' + m['tool_call_id'] + '] ' + m['content'] }}
    {%- endif %}
{%- endfor %}
{%- if ns.in_results %}{{ '[/results]' }}{% endif %}
{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}
"""


def test_realistic_template_features(tok):
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather <now> & here",
                                               "parameters": {"city": "string"}}}]
    messages = [
        {"role": "system", "content": "S1"},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "Weather in Αθήνα?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Αθήνα"}}},
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "北京"}}}]},
        {"role": "tool", "tool_call_id": "a", "content": "22C"},
        {"role": "tool", "tool_call_id": "b", "content": "18C"},
        {"role": "assistant", "content": "<think>hot</think>Warm in both."},
        {"role": "user", "content": "Thanks"},
    ]
    year = datetime.now().strftime("%Y")
    expected = (
        f"{BOS}S1\nS2\n# Tools ({year})\n"
        'weather: {"name": "weather", "description": "Weather <now> & here", "parameters": {"city": "string"}}\n'
        f'{USER}Weather in Αθήνα?{ASSISTANT}[call 1/2] weather {{"city": "Αθήνα"}}[call 2/2] weather '
        f'{{"city": "北京"}}{EOS}[results][result a] 22C[result b] 18C[/results]{ASSISTANT}Warm in both.{EOS}'
        f"{USER}Thanks{ASSISTANT}"
    )
    assert tok.apply_chat_template(messages, chat_template=TOOL_TEMPLATE, tools=tools) == expected


def test_raise_exception_carries_the_template_message(tok):
    with pytest.raises(ChatTemplateError, match="^unsupported role: tool$"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ raise_exception.__globals__ }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
])
def test_sandbox_refuses_escapes(tok, source):
    with pytest.raises(ChatTemplateError, match="unsafe operation"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=source + "{# #}")


def test_template_errors_are_clear(tok):
    with pytest.raises(ChatTemplateError, match="syntax error at line 1"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% if %}")
    with pytest.raises(ChatTemplateError, match="failed to render"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ 1 + messages }}")


@pytest.mark.parametrize("messages, match", [
    ("hello", "must be a list"),
    ([], "is empty"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\]\['role'\] is 'robot'"),
    ([{"content": "x"}], r"'role'\] is None"),
    ([{"role": "user"}], r"messages\[0\] \(user\) has no 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]\['content'\] must be a str"),
    ([{"role": "user", "content": None}], "must be a string, got NoneType"),
])
def test_message_validation(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_tool_call_only_assistant_may_have_no_content():
    msgs = [{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}]
    out = validate_messages(msgs)
    assert len(out) == 1 and out[0]["tool_calls"] == [{"id": "x"}]


# ---- incremental detokenisation -------------------------------------------------------------------------------

def _stream(tok, ids, skip, rnd, prompt=()):
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas, i, windows = [], 0, []
    while i < len(ids):
        n = rnd.choice([1, 1, 1, 2, 3])
        deltas.append(detok.add(ids[i:i + n] if n > 1 else ids[i]))
        windows.append(detok.window)
        i += n
    deltas.append(detok.flush())
    return deltas, windows


@pytest.mark.parametrize("skip", [True, False])
def test_deltas_concatenate_to_decode_random_ids(tok, skip):
    rnd = random.Random(1234 + skip)
    for _ in range(400):
        ids = [rnd.randrange(tok.vocab_size) for _ in range(rnd.randrange(1, 40))]
        deltas, _ = _stream(tok, ids, skip, rnd)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == full, ids
        # Nothing emitted is ever taken back, which is what "no partial character" means to a reader.
        emitted = ""
        for d in deltas:
            emitted += d
            assert full.startswith(emitted), ids


def test_deltas_of_real_text_never_hold_replacement_chars(tok):
    rnd = random.Random(7)
    split_chars = 0
    for _ in range(300):
        text = "".join(rnd.choice(TEXT_ALPHABET) for _ in range(rnd.randrange(1, 30)))
        ids = tok.encode(text, add_bos=rnd.random() < 0.5)
        split_chars += sum(tok.decode([i]) == "\ufffd" for i in ids)
        deltas, _ = _stream(tok, ids, True, rnd)
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas), (text, deltas)
    assert split_chars > 100  # the corpus really splits characters across tokens


def test_window_stays_small_on_long_streams(tok):
    rnd = random.Random(3)
    ids = [rnd.randrange(tok.vocab_size) for _ in range(3000)]
    ids += tok.encode("".join(rnd.choice(TEXT_ALPHABET) for _ in range(2000)), add_bos=False)
    for skip in (True, False):
        deltas, windows = _stream(tok, ids, skip, rnd)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert max(windows) <= 16, max(windows)  # independent of the 4,000+ tokens of history


def test_deltas_with_a_sentencepiece_style_decoder():
    # Metaspace + byte fallback (Llama/Mistral style): the decoder strips the leading space of whatever it is given,
    # so a delta is only right when measured against the same window decoded without the new tokens.
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE(byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    tok = Tokenizer(raw, bos_id=0, eos_ids=[1])
    rnd = random.Random(5)
    for _ in range(300):
        parts = ["".join(rnd.choice(TEXT_ALPHABET) for _ in range(rnd.randrange(1, 15))) for _ in range(2)]
        ids = tok.encode(parts[0]) + [1] + tok.encode(parts[1])
        # Only valid text: ByteFallback turns a whole run of byte tokens into U+FFFDs when any byte of it is
        # invalid, so for broken byte streams an earlier character can change later and no stream is exact.
        for skip in (True, False):
            deltas, _ = _stream(tok, ids, skip, rnd)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), ids
    # After a prompt the first word keeps its leading space, as it reads in the whole text.
    prompt, out = tok.encode("hello"), tok.encode(" world")
    assert tok.decode(out) == "world"
    assert "".join(_stream(tok, out, True, rnd, prompt)[0]) == " world"


def test_detokenizer_from_tokenizer(tok):
    detok = tok.detokenizer(skip_special_tokens=False)
    out = "".join(detok.add(i) for i in tok.encode("中😀")) + detok.flush()
    assert out == BOS + "中😀"


def test_prompt_context_is_not_emitted(tok):
    rnd = random.Random(9)
    for _ in range(200):
        prompt = tok.encode("".join(rnd.choice(TEXT_ALPHABET) for _ in range(rnd.randrange(0, 12))))
        if rnd.random() < 0.3:  # a prompt that ends inside a character: no context is safe to use
            prompt.append(tok.encode("中", add_bos=False)[0])
        out = [rnd.randrange(tok.vocab_size) for _ in range(rnd.randrange(1, 20))]
        for skip in (True, False):
            deltas, _ = _stream(tok, out, skip, rnd, prompt)
            assert "".join(deltas) == tok.decode(out, skip_special_tokens=skip), (prompt, out)


# ---- stop strings ---------------------------------------------------------------------------------------------

def test_stop_string_across_deltas(tok):
    sc = tok.stop_checker(["</end>", "STOP"])
    assert sc.feed("Hello </") == ("Hello ", False)  # "</" could start "</end>": held back
    assert sc.feed("en") == ("", False)
    assert sc.feed("d> ignored") == ("", True) and sc.hit and sc.matched == "</end>"
    assert sc.feed("more") == ("", True) and sc.flush("x") == ""


def test_stop_string_false_start_is_released():
    sc = StopChecker("</end>")
    assert sc.feed("a </e") == ("a ", False)
    assert sc.feed("x") == ("</ex", False)
    assert sc.feed("</") == ("", False)
    assert sc.flush() == "</" and not sc.hit
    sc = StopChecker("</end>")  # the last delta of a stream can still hold a stop string
    assert sc.feed("ok </e") == ("ok ", False)
    assert sc.flush("nd> and more") == "" and sc.hit


def test_stop_earliest_and_no_stops():
    sc = StopChecker(["world", "lo w", "o"])
    assert sc.feed("hello world") == ("hell", True) and sc.matched == "o"
    assert StopChecker(None).feed("abc") == ("abc", False)
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""])


def test_stop_result_does_not_depend_on_delta_boundaries():
    rnd = random.Random(11)
    for _ in range(500):
        text = "".join(rnd.choice("abcα中") for _ in range(rnd.randrange(0, 25)))
        stops = ["".join(rnd.choice("abcα中") for _ in range(rnd.randrange(1, 4)))
                 for _ in range(rnd.randrange(1, 4))]
        # Reference: the occurrence that completes first (the model would stop there), longest on ties.
        hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
        expected = text[:min(hits)[1]] if hits else text
        sc = StopChecker(stops)
        out, i = "", 0
        while i < len(text):
            n = rnd.randrange(1, 5)
            out += sc.feed(text[i:i + n])[0]
            i += n
        out += sc.flush()
        assert (out, sc.hit) == (expected, bool(hits)), (text, stops)
