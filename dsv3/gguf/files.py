"""Opening GGUF files: a path (one .gguf file, the first part of a split set, or a directory holding one) -> the
parts, each read with the gguf package's memory-mapped GGUFReader after its header was checked against the file's
size, so that a truncated file, a lying tensor offset or size, a wrong magic, an unsupported version or a missing
part is reported with its file before any tensor data is touched. Nothing here reads tensor data.

Split sets are llama.cpp's gguf-split layout: `<name>-00001-of-00003.gguf`, ..., each part a complete GGUF file
whose `split.count` / `split.no` keys say where it belongs; the metadata that describes the model is in part 1.
"""
from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checkpoint.layout import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_FIX = "the file is truncated or corrupted: download it again"


class GGUFError(CheckpointError):
    """A GGUF file (or split set) that cannot be run as it is; the message names the file and what is wrong."""


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: its name, type, shape in PyTorch order (GGUF's dims reversed: [..., rows, cols])
    and its bytes, a read-only memory-mapped view [..., rows, bytes per row]."""

    name: str
    file: str
    type_name: str  # gguf.GGMLQuantizationType name: "Q4_K", "BF16", ...
    shape: tuple[int, ...]
    data: np.ndarray
    nbytes: int
    offset: int = 0  # of its first byte in the file
    part: int = 0  # index of its file in GGUFModel.files


@dataclass
class GGUFModel:
    """The metadata of a GGUF model (from its first part) and the tensors of all its parts."""

    path: str  # the first (or only) file
    files: list[str]
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)
    readers: list = field(default_factory=list, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def where(self, name: str) -> str:
        t = self.tensors.get(name)
        return f"{name} ({os.path.basename(t.file)})" if t else name

    def release(self, t: GGUFTensor) -> None:
        """Drop the mapped pages of tensor t from this process (the page cache keeps them): a load then holds only
        what it has decoded, not the file's pages as well, in its resident set."""
        mm = getattr(self.readers[t.part].data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = t.offset // page * page
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)
        except (OSError, ValueError):
            pass  # only an optimisation

    def type_bytes(self) -> dict[str, int]:
        """Bytes per tensor type, most first."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.type_name] = out.get(t.type_name, 0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def describe_types(self) -> str:
        """'Q4_K 61.2%, Q6_K 30.1%, F32 0.1%' (share of the tensor bytes per type)."""
        total = max(1, self.total_bytes)
        return ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in self.type_bytes().items())


def is_gguf_path(path: str | os.PathLike | None) -> bool:
    """Whether `path` names a .gguf file or a directory holding .gguf files and no config.json."""
    if path is None:
        return False
    path = os.fspath(path)
    if path.endswith(".gguf"):
        return True
    return (os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json"))
            and any(f.endswith(".gguf") for f in os.listdir(path)))


def gguf_parts(path: str | os.PathLike) -> list[str]:
    """The files of the model at `path`, the first part first. A directory must hold one model (one file or one
    split set); a split part finds its siblings by name, and a missing one is an error that names it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        firsts = [f for f in found if not _SPLIT.match(f) or int(_SPLIT.match(f)["no"]) == 1]
        if not found:
            raise GGUFError(f"{path}: no .gguf file in this directory")
        if len(firsts) != 1:
            raise GGUFError(f"{path} holds {len(firsts)} GGUF models ({', '.join(firsts)}); pass the file to run "
                            f"(for a split set, its -00001-of-N part)")
        path = os.path.join(path, firsts[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    m = _SPLIT.match(os.path.basename(path))
    if not m:
        return [path]
    count = int(m["count"])
    folder = os.path.dirname(path)
    parts = [os.path.join(folder, f"{m['stem']}-{k:05d}-of-{count:05d}.gguf") for k in range(1, count + 1)]
    missing = [os.path.basename(p) for p in parts if not os.path.isfile(p)]
    if missing:
        raise GGUFError(f"{path}: part(s) {', '.join(missing)} of this {count}-part split set are missing from "
                        f"{folder or '.'}; an interrupted download? Fetch them again")
    return parts


def _check_preamble(fpath: str) -> None:
    """Magic and version, read by hand so a foreign file gets a clear error before GGUFReader maps it."""
    size = os.path.getsize(fpath)
    with open(fpath, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise GGUFError(f"{fpath}: {size} bytes is too short to be a GGUF file ({_FIX})")
    if head[:4] != GGUF_MAGIC:
        raise GGUFError(f"{fpath}: not a GGUF file (its first bytes are {head[:4]!r}, a GGUF file starts with "
                        f"{GGUF_MAGIC!r})")
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{fpath}: GGUF version {version} is not supported (dsv3 reads versions "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))}); convert the model again with a current llama.cpp")


def _reader_class():
    import gguf

    class CheckedReader(gguf.GGUFReader):
        """GGUFReader that checks every tensor's type, offset and size against the file before it maps the data
        (the stock reader would fail on a bad entry with a numpy reshape error naming neither file nor tensor)."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            size = len(self.data)
            spans = []
            for fld in fields:
                _nlen, name_data, _ndims, dims, raw_type, offset = fld.parts
                name = bytes(name_data).decode("utf-8", "replace")
                where = f"{self._path}: tensor {name!r}"
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                except ValueError:
                    raise GGUFError(f"{where} has type id {int(raw_type[0])}, which GGUF does not define; "
                                    f"{_FIX}") from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                dims = [int(d) for d in dims]
                if not dims or dims[0] % block:
                    raise GGUFError(f"{where}: {qtype.name} stores blocks of {block} values but its rows hold "
                                    f"{dims[0] if dims else 0}; {_FIX}")
                n = 1
                for d in dims:
                    n *= d
                nbytes = n // block * type_size
                begin = start_offs + int(offset[0])
                if int(offset[0]) % self.alignment:
                    raise GGUFError(f"{where}: data offset {int(offset[0])} is not a multiple of the file's "
                                    f"alignment {self.alignment}; {_FIX}")
                if begin + nbytes > size:
                    raise GGUFError(f"{where} ({qtype.name} {list(reversed(dims))}, {nbytes} bytes at byte {begin}) "
                                    f"ends past the end of the file ({size} bytes); {_FIX}")
                spans.append((begin, begin + nbytes, name))
            spans.sort()
            for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
                if b1 < e0:
                    raise GGUFError(f"{self._path}: tensors {n0!r} and {n1!r} overlap (the header lies about their "
                                    f"offsets or sizes); {_FIX}")
            super()._build_tensors(start_offs, fields)

        def __init__(self, path: str):
            self._path = path
            super().__init__(path, "r")

    return CheckedReader


def _field_value(fld) -> Any:
    """A metadata value as Python (arrays as lists); a malformed one is a GGUFError at read time, not later."""
    return fld.contents() if fld.types else None


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Every part of the model at `path` checked and mapped; metadata from the first part."""
    parts = gguf_parts(path)
    reader_cls = _reader_class()
    model: GGUFModel | None = None
    for k, fpath in enumerate(parts):
        _check_preamble(fpath)
        try:
            reader = reader_cls(fpath)
        except GGUFError:
            raise
        except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, TypeError) as e:
            raise GGUFError(f"{fpath}: the GGUF header cannot be read ({type(e).__name__}: {e}); {_FIX}") from None
        try:
            meta = {name: _field_value(fld) for name, fld in reader.fields.items()}
        except (ValueError, UnicodeDecodeError, IndexError) as e:
            raise GGUFError(f"{fpath}: a metadata value cannot be read ({type(e).__name__}: {e}); {_FIX}") from None
        if model is None:
            model = GGUFModel(parts[0], parts, meta)
        if len(parts) > 1:
            no, count = meta.get("split.no"), meta.get("split.count")
            if count is not None and (count != len(parts) or no != k):
                raise GGUFError(f"{fpath}: its split.no / split.count say part {no} of {count}, but its name says "
                                f"part {k} of {len(parts)}; the parts come from different downloads")
        model.readers.append(reader)
        for t in reader.tensors:
            if t.name in model.tensors:
                raise GGUFError(f"{fpath}: tensor {t.name!r} is also in {model.tensors[t.name].file}; the parts "
                                f"come from different models")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            data = t.data if t.data.ndim == len(shape) else t.data.reshape(*shape[:-1], -1)
            model.tensors[t.name] = GGUFTensor(t.name, fpath, t.tensor_type.name, shape, data, int(t.n_bytes),
                                               int(t.data_offset), k)
    assert model is not None
    return model
