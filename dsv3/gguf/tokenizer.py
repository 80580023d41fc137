"""The tokenizer of a GGUF file, from its metadata: tokenizer.ggml.tokens / merges / token_type / bos / eos / the
`pre` name of the pre-tokenizer, built as a `tokenizers` byte-level BPE, and tokenizer.chat_template rendered by
dsv3.tokenizer's sandbox. A tokenizer.json beside the file wins (it is what the original checkpoint shipped).

The pre-tokenizers are the regex splits llama.cpp applies for each `pre` name (llama-vocab.cpp), each isolating its
matches in turn, then the byte-level mapping, which is how the checkpoints' own tokenizer.json files express them.
"""
from __future__ import annotations

import logging
import os

from ..tokenizer import Tokenizer
from .files import GGUFError, GGUFModel

log = logging.getLogger(__name__)

_DEEPSEEK_V3 = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|"
    "\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
_DEEPSEEK_LLM = (
    '[\r\n]',
    '\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+',
    '\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+',
    '\\s+$',
    '[一-龥ࠀ-一가-\ud7ff]+',
    '\\p{N}+',
)
# Kimi-K2 (Moonlight's tokenizer too) is tiktoken's: one alternation, Han runs apart from other letters (character
# class intersection, which Oniguruma supports as tiktoken's fancy-regex does), English contractions kept on words.
_NOT_HAN_UPPER = "[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]"
_NOT_HAN_LOWER = "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]"
_CONTRACTION = "(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_KIMI_K2 = ("|".join([
    "[\\p{Han}]+",
    f"[^\\r\\n\\p{{L}}\\p{{N}}]?{_NOT_HAN_UPPER}*{_NOT_HAN_LOWER}+{_CONTRACTION}",
    f"[^\\r\\n\\p{{L}}\\p{{N}}]?{_NOT_HAN_UPPER}+{_NOT_HAN_LOWER}*{_CONTRACTION}",
    "\\p{N}{1,3}",
    " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*",
    "\\s*[\\r\\n]+",
    "\\s+(?!\\S)",
    "\\s+",
]),)
PRE_SPLITS = {"deepseek-v3": _DEEPSEEK_V3, "deepseek-llm": _DEEPSEEK_LLM, "kimi-k2": _KIMI_K2}
GPT2_PRES = ("gpt2", "default")  # GPT-2's regex: tokenizers' own ByteLevel(use_regex=True)
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # gguf.TokenType


def build_bpe(tokens: list[str], merges: list[str], types: list[int] | None, pre: str, where: str = "GGUF"):
    """A tokenizers.Tokenizer: byte-level BPE over `tokens` (id = position) and `merges` ("a b"), control tokens as
    special added tokens, user-defined ones as plain added tokens, the pre-tokenizer named `pre`."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"{where}: tokenizer.ggml.tokens holds duplicate tokens; the file is corrupted")
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFError(f"{where}: tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        pairs.append((a, b))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre in PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in PRE_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    elif pre in GPT2_PRES:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise GGUFError(f"{where}: tokenizer.ggml.pre is {pre!r}; dsv3 builds the pre-tokenizers "
                        f"{', '.join(list(PRE_SPLITS) + list(GPT2_PRES))} from GGUF metadata. Put the model's "
                        f"tokenizer.json (and tokenizer_config.json) beside the file: it is used instead")
    tok.decoder = decoders.ByteLevel()
    if types is not None:
        added = [AddedToken(tokens[i], special=ty == TOKEN_CONTROL, normalized=False)
                 for i, ty in enumerate(types) if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        tok.add_special_tokens([a for a in added if a.special])
        tok.add_tokens([a for a in added if not a.special])
    return tok


def gguf_tokenizer(g: GGUFModel) -> Tokenizer | None:
    """The tokenizer for a GGUF model: tokenizer.json beside its file if there is one, else built from the metadata
    (None, with a warning, when the file holds no vocabulary: prompts must then be token ids)."""
    folder = os.path.dirname(os.path.abspath(g.path))
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        log.info("%s: using the tokenizer.json beside it", g.path)
        return Tokenizer.from_pretrained(folder)
    meta = g.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        log.warning("%s holds no tokenizer (no tokenizer.ggml.tokens) and no tokenizer.json is beside it: prompts "
                    "must be token ids", g.path)
        return None
    model = meta.get("tokenizer.ggml.model", "gpt2")
    if model != "gpt2":
        raise GGUFError(f"{g.path}: tokenizer.ggml.model is {model!r}; the DeepSeek family uses byte-level BPE "
                        f"('gpt2'). Put the model's tokenizer.json beside the file to use it instead")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise GGUFError(f"{g.path}: tokenizer.ggml.merges is missing, so the BPE tokenizer cannot be built; put the "
                        f"model's tokenizer.json beside the file")
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise GGUFError(f"{g.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    tok = build_bpe(list(tokens), list(merges), None if types is None else list(types),
                    meta.get("tokenizer.ggml.pre", "default"), g.path)

    def token_of(key: str) -> tuple[str | None, int | None]:
        tid = meta.get(key)
        if tid is None:
            return None, None
        if not 0 <= int(tid) < len(tokens):
            raise GGUFError(f"{g.path}: {key} {tid} is outside the vocabulary of {len(tokens)} tokens")
        return tokens[int(tid)], int(tid)

    bos_token, bos_id = token_of("tokenizer.ggml.bos_token_id")
    eos_token, eos_id = token_of("tokenizer.ggml.eos_token_id")
    eos_ids = [eos_id] if eos_id is not None else []
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and 0 <= int(eot) < len(tokens) and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True)) and bos_id is not None
    templates = {}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        templates["default"] = meta["tokenizer.chat_template"]
    for name in meta.get("tokenizer.chat_templates") or []:
        body = meta.get(f"tokenizer.chat_template.{name}")
        if isinstance(body, str):
            templates[name] = body
    return Tokenizer(tok, bos_token=bos_token, eos_token=eos_token, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                     chat_templates=templates, source=g.path)
