"""What the planner knows about hardware: a table of GPUs (vendor datasheet figures) and this machine's CPU memory,
CPU memory bandwidth, CPU matmul throughput and local GPUs.

Units: GPU memory is listed as the vendor's "GB" figure and treated as GiB, because HBM/GDDR capacities are binary
(an H100 80GB shows 79.6 GiB in nvidia-smi, an RTX 4090 24.0 GiB); bandwidth in GB/s = 1e9 bytes/s; throughput in
dense TFLOPS (the datasheets' "with sparsity" figures are twice these and no LLM kernel reaches them).
"""
from __future__ import annotations

import functools
import logging
import os
import re
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bandwidth_gbs: float | None  # None only for a detected GPU that is not in the table
    bf16_tflops: float | None
    fp8_tflops: float | None  # None: no FP8 tensor cores (FP8 weights are dequantised to bf16 inside matmuls)
    source: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def bandwidth(self) -> float | None:
        return None if self.bandwidth_gbs is None else self.bandwidth_gbs * 1e9

    @property
    def has_fp8(self) -> bool:
        return self.fp8_tflops is not None

    def flops(self, precision: str) -> float | None:
        # FP8 weights use FP8 tensor cores where they exist; int8/int4 weights are dequantised to bf16 for the matmul
        # (weight-only quantisation, as the common kernels do), so they run at the bf16 rate.
        t = self.fp8_tflops if precision == "fp8" and self.has_fp8 else self.bf16_tflops
        return None if t is None else t * 1e12


# Consumer cards: the tensor rates are the "with FP32 accumulate" rows of the architecture whitepapers (half the
# FP16-accumulate rows on GeForce parts); LLM GEMMs accumulate in FP32.
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("H100-SXM", 80, 3350, 989.4, 1978.9, "NVIDIA H100 Tensor Core GPU datasheet (SXM5: HBM3 3.35 TB/s; "
        "BF16 1,979 / FP8 3,958 TFLOPS with sparsity)"),
    GPU("H100-PCIe", 80, 2000, 756.5, 1513.0, "NVIDIA H100 Tensor Core GPU datasheet (PCIe: HBM2e 2 TB/s; "
        "BF16 1,513 / FP8 3,026 TFLOPS with sparsity)"),
    GPU("H200", 141, 4800, 989.4, 1978.9, "NVIDIA H200 Tensor Core GPU datasheet (SXM: 141 GB HBM3e, 4.8 TB/s; "
        "BF16 1,979 / FP8 3,958 TFLOPS with sparsity)"),
    GPU("B200", 180, 8000, 2250.0, 4500.0, "NVIDIA HGX B200 datasheet (1,440 GB HBM3e over 8 GPUs, 8 TB/s per GPU; "
        "BF16 4.5 / FP8 9 PFLOPS per GPU with sparsity)"),
    GPU("A100-40GB", 40, 1555, 312.0, None, "NVIDIA A100 Tensor Core GPU datasheet (SXM 40GB: HBM2 1,555 GB/s; "
        "BF16 312 TFLOPS dense; no FP8)"),
    GPU("A100-80GB", 80, 2039, 312.0, None, "NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB: HBM2e 2,039 GB/s; "
        "BF16 312 TFLOPS dense; no FP8)"),
    GPU("L40S", 48, 864, 362.05, 733.0, "NVIDIA L40S datasheet (48 GB GDDR6, 864 GB/s; BF16 362.05 / FP8 733 "
        "TFLOPS dense)"),
    GPU("RTX3090", 24, 936, 71.0, None, "NVIDIA Ampere GA102 whitepaper, RTX 3090 (GDDR6X 936 GB/s; BF16 with FP32 "
        "accumulate 71 TFLOPS dense; no FP8)"),
    GPU("RTX4090", 24, 1008, 165.2, 330.3, "NVIDIA Ada Lovelace architecture whitepaper, RTX 4090 (GDDR6X 1,008 GB/s; "
        "BF16 165.2 / FP8 330.3 TFLOPS dense with FP32 accumulate)"),
    GPU("RTX5090", 32, 1792, 209.5, 419.0, "NVIDIA RTX Blackwell architecture whitepaper, RTX 5090 (GDDR7 1,792 GB/s; "
        "BF16 209.5 / FP8 419 TFLOPS dense with FP32 accumulate)"),
    GPU("MI300X", 192, 5300, 1307.4, 2614.9, "AMD Instinct MI300X data sheet (192 GB HBM3, 5.3 TB/s; BF16 1,307.4 / "
        "FP8 2,614.9 TFLOPS dense)"),
)}

# Spellings people use, normalised (lower case, no spaces, dashes or underscores) -> table name.
_ALIASES = {
    "h100": "H100-SXM", "h100sxm": "H100-SXM", "h100sxm5": "H100-SXM", "h10080gb": "H100-SXM",
    "h100pcie": "H100-PCIe", "h200": "H200", "h200sxm": "H200", "b200": "B200",
    "a100": "A100-80GB", "a10080gb": "A100-80GB", "a100sxm80gb": "A100-80GB",
    "a10040gb": "A100-40GB", "a100sxm40gb": "A100-40GB", "l40s": "L40S",
    "rtx3090": "RTX3090", "3090": "RTX3090", "rtx4090": "RTX4090", "4090": "RTX4090",
    "rtx5090": "RTX5090", "5090": "RTX5090", "mi300x": "MI300X",
}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def gpu_names() -> list[str]:
    return sorted(GPUS)


def find_gpu(name: str) -> GPU:
    key = _norm(name)
    canonical = _ALIASES.get(key) or next((g for g in GPUS if _norm(g) == key), None)
    if canonical is None:
        raise ValueError(f"unknown GPU {name!r}; known GPUs: {', '.join(gpu_names())} "
                         f"(give --gpus as COUNTxNAME, e.g. 8xH200 or 2xRTX4090, or 'none')")
    return GPUS[canonical]


def parse_gpus(spec: str) -> tuple[GPU, int] | None:
    """'8xH200' -> (H200, 8); 'H200' -> (H200, 1); 'none' -> None."""
    s = spec.strip()
    if _norm(s) in ("none", "0", "cpu"):
        return None
    m = re.fullmatch(r"(?:(\d+)\s*[x×*]\s*)?([A-Za-z0-9][A-Za-z0-9 _.\-]*)", s)
    if not m or re.fullmatch(r"\d+\s*[x×*]", s):
        raise ValueError(f"--gpus {spec!r} is malformed: write COUNTxNAME (e.g. 8xH200, 2xRTX4090) or 'none'; "
                         f"known GPUs: {', '.join(gpu_names())}")
    count = int(m.group(1)) if m.group(1) else 1
    if count < 1:
        raise ValueError(f"--gpus {spec!r}: the GPU count must be at least 1 (use 'none' for no GPU)")
    return find_gpu(m.group(2)), count


_SIZE_UNITS = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": GIB, "tib": 2**40}


def parse_size(text: str, what: str = "--cpu-mem") -> int:
    """'512GB' -> bytes. GB/TB are decimal and GiB/TiB binary, as in the engine's --cache-memory."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if unit not in _SIZE_UNITS:
        raise ValueError(f"{what} {text!r}: give a size with a unit, e.g. 512GB, 1.5TB or 400GiB")
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if value <= 0:
        raise ValueError(f"{what} {text!r} must be positive")
    return int(value)


def parse_bandwidth(text: str, what: str = "--cpu-bandwidth") -> float:
    """'200GB/s' -> bytes/s (decimal: bandwidth is quoted in 1e9 bytes per second). A bare number means GB/s."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])b?(?:/s|ps)?)?\s*", text.lower())
    if not m:
        raise ValueError(f"{what} {text!r}: give a bandwidth such as 200GB/s, 0.4TB/s or 200 (GB/s)")
    value = float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, None: 1e9}[m.group(2)]
    if value <= 0:
        raise ValueError(f"{what} {text!r} must be positive")
    return value


# ------------------------------------------------------------------------------------------------------------------
# This machine
def cpu_memory_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@functools.lru_cache(maxsize=1)
def measure_cpu_bandwidth(mib: int = 128, repeats: int = 3) -> float:
    """Copy bandwidth in bytes/s (read + write counted, as STREAM's copy does), best of a few copies; source plus
    destination (256 MiB) exceed ordinary last-level caches. It runs on torch's current threads, so a busy or
    thread-limited process measures less than the machine can do: pass --cpu-bandwidth for a server's figure."""
    import torch

    src = torch.ones(mib * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best


@functools.lru_cache(maxsize=1)
def measure_cpu_flops(n: int = 1024, repeats: int = 3) -> float:
    """float32 matmul throughput in FLOP/s (best of a few n x n products), the CPU compute figure for prefill."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def match_gpu_name(device_name: str, memory_bytes: int) -> GPU | None:
    """A torch.cuda device name ('NVIDIA H100 80GB HBM3', 'NVIDIA GeForce RTX 4090', 'AMD Instinct MI300X') -> the
    table entry, or None."""
    n = _norm(device_name)
    if "h100" in n:
        return GPUS["H100-PCIe" if "pcie" in n else "H100-SXM"]
    if "a100" in n:
        return GPUS["A100-80GB" if memory_bytes > 48 * GIB else "A100-40GB"]
    for key, name in (("h200", "H200"), ("b200", "B200"), ("l40s", "L40S"), ("3090", "RTX3090"),
                      ("4090", "RTX4090"), ("5090", "RTX5090"), ("mi300x", "MI300X")):
        if key in n:
            return GPUS[name]
    return None


def detect_gpus() -> tuple[GPU, int] | None:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    props = torch.cuda.get_device_properties(0)  # a node's GPUs are one model in every deployment we plan for
    gpu = match_gpu_name(props.name, props.total_memory)
    if gpu is None:
        # Unknown model: its memory is real, its speed unknown; the planner then leaves speed bounds empty.
        gpu = GPU(props.name, props.total_memory / GIB, None, None, None, "detected via torch.cuda (not in the table)")
    return gpu, torch.cuda.device_count()


@dataclass(frozen=True)
class CPU:
    memory_bytes: int
    bandwidth: float  # bytes/s
    flops: float  # FLOP/s
    sources: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Hardware:
    gpu: GPU | None
    gpu_count: int
    cpu: CPU
    gpu_source: str = "--gpus"


def resolve_hardware(gpus: str | None = None, cpu_mem: str | None = None, cpu_bandwidth: str | None = None,
                     cpu_tflops: float | None = None) -> Hardware:
    """Hardware from the command-line strings; anything not given is detected on this machine."""
    if gpus is None:
        found, source = detect_gpus(), "detected"
    else:
        found, source = parse_gpus(gpus), "--gpus"
    gpu, count = found if found else (None, 0)
    sources = {}
    if cpu_mem is None:
        mem, sources["memory"] = cpu_memory_bytes(), "detected (/proc/meminfo)"
    else:
        mem, sources["memory"] = parse_size(cpu_mem), "--cpu-mem"
    if cpu_bandwidth is None:
        import torch

        bw = measure_cpu_bandwidth()
        sources["bandwidth"] = f"measured (torch copy, {torch.get_num_threads()} threads; pass --cpu-bandwidth)"
    else:
        bw, sources["bandwidth"] = parse_bandwidth(cpu_bandwidth), "--cpu-bandwidth"
    if cpu_tflops is None:
        flops, sources["flops"] = measure_cpu_flops(), "measured (float32 matmul; pass --cpu-tflops)"
    else:
        if cpu_tflops <= 0:
            raise ValueError(f"--cpu-tflops {cpu_tflops} must be positive")
        flops, sources["flops"] = cpu_tflops * 1e12, "--cpu-tflops"
    return Hardware(gpu, count, CPU(mem, bw, flops, sources), source)
