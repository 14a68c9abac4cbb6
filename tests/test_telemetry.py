"""GPU telemetry: a clear "no GPU" status without one; with NVML, cached samples that never block the caller."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from streaming.telemetry import GpuTelemetry


class NotSupported(Exception):
    pass


class FakeNvml:
    """An NVML with one GPU whose readings change per call; power is unsupported; each utilisation read is slow
    (a busy driver), so a caller that waited for NVML would notice."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, read_delay_s: float = 0.0):
        self.read_delay_s = read_delay_s
        self.util_calls = 0
        self.shutdown = False
        self.threads: set[str] = set()

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetName(self, handle):
        return b"Test GPU 80GB"

    def nvmlDeviceGetUtilizationRates(self, handle):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.read_delay_s)
        self.util_calls += 1
        return SimpleNamespace(gpu=10 * self.util_calls, memory=5)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle):
        raise NotSupported("power readings are not supported on this board")

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 41


class BrokenNvml(FakeNvml):
    def nvmlInit(self):
        raise OSError("NVML Shared Library Not Found")


def test_no_gpu_is_a_status_not_an_error():
    gpu = GpuTelemetry(period_s=0.1).start()  # this machine: pynvml is installed, no NVIDIA driver/GPU
    try:
        assert gpu.ready.wait(10)
        stats = gpu.stats()
    finally:
        gpu.close()
    assert stats["available"] is False
    assert stats["status"].startswith("no GPU"), stats
    assert stats["gpus"] == []

    broken = GpuTelemetry(nvml=BrokenNvml()).start()
    assert broken.ready.wait(10)
    stats = broken.stats()
    broken.close()
    assert stats["available"] is False and "NVML Shared Library Not Found" in stats["status"], stats


def test_samples_on_its_own_thread_and_stats_never_wait_for_nvml():
    nvml = FakeNvml(read_delay_s=0.3)
    gpu = GpuTelemetry(period_s=0.05, nvml=nvml).start()
    try:
        assert gpu.ready.wait(10)
        first = gpu.stats()
        assert first["available"] is True and first["status"] == "1 GPU"
        (g,) = first["gpus"]
        assert g["name"] == "Test GPU 80GB"
        assert (g["mem_used_mib"], g["mem_total_mib"]) == (3072, 81920)
        assert g["power_w"] is None and g["power_limit_w"] == 700.0 and g["temp_c"] == 41  # unsupported -> None
        t0 = time.perf_counter()
        for _ in range(100):
            gpu.stats()
        per_call = (time.perf_counter() - t0) / 100
        assert per_call < 0.01, f"stats() took {per_call * 1e3:.1f} ms: it waited for NVML"
        deadline = time.monotonic() + 5
        while gpu.stats()["gpus"][0]["util_pct"] <= g["util_pct"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gpu.stats()["gpus"][0]["util_pct"] > g["util_pct"], "the cached sample was never refreshed"
        assert "gpu-telemetry" in nvml.threads, nvml.threads
    finally:
        gpu.close()
    assert nvml.shutdown
    calls = nvml.util_calls
    time.sleep(0.4)
    assert nvml.util_calls == calls, "sampling continued after close()"
