"""Training data: text files -> byte-level BPE -> one packed token stream -> fixed-length windows.

The built-in corpus ("stdlib") is the installed Python standard library's .py sources: every machine that runs dsv3
has it. Files are split into train and held-out by a hash of their relative path, so the split does not depend on
which other files exist or on their order. Documents are concatenated, each ending with eos, and cut into windows of
seq_len + 1 tokens (inputs and shifted targets). Each document starts with bos when the tokenizer has one, as an
inference prompt does (the tokenizer adds it), so the model learns bos as "start of a file". The token stream is cached as .npy under a cache directory, keyed by
the files' names, sizes and mtimes and by the tokenizer, so a second run starts in a second.

Dimension letters: B sequences, S sequence length, W windows.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..tokenizer_build import BOS, EOS, save_tokenizer_files, train_bpe
from . import sources as sources_mod

log = logging.getLogger(__name__)

STDLIB = "stdlib"
DEFAULT_HOLDOUT_PERCENT = 2


def default_cache_dir() -> str:
    return os.environ.get("DSV3_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsv3", "train")


# ------------------------------------------------------------------------------------------------------------------
# Finding and splitting files
@dataclass(frozen=True)
class Doc:
    path: str  # absolute
    rel: str  # stable name used for the split and the cache key


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_docs() -> list[Doc]:
    root = stdlib_root()
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Third-party packages live under the stdlib directory on most installs; they are not the stdlib.
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for f in filenames:
            if f.endswith(".py"):
                p = os.path.join(dirpath, f)
                docs.append(Doc(p, os.path.relpath(p, root).replace(os.sep, "/")))
    if not docs:
        raise RuntimeError(f"no .py files under the standard library directory {root!r}; pass --data PATH instead")
    return sorted(docs, key=lambda d: d.rel)


def resolve_docs(sources: list[str] | str) -> list[Doc]:
    """'stdlib', the named sources of train/sources.py ('code', 'site:NAME', 'heldout-packages'), files,
    directories (searched recursively) and glob patterns -> sorted, de-duplicated documents."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise ValueError("no data given: pass 'stdlib', 'code', 'site:NAME' or files, directories or glob patterns")
    found: dict[str, Doc] = {}
    for src in sources:
        if src in (STDLIB, sources_mod.CODE):
            for d in stdlib_docs():
                found[d.path] = d
            if src == STDLIB:
                continue
        named = sources_mod.resolve(src)  # code, site:NAME, heldout-packages (train/sources.py)
        if named is not None:
            for path, rel in named:
                found[path] = Doc(path, rel)
            continue
        if os.path.isfile(src):
            paths = [src]
        elif os.path.isdir(src):
            paths = [os.path.join(dp, f) for dp, _, fs in os.walk(src) for f in fs]
        else:
            paths = [p for p in glob.glob(src, recursive=True) if os.path.isfile(p)]
            if not paths and not glob.has_magic(src):
                raise FileNotFoundError(f"data path {src!r} does not exist (pass 'stdlib', 'code', 'site:NAME', a "
                                        f"file, a directory or "
                                        f"a glob pattern)")
        paths = [p for p in paths if "__pycache__" not in p.split(os.sep)]
        if not paths:
            raise ValueError(f"data path {src!r} matched no files")
        for p in paths:
            ap = os.path.abspath(p)
            found[ap] = Doc(ap, "")
    plain = [d for d in found.values() if not d.rel]
    if plain:
        root = os.path.commonpath([d.path for d in plain])
        root = root if os.path.isdir(root) else os.path.dirname(root)
        for d in plain:
            found[d.path] = Doc(d.path, os.path.relpath(d.path, root).replace(os.sep, "/"))
    return sorted(found.values(), key=lambda d: d.rel)


def is_heldout(rel: str, percent: int = DEFAULT_HOLDOUT_PERCENT) -> bool:
    return zlib.crc32(rel.encode("utf-8")) % 100 < percent


def split_docs(docs: list[Doc], percent: int = DEFAULT_HOLDOUT_PERCENT) -> tuple[list[Doc], list[Doc]]:
    """(train, held-out). With few files the hash may hold out none or all: then exactly the file with the smallest
    hash is held out, so both sides have data. A single file is both (see build_corpus)."""
    if len(docs) < 2:
        return list(docs), list(docs)
    held = [d for d in docs if is_heldout(d.rel, percent)]
    if not held or len(held) == len(docs):
        held = [min(docs, key=lambda d: zlib.crc32(d.rel.encode("utf-8")))]
    held_set = {d.path for d in held}
    train = [d for d in docs if d.path not in held_set]
    return train, held


def read_text(path: str) -> str | None:
    """UTF-8 text, or None for files that are not text (binary data in a glob, Latin-1 test fixtures)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if b"\x00" in raw:
            return None
        return raw.decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def read_texts(docs: list[Doc]) -> list[str]:
    return [t for t in (read_text(d.path) for d in docs) if t]


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer
def _fingerprint(docs: list[Doc], *extra: str) -> str:
    h = hashlib.sha256()
    for d in docs:
        st = os.stat(d.path)
        h.update(f"{d.rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:16]


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    f = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(f):
        raise FileNotFoundError(f"no tokenizer.json at {f!r}: pass a checkpoint directory or a tokenizer.json")
    return Tokenizer.from_file(f)


def get_tokenizer(train_docs: list[Doc], vocab_size: int, cache_dir: str):
    """A byte-level BPE trained on the training documents, cached by (documents, vocab size)."""
    key = _fingerprint(train_docs, f"bpe{vocab_size}")
    d = os.path.join(cache_dir, f"tokenizer-{key}")
    if os.path.exists(os.path.join(d, "tokenizer.json")):
        return load_tokenizer(d)
    log.info("training a byte-level BPE (vocab %d) on %d files", vocab_size, len(train_docs))
    tok = train_bpe(read_texts(train_docs), vocab_size)
    tmp = d + f".tmp{os.getpid()}"
    save_tokenizer_files(tok, tmp)
    try:
        os.replace(tmp, d)
    except OSError:  # another process finished first; its tokenizer is the same
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(d)


def token_byte_lengths(tok) -> np.ndarray:
    """[V] the number of UTF-8 bytes each token stands for (special tokens: 0); bits per byte divides by these.
    Byte-level BPE maps each byte to one printable character, so a token's byte count is its string length."""
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    for s, i in tok.get_vocab().items():
        if s not in specials and i < len(out):
            out[i] = len(s)
    return out


def tokenizer_hash(tok) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------------
# Packed token streams
STREAM_FORMAT = "bos-doc-eos"  # part of the stream cache key: a change of layout must not reuse old caches


def encode_docs(tok, texts: list[str]) -> np.ndarray:
    """[bos] + tokens + [eos] per document (no bos if the tokenizer has none), concatenated."""
    eos, bos = tok.token_to_id(EOS), tok.token_to_id(BOS)
    if eos is None:
        raise ValueError(f"the tokenizer has no {EOS!r} token; use one made by dsv3.tokenizer_build")
    dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.uint32
    parts = []
    for i in range(0, len(texts), 256):
        for enc in tok.encode_batch(texts[i:i + 256], add_special_tokens=False):
            if bos is not None:
                parts.append(np.asarray([bos], dtype=dtype))
            parts.append(np.asarray(enc.ids, dtype=dtype))
            parts.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def token_stream(docs: list[Doc], tok, cache_dir: str, name: str) -> np.ndarray:
    """The documents' tokens (encode_docs), cached as .npy (memory-mapped on reuse)."""
    key = _fingerprint(docs, tokenizer_hash(tok) + STREAM_FORMAT)
    path = os.path.join(cache_dir, f"{name}-{key}.npy")
    if not os.path.exists(path):
        texts = read_texts(docs)
        if not texts:
            raise ValueError(f"none of the {len(docs)} {name} file(s) is UTF-8 text (first: {docs[0].path})")
        arr = encode_docs(tok, texts)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}.npy"
        np.save(tmp, arr)
        os.replace(tmp, path)
        log.info("tokenized %d %s files: %d tokens -> %s", len(texts), name, len(arr), path)
    return np.load(path, mmap_mode="r")


class Windows:
    """Non-overlapping windows of seq_len + 1 tokens over a packed stream (a window's last token is the previous
    window's target only, never an input twice)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.span = tokens, seq_len + 1
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill one window of seq_len {seq_len}: use a shorter "
                             f"--seq-len or more data")
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self.n

    def get(self, idx: np.ndarray | list[int]) -> torch.Tensor:
        """-> [B, S+1] int64"""
        rows = [np.asarray(self.tokens[i * self.seq_len: i * self.seq_len + self.span], dtype=np.int64) for i in idx]
        return torch.from_numpy(np.stack(rows))


class Sampler:
    """A deterministic infinite stream of window indices: a fresh seeded permutation per epoch. Position `cursor`
    (windows consumed so far) is all the state there is, which makes resumption exact."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _epoch(self, e: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != e:
            self._perm = (e, np.random.default_rng([self.seed, e]).permutation(self.n))
        return self._perm[1]

    def take(self, cursor: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            e, i = divmod(cursor + j, self.n)
            out[j] = self._epoch(e)[i]
        return out


@dataclass
class Corpus:
    tokenizer: object
    train: np.ndarray
    heldout: np.ndarray
    train_docs: list[Doc]
    heldout_docs: list[Doc]
    token_bytes: np.ndarray  # [V]

    def unigram_baseline(self) -> float:
        """Held-out cross-entropy (nats/token) of the training set's unigram distribution (add-one smoothing)."""
        V = len(self.token_bytes)
        counts = np.bincount(np.asarray(self.train), minlength=V).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        return float(-logp[np.asarray(self.heldout)].mean())


def build_corpus(sources: list[str] | str, vocab_size: int, cache_dir: str | None = None,
                 tokenizer_path: str | None = None, holdout_percent: int = DEFAULT_HOLDOUT_PERCENT) -> Corpus:
    cache_dir = cache_dir or default_cache_dir()
    docs = resolve_docs(sources)
    train_docs, held_docs = split_docs(docs, holdout_percent)
    if len(docs) == 1:
        log.warning("only one data file (%s): evaluation is on the training file, not held out", docs[0].rel)
    if tokenizer_path:
        tok = load_tokenizer(tokenizer_path)
    else:
        tok = get_tokenizer(train_docs, vocab_size, cache_dir)
    train = token_stream(train_docs, tok, cache_dir, "train")
    held = token_stream(held_docs, tok, cache_dir, "heldout")
    return Corpus(tok, train, held, train_docs, held_docs, token_byte_lengths(tok))
