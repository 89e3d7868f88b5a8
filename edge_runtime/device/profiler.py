"""Device profiling: the only module that probes the OS and the GPU.

:func:`profile_device` measures what a training plan has to fit: memory (total / available, or a
``--memory-budget`` that makes the device act as a smaller one), CPUs and their frequency, free
disk, a CUDA device if torch sees one (total / free memory, capability, integrated or not),
Jetson boards (``/etc/nv_tegra_release``, ``/proc/device-tree/model``) and a short compute probe
(matmul GFLOP/s in fp32, and fp16 where the device has fast fp16). :func:`parse_tegrastats` reads
one line of Jetson's ``tegrastats`` (pure; tested on sample lines). :class:`PeakRss` samples the
process's resident memory on a thread while a block runs (a round's training peak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import platform
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from edge_runtime.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | int | float) -> int:
    """``"2GiB"``, ``"1.5 GB"``, ``"512MiB"``, ``4096`` -> bytes (decimal and binary units)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"not a size: {text!r} (examples: 2GiB, 1.5GB, 512MiB, 4096)")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"a size must be > 0, got {text!r}")
    return size


def format_size(n: int | float) -> str:
    for unit, div in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class CudaInfo:
    name: str
    total_memory: int
    free_memory: int
    capability: tuple[int, int]
    integrated: bool              # shares system RAM (Jetson): its memory is the device's memory

    @property
    def fast_fp16(self) -> bool:
        return self.capability >= (5, 3)


@dataclass(frozen=True)
class DeviceProfile:
    memory_total: int
    memory_available: int
    cpu_count: int                         # the machine's CPUs
    cpu_freq_mhz: float | None
    disk_free: int | None
    machine: str
    system: str
    python: str
    torch: str | None = None
    cuda: CudaInfo | None = None
    jetson_model: str | None = None        # e.g. "NVIDIA Jetson Orin Nano Developer Kit"
    l4t_release: str | None = None         # e.g. "R36 (release), REVISION: 3.0"
    gflops_fp32: float | None = None
    gflops_fp16: float | None = None
    memory_budget: int | None = None       # --memory-budget: act as a device with this much memory
    cpu_usable: int | None = None          # the CPUs this process may use (affinity, cgroup quota): its threads
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def training_memory(self) -> int:
        """Bytes a training plan may use: the budget if one was set, else what is available now
        (a discrete GPU's free memory when training runs there)."""
        if self.memory_budget is not None:
            return self.memory_budget
        if self.cuda is not None and not self.cuda.integrated:
            return self.cuda.free_memory
        return self.memory_available

    @property
    def is_jetson(self) -> bool:
        return self.jetson_model is not None or self.l4t_release is not None

    def to_json(self) -> dict:
        d = asdict(self)
        d["training_memory"] = self.training_memory
        return d

    def summary(self) -> str:
        lines = [f"machine      {self.system} {self.machine}, Python {self.python}, torch {self.torch or '-'}",
                 f"CPU          {self.cpu_count} cores" + (f" @ {self.cpu_freq_mhz:.0f} MHz" if self.cpu_freq_mhz else "")
                 + (f", {self.cpu_usable} usable here (affinity / cgroup quota)"
                    if self.cpu_usable is not None and self.cpu_usable < self.cpu_count else ""),
                 f"memory       {format_size(self.memory_total)} total, {format_size(self.memory_available)} available"]
        if self.memory_budget is not None:
            lines.append(f"budget       {format_size(self.memory_budget)} (--memory-budget: acting as a smaller device)")
        if self.disk_free is not None:
            lines.append(f"disk         {format_size(self.disk_free)} free")
        if self.cuda is not None:
            c = self.cuda
            lines.append(f"CUDA         {c.name}, {format_size(c.total_memory)} total, {format_size(c.free_memory)} free, "
                         f"sm_{c.capability[0]}{c.capability[1]}{', integrated (shares RAM)' if c.integrated else ''}")
        else:
            lines.append("CUDA         none")
        if self.is_jetson:
            lines.append(f"Jetson       {self.jetson_model or '?'} ({self.l4t_release or 'L4T release unknown'})")
        if self.gflops_fp32 is not None:
            fp16 = f", fp16 {self.gflops_fp16:.1f}" if self.gflops_fp16 is not None else ""
            lines.append(f"compute      fp32 {self.gflops_fp32:.1f} GFLOP/s{fp16} (matmul probe)")
        lines.append(f"for training {format_size(self.training_memory)}")
        lines.extend(f"note         {n}" for n in self.notes)
        return "\n".join(lines)


# -- Jetson ----------------------------------------------------------------------------------
def read_jetson(root: Path = Path("/")) -> tuple[str | None, str | None]:
    """(board model, L4T release) from the device tree and ``/etc/nv_tegra_release``; Nones elsewhere."""
    model = release = None
    try:
        raw = (root / "proc/device-tree/model").read_bytes().rstrip(b"\x00").decode("utf-8", "replace").strip()
        model = raw if "jetson" in raw.lower() or "tegra" in raw.lower() else None
    except OSError:
        pass
    try:
        first = (root / "etc/nv_tegra_release").read_text(encoding="utf-8", errors="replace").splitlines()[0]
        m = re.search(r"#\s*(R\d+\s*\([^)]*\)),\s*REVISION:\s*([\d.]+)", first)
        release = f"{m.group(1)}, REVISION: {m.group(2)}" if m else first.strip("# ").strip() or None
    except (OSError, IndexError):
        pass
    return model, release


_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+)\]?)?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_POWER = re.compile(r"\b((?:VDD|POM)_[A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?")


def parse_tegrastats(line: str) -> dict:
    """One ``tegrastats`` line -> ``{"ram_used_mb", "ram_total_mb", "swap_used_mb", "swap_total_mb",
    "cpu": [{"load": %, "mhz": f} or None (off)], "gpu_load", "gpu_mhz", "emc_load",
    "temperatures": {name: C}, "power_mw": {rail: (now, avg)}}``; fields absent from the line are
    absent from the result. Raises ConfigError when the line has no RAM field (not tegrastats)."""
    out: dict = {}
    m = _RAM.search(line)
    if not m:
        raise ConfigError(f"not a tegrastats line (no 'RAM used/totalMB'): {line[:80]!r}")
    out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(line):
        out["swap_used_mb"], out["swap_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _CPU.search(line):
        cores = []
        for item in m.group(1).split(","):
            item = item.strip()
            c = re.fullmatch(r"(\d+)%@(\d+)", item)
            cores.append({"load": int(c.group(1)), "mhz": int(c.group(2))} if c else None)  # "off"
        out["cpu"] = cores
    if m := _GR3D.search(line):
        out["gpu_load"] = int(m.group(1))
        if m.group(2):
            out["gpu_mhz"] = int(m.group(2))
    if m := _EMC.search(line):
        out["emc_load"] = int(m.group(1))
    temps = {name: float(v) for name, v in _TEMP.findall(line) if not name.startswith(("VDD", "POM"))}
    if temps:
        out["temperatures"] = temps
    power = {name: (int(now), int(avg)) for name, now, avg in _POWER.findall(line)}
    if power:
        out["power_mw"] = power
    return out


# -- probes ----------------------------------------------------------------------------------
def _cuda_info() -> CudaInfo | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    return CudaInfo(props.name, int(total), int(free), (props.major, props.minor), bool(props.is_integrated))


def _matmul_gflops(device: str, dtype_name: str, seconds: float) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    n = 512 if device == "cpu" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up (kernel selection, caches)
    if device != "cpu":
        torch.cuda.synchronize()
    reps, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        reps += 1
        if device != "cpu":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * reps / elapsed / 1e9


def compute_probe(cuda: CudaInfo | None, seconds: float = 0.6) -> tuple[float, float | None]:
    """(fp32, fp16) matmul GFLOP/s on the training device; fp16 only where it is fast (CUDA sm_53+)."""
    if cuda is None:
        return _matmul_gflops("cpu", "float32", seconds), None
    fp32 = _matmul_gflops("cuda", "float32", seconds)
    return fp32, (_matmul_gflops("cuda", "float16", seconds) if cuda.fast_fp16 else None)


def usable_cpus(root: Path = Path("/")) -> int:
    """The CPUs this process can keep busy: its CPU affinity (``taskset``, a container's ``--cpuset-cpus``),
    capped by its cgroup's CPU quota (a systemd ``CPUQuota=``, a container's ``--cpus``), rounded up.
    ``os.cpu_count()`` counts the machine's, and torch's default threads follow the machine: a service
    held to 2 CPUs of a 6-core board then runs 6 threads that take turns on 2 CPUs' time."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # no affinity here (macOS, Windows)
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(root)
    return max(1, min(n, math.ceil(quota)) if quota is not None else n)


def _cgroup_cpu_quota(root: Path) -> float | None:
    """The process's CPU quota in CPUs, the smallest along its cgroup's path (cgroup v2 ``cpu.max``;
    v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None without one (``max``, -1) or where it
    cannot be read."""
    try:
        lines = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, path = parts[1].split(","), parts[2].strip().lstrip("/")
        if parts[0] == "0" and parts[1] == "":   # v2: the unified hierarchy
            base, files = root / "sys" / "fs" / "cgroup", ("cpu.max",)
        elif "cpu" in controllers:                # v1: the cpu controller's hierarchy
            base = next((d for d in (root / "sys/fs/cgroup" / parts[1], root / "sys/fs/cgroup/cpu") if d.is_dir()), None)
            if base is None:
                continue
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        folder = base / path
        while True:   # the cgroup and each parent up to the hierarchy's root
            q = _read_quota(folder, files)
            if q is not None:
                found.append(q)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(found) if found else None


def _read_quota(folder: Path, files: tuple[str, ...]) -> float | None:
    try:
        if len(files) == 1:
            quota, period = (folder / files[0]).read_text().split()[:2]
            return None if quota == "max" else _quota(quota, period)
        return _quota((folder / files[0]).read_text(), (folder / files[1]).read_text())
    except (OSError, ValueError):
        return None


def _quota(quota: str, period: str) -> float | None:
    q, p = int(quota.strip()), int(period.strip())
    return q / p if q > 0 and p > 0 else None


def profile_device(memory_budget: int | str | None = None, probe_compute: bool = True,
                   disk_path: str | Path = ".", root: Path = Path("/")) -> DeviceProfile:
    """Measure this device (the compute probe takes ~1-2 s; ``probe_compute=False`` skips it)."""
    vm = psutil.virtual_memory()
    try:
        freq = psutil.cpu_freq()
        mhz = float(freq.max or freq.current) if freq else None
    except (OSError, NotImplementedError, AttributeError):
        mhz = None
    try:
        disk = shutil.disk_usage(disk_path).free
    except OSError:
        disk = None
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    cuda = _cuda_info()
    model, release = read_jetson(root)
    notes = []
    budget = parse_size(memory_budget) if memory_budget is not None else None
    if budget is not None and budget > vm.total:
        notes.append(f"the memory budget {format_size(budget)} is larger than this device's memory "
                     f"({format_size(vm.total)}): plans may not fit in reality")
    fp32 = fp16 = None
    if probe_compute:
        fp32, fp16 = compute_probe(cuda)
    return DeviceProfile(memory_total=int(vm.total), memory_available=int(vm.available), cpu_count=os.cpu_count() or 1,
                         cpu_freq_mhz=mhz, disk_free=disk, machine=platform.machine(), system=platform.system(),
                         python=platform.python_version(), torch=torch_version, cuda=cuda, jetson_model=model,
                         l4t_release=release, gflops_fp32=fp32, gflops_fp16=fp16, memory_budget=budget,
                         cpu_usable=usable_cpus(root), notes=tuple(notes))


def basic_profile() -> dict:
    """What a device tells the server in its hello: memory (bytes), CPU count, platform (no probes)."""
    vm = psutil.virtual_memory()
    return {
        "memory_total": int(vm.total),
        "memory_available": int(vm.available),
        "cpu_count": os.cpu_count() or 1,
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
    }


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None where the C library has none: musl, macOS, Windows)."""
    try:
        trim = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Hand the memory this process has freed back to the system (glibc: ``malloc_trim(0)``, which
    returns the free pages inside the heap, not only its top). PyTorch frees a round's activations
    into glibc's heap, which keeps them: an idle agent would hold its last round's peak, and the
    next round's :class:`PeakRss` would start from it and see no increment. True if anything ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 16   # oneDNN's default is 1024 kernels, each with its buffers


def bound_kernel_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> bool:
    """Cap oneDNN's cache of compiled kernels at ``capacity`` (unless the environment already sets
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``); True if this call set it. oneDNN reads the variable when it
    builds its first kernel, so this must run before torch computes anything in bf16.

    bf16 autocast on a CPU runs linear layers through oneDNN, which keeps one kernel, with its
    buffers, per input shape; length-grouped batches bring a new shape nearly every step. With
    the default 1024 the cache held ~170 MiB after one round of MiniLM training on fortunes (the
    training increment 505 -> 357 MiB at 16, training ~5% slower; 0 costs ~15%): measured with
    ``scripts/bench_time_to_accuracy.py`` (README, "Time and memory to accuracy")."""
    if os.environ.get(ONEDNN_CACHE_ENV):
        return False
    os.environ[ONEDNN_CACHE_ENV] = str(int(capacity))
    return True


class PeakRss:
    """The process's resident memory while a ``with`` block runs, sampled every ``interval_s`` on a
    daemon thread: ``start`` (bytes on entry), ``peak`` (the largest sample, entry and exit included)
    and ``increment`` (``peak - start``: what the block added). ``ru_maxrss`` cannot stand in for it:
    it is the process's lifetime peak, set once by whatever ran first."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = self._proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def increment(self) -> int:
        return self.peak - self.start
