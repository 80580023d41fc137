"""The C++ CPU kernels (csrc/: cpu_kernels.cpp and the kernel-family headers it includes): built on first use, then
loaded from a cache directory.

`load()` returns the `torch.ops.dsv3_cpu` namespace, or None when the kernels cannot be used here; callers then keep
the pure PyTorch path, which stays the reference. The reason for None is logged once: disabled by
DSV3_CPU_KERNELS=0, a CPU with neither AVX-512 (F, BW and VL) nor AVX2 + FMA (csrc/simd.h maps the kernels' 16-lane
vectors onto either), no C++ compiler, or a failed build.

The build (`torch.utils.cpp_extension`, -O3 -march=native for the machine it runs on) takes ~15 s once; the shared
library is cached under $DSV3_KERNEL_CACHE (default ~/.cache/dsv3/kernels) in a directory named by the hash of the
sources (every file of csrc/), the flags, the torch/Python versions and the CPU's features, so an edit rebuilds it, a
stale library is never loaded and a home directory shared by different machines never hands one a library built for
another CPU.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCE = os.path.join(SOURCE_DIR, "cpu_kernels.cpp")  # the translation unit; it includes the headers beside it
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl")  # the full-width build
AVX2_CPU_FLAGS = ("avx2", "fma", "f16c")  # the half-width build (csrc/simd.h: each 16-lane vector is two AVX2 registers)

_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unsupported_reason() -> str | None:
    """Why the kernels cannot be built on this machine, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they need an x86-64 CPU with AVX-512 or AVX2, this is {platform.machine()}"
    flags = cpu_flags()
    if not all(f in flags for f in REQUIRED_CPU_FLAGS) and not all(f in flags for f in AVX2_CPU_FLAGS):
        return "this CPU has neither AVX-512 (F, BW, VL) nor AVX2 with FMA and F16C"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH (install g++ or set CXX)"
    return None


def build(namespace: str = "dsv3_cpu", extra_cflags: tuple[str, ...] = (), source_dir: str = SOURCE_DIR) -> object:
    """Compile (or reuse the cached build) and return torch.ops.<namespace>. Raises on failure. source_dir: another
    copy of csrc/ (benchmarks/ab_kernels.py builds a git revision's beside the working tree's, each under its own
    namespace, so both load into one process)."""
    from torch.utils import cpp_extension

    flags = CFLAGS + list(extra_cflags) + [f"-DDSV3_NS={namespace}"]
    key = b""
    for name in sorted(os.listdir(source_dir)):  # an edit of any header rebuilds too
        if name.endswith((".cpp", ".h")):
            with open(os.path.join(source_dir, name), "rb") as f:
                key += name.encode() + b"\0" + f.read()
    # -march=native: a library built on one CPU may not run on another, so the CPU's features are in the key.
    key += " ".join(flags + [torch.__version__, sys.version, *sorted(cpu_flags())]).encode()
    root = os.environ.get("DSV3_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsv3", "kernels")
    build_dir = os.path.join(root, f"{namespace}-{hashlib.sha256(key).hexdigest()[:16]}")
    os.makedirs(build_dir, exist_ok=True)
    if not any(name.endswith(".so") for name in os.listdir(build_dir)):
        log.warning("building the dsv3 CPU kernels (once, ~15 s) in %s", build_dir)
    cpp_extension.load(name=f"{namespace}_kernels", sources=[os.path.join(source_dir, os.path.basename(SOURCE))],
                       build_directory=build_dir,
                       extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    return getattr(torch.ops, namespace)


def load() -> object | None:
    """The op namespace (building it on first use), or None with the reason logged once."""
    with _lock:
        if "ops" not in _state:
            why = "disabled by DSV3_CPU_KERNELS=0" if os.environ.get("DSV3_CPU_KERNELS", "1") == "0" else \
                unsupported_reason()
            ops = None
            if why is None:
                try:
                    ops = build()
                except Exception as e:  # a failed build: keep the PyTorch path
                    lines = str(e).strip().splitlines()
                    why = f"the build failed: {lines[-1] if lines else type(e).__name__}"
            _state["ops"], _state["why"] = ops, why
            if ops is None:
                log.warning("dsv3 CPU kernels not used (%s); running the PyTorch path", why)
        return _state["ops"]


@contextlib.contextmanager
def override(ops) -> Iterator[None]:
    """Within the block, load() returns `ops` (another build's namespace, from build()): models packed inside it run
    on that build (benchmarks comparing two builds in one process)."""
    with _lock:
        saved = dict(_state)
        _state["ops"], _state["why"] = ops, None
    try:
        yield
    finally:
        with _lock:
            _state.clear()
            _state.update(saved)


def loaded() -> object | None:
    """The op namespace if load() has already succeeded in this process, else None (never builds: for code that
    only takes a shortcut through the kernels when the engine uses them anyway)."""
    return _state.get("ops")


def status() -> str:
    """One line for logs and benchmarks: which kernels run, or why none do."""
    ops = load()
    return f"C++ CPU kernels ({ops.capability()})" if ops is not None else f"PyTorch path ({_state['why']})"
