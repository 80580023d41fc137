"""Making tokenizers in the DeepSeek format: a byte-level BPE trained with the `tokenizers` library, DeepSeek's
special tokens at the front of the vocabulary (bos 0, eos 1 as in DeepSeek-V3), and a tokenizer_config.json with a
chat template that renders DeepSeek-V3's conversation format.

Used by `dsv3 init-tiny` (a small tokenizer for the random test model) and by training (a tokenizer for the
embedded model, trained on the Python standard library's sources).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, PAD]

# DeepSeek-V3's conversation format: bos, the system prompt(s) as plain text, then each user turn after <｜User｜>
# and each assistant turn after <｜Assistant｜> closed by eos; a generation prompt ends with <｜Assistant｜>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}"
    "{%- elif m['role'] != 'system' %}{{ raise_exception('unsupported role: ' + m['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{%- endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer (tokenizers.Tokenizer) with SPECIAL_TOKENS at ids 0..4."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small for byte-level BPE (needs >= "
                         f"{256 + len(SPECIAL_TOKENS)}: 256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    return tok


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def save_tokenizer_files(tok, path: str | os.PathLike, model_max_length: int = 4096) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) into a checkpoint directory."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    conf = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "model_max_length": model_max_length, "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=2, ensure_ascii=False)
        f.write("\n")
    gen = {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS), "do_sample": True,
           "temperature": 0.6, "top_p": 0.95}
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
