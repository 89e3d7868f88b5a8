"""The device profiler: tegrastats lines, Jetson detection from a fake root, sizes, the budget."""

import json
import os
import time

import pytest

from edge_runtime.device.profiler import parse_size, parse_tegrastats, profile_device, read_jetson, usable_cpus
from edge_runtime.errors import ConfigError

ORIN = ("11-23-2026 10:15:42 RAM 2448/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
        "CPU [1%@1510,0%@1510,2%@1510,0%@1510,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 37%@[305] NVENC off NVDEC off "
        "VIC off OFA off APE 200 cpu@48.25C soc2@47.5C soc0@48.093C gpu@48.125C tj@48.25C soc1@47.281C "
        "VDD_IN 4046mW/4046mW VDD_CPU_GPU_CV 484mW/484mW VDD_SOC 1452mW/1452mW")
NANO = ("RAM 1733/3964MB (lfb 72x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
        "CPU [12%@1479,2%@1479,5%@1479,1%@1479] EMC_FREQ 3%@1600 GR3D_FREQ 0%@921 APE 25 PLL@31.5C CPU@33C "
        "PMIC@100C GPU@32.5C AO@40.5C thermal@32.75C POM_5V_IN 2454/2454 POM_5V_GPU 0/0 POM_5V_CPU 327/327")


def test_orin_line():
    s = parse_tegrastats(ORIN)
    assert (s["ram_used_mb"], s["ram_total_mb"], s["swap_used_mb"], s["swap_total_mb"]) == (2448, 7620, 0, 3810)
    assert s["cpu"][:2] == [{"load": 1, "mhz": 1510}, {"load": 0, "mhz": 1510}] and s["cpu"][4:] == [None, None]
    assert (s["gpu_load"], s["gpu_mhz"], s["emc_load"]) == (37, 305, 0)
    assert s["temperatures"]["gpu"] == 48.125 and s["temperatures"]["tj"] == 48.25 and len(s["temperatures"]) == 6
    assert s["power_mw"] == {"VDD_IN": (4046, 4046), "VDD_CPU_GPU_CV": (484, 484), "VDD_SOC": (1452, 1452)}


def test_nano_line():
    s = parse_tegrastats(NANO)
    assert (s["ram_used_mb"], s["ram_total_mb"]) == (1733, 3964)
    assert [c["mhz"] for c in s["cpu"]] == [1479] * 4 and [c["load"] for c in s["cpu"]] == [12, 2, 5, 1]
    assert (s["gpu_load"], s["gpu_mhz"], s["emc_load"]) == (0, 921, 3)
    assert s["temperatures"] == {"PLL": 31.5, "CPU": 33.0, "PMIC": 100.0, "GPU": 32.5, "AO": 40.5, "thermal": 32.75}
    assert s["power_mw"]["POM_5V_IN"] == (2454, 2454) and s["power_mw"]["POM_5V_GPU"] == (0, 0)


def test_a_line_without_ram_is_refused_and_partial_lines_parse():
    with pytest.raises(ConfigError, match="not a tegrastats line"):
        parse_tegrastats("hello world")
    assert parse_tegrastats("RAM 10/20MB") == {"ram_used_mb": 10, "ram_total_mb": 20}


def test_jetson_detection_from_a_board_root(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 17:34:21 UTC 2024\n")
    assert read_jetson(tmp_path) == ("NVIDIA Jetson Orin Nano Developer Kit", "R36 (release), REVISION: 3.0")
    p = profile_device(probe_compute=False, root=tmp_path)
    assert p.is_jetson and p.jetson_model.startswith("NVIDIA Jetson")


def test_not_a_jetson(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert read_jetson(tmp_path) == (None, None)


def test_sizes():
    assert parse_size("2GiB") == 2 * 1024**3 and parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("512MiB") == 512 * 1024**2 and parse_size(4096) == 4096 and parse_size("4096") == 4096
    for bad in ("2 GiBs", "-1GB", "lots", "0"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_budget_makes_the_device_act_smaller_and_the_probe_measures(tmp_path):
    p = profile_device(memory_budget="2GiB", root=tmp_path)
    assert p.training_memory == 2 * 1024**3 and p.memory_total > 0 and p.cpu_count >= 1
    assert p.gflops_fp32 is not None and p.gflops_fp32 > 0.1
    assert p.cuda is None or p.cuda.total_memory > 0
    d = json.loads(json.dumps(p.to_json()))
    assert d["training_memory"] == 2 * 1024**3 and d["memory_budget"] == 2 * 1024**3
    assert "--memory-budget" in p.summary()
    huge = profile_device(memory_budget="64TiB", probe_compute=False, root=tmp_path)
    assert any("larger than this device" in n for n in huge.notes)


def test_peak_rss_sees_what_a_block_allocated_and_released():
    import numpy as np

    from edge_runtime.device.profiler import PeakRss

    with PeakRss(interval_s=0.001) as rss:
        buf = np.ones(200 * 2**20 // 8)     # 200 MiB, touched
        time.sleep(0.05)
        del buf
    assert rss.increment >= 150 * 2**20, rss.increment / 2**20
    with PeakRss(interval_s=0.001) as idle:
        time.sleep(0.02)
    assert idle.increment < 50 * 2**20 and idle.start > 0


def test_release_freed_memory_returns_what_the_heap_kept():
    import psutil
    import torch

    from edge_runtime.device.profiler import _malloc_trim, release_freed_memory

    if _malloc_trim() is None:
        pytest.skip("no malloc_trim in this C library (not glibc)")
    proc = psutil.Process()
    release_freed_memory()
    before = proc.memory_info().rss
    # 12,800 tensors of 64 kB (under glibc's smallest mmap threshold, 128 kB: always from the heap),
    # then one more that stays: freed memory below a live block is not the heap's top, so glibc
    # keeps its pages (whatever its dynamic thresholds became earlier in this process)
    held = [torch.ones(16, 1000) for _ in range(12_800)]
    pin = torch.ones(16, 1000)
    del held
    kept = proc.memory_info().rss - before
    assert kept > 400 * 2**20, kept / 2**20   # the premise: the heap kept most of the 800 MB
    assert release_freed_memory() is True
    after = proc.memory_info().rss - before
    assert after < kept / 4 and after < 100 * 2**20, (kept / 2**20, after / 2**20)
    assert float(pin.sum()) == 16_000.0


def test_bound_kernel_caches_sets_the_cap_once_and_respects_the_user(monkeypatch):
    from edge_runtime.device.profiler import ONEDNN_CACHE_ENV, bound_kernel_caches

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    assert bound_kernel_caches(16) is True
    assert os.environ[ONEDNN_CACHE_ENV] == "16"
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "512")   # the user's own setting wins
    assert bound_kernel_caches(16) is False
    assert os.environ[ONEDNN_CACHE_ENV] == "512"


_SHAPES = """
import sys, psutil, torch
from edge_runtime.device.profiler import bound_kernel_caches, release_freed_memory
if sys.argv[1] == "bounded":
    bound_kernel_caches()
torch.set_num_threads(1)
lin = torch.nn.Linear(384, 1536)
def step(t):
    x = torch.randn(16, t, 384, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x).float().sum().backward()
step(64)
release_freed_memory()
start = psutil.Process().memory_info().rss
for t in range(1, 65):   # a new sequence length each step, as length-grouped batches bring
    step(t)
release_freed_memory()
print((psutil.Process().memory_info().rss - start) / 2**20)
"""


def test_bounded_kernel_cache_keeps_less_after_bf16_steps_of_many_shapes():
    import subprocess
    import sys

    import torch

    from edge_runtime.device.profiler import ONEDNN_CACHE_ENV, _malloc_trim

    if _malloc_trim() is None or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("needs glibc and a CPU whose bf16 runs through oneDNN")
    env = {k: v for k, v in os.environ.items() if k != ONEDNN_CACHE_ENV}
    kept = {arm: float(subprocess.run([sys.executable, "-c", _SHAPES, arm], env=env, capture_output=True,
                                      text=True, check=True, timeout=120).stdout.split()[-1])
            for arm in ("default", "bounded")}
    # oneDNN's default cache keeps a kernel and its buffers per shape (~110 MiB here); 16 keep ~55
    assert kept["default"] - kept["bounded"] > 25, kept


def _cgroup_root(tmp_path, proc_cgroup: str, files: dict[str, str]):
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "cgroup").write_text(proc_cgroup)
    for rel, text in files.items():
        (tmp_path / "sys/fs/cgroup" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys/fs/cgroup" / rel).write_text(text)
    return tmp_path


def test_usable_cpus_follow_a_systemd_quota_on_the_services_cgroup_and_its_parents(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    root = _cgroup_root(tmp_path, "0::/system.slice/edge-runtime.service\n",
                        {"cpu.max": "max 100000\n",
                         "system.slice/cpu.max": "max 100000\n",
                         "system.slice/edge-runtime.service/cpu.max": "150000 100000\n"})   # CPUQuota=150%
    assert usable_cpus(root) == 2                       # 1.5 CPUs of time: 2 threads, not 6
    (root / "sys/fs/cgroup/system.slice/cpu.max").write_text("100000 100000\n")   # a tighter parent wins
    assert usable_cpus(root) == 1
    p = profile_device(probe_compute=False, root=root)
    assert p.cpu_usable == 1 and "1 usable here" in p.summary()


def test_usable_cpus_follow_the_affinity_without_a_quota_and_a_v1_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert usable_cpus(_cgroup_root(tmp_path / "none", "0::/\n", {"cpu.max": "max 100000\n"})) == 3
    assert usable_cpus(tmp_path / "nothing") == 3       # no /proc or cgroup files: the affinity alone
    v1 = _cgroup_root(tmp_path / "v1", "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
                      {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
                       "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})   # docker --cpus=2
    assert usable_cpus(v1) == 2
    unlimited = _cgroup_root(tmp_path / "v1u", "4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                                                                    "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert usable_cpus(unlimited) == 3
    broken = _cgroup_root(tmp_path / "bad", "0::/x\n", {"x/cpu.max": "lots\n"})   # unreadable: ignored
    assert usable_cpus(broken) == 3
