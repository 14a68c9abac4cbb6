"""GPU telemetry for /stats and the page: utilisation, memory, power and temperature through pynvml (NVML).

    gpu = GpuTelemetry(period_s=2.0).start()   # samples on its own thread, never on the event loop
    gpu.stats()   # -> {"available": True, "gpus": [{"index", "name", "util_pct", "mem_used_mib", ...}], ...}
                  #    or {"available": False, "status": "no GPU: <why>", ...}
    gpu.close()

NVML calls can take milliseconds (and much longer on a busy driver), so a daemon thread samples at a low rate
and `stats()` only returns the cached sample: the event loop never waits for the driver. No GPU, no driver or no
pynvml is not an error: the stats say "no GPU" and why, and the server keeps serving.
"""
from __future__ import annotations

import threading
import time


class GpuTelemetry:
    """Cached NVML samples of every visible GPU (see the module docstring).

    period_s: seconds between samples (low rate: telemetry is for people and the controller, not for profiling).
    nvml: the NVML module (default: `import pynvml`, the nvidia-ml-py package); tests may pass another one.
    """

    def __init__(self, period_s: float = 2.0, nvml=None):
        self.period_s = period_s
        self._nvml = nvml
        self._handles: list = []
        self._names: list[str] = []
        self._sample: dict = {"available": False, "status": "starting: GPU telemetry not sampled yet", "gpus": []}
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.errors = 0

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> "GpuTelemetry":
        """Start the sampling thread: it initialises NVML (which can take a while), then samples every period_s;
        without a GPU it only records why and ends. `ready` is set once the first sample (or the reason) is in."""
        self._thread = threading.Thread(target=self._run, name="gpu-telemetry", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._handles and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # already shut down, or the driver went away: nothing left to free
                pass
            self._handles = []

    def _init(self) -> str | None:
        """None when NVML found at least one GPU, else the one-line reason for the "no GPU" status."""
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                return "no GPU: pynvml is not installed (pip install nvidia-ml-py)"
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except Exception as err:  # NVMLError_LibraryNotFound / DriverNotLoaded: a machine without an NVIDIA GPU
            return f"no GPU: NVML is not available ({_reason(err)})"
        try:
            count = nvml.nvmlDeviceGetCount()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._names = [_text(nvml.nvmlDeviceGetName(h)) for h in self._handles]
        except Exception as err:
            self._handles = []
            return f"no GPU: NVML could not list devices ({_reason(err)})"
        if not self._handles:
            nvml.nvmlShutdown()
            return "no GPU: NVML sees no device"
        return None

    def _run(self) -> None:
        status = self._init()
        if status is not None:
            self._set({"available": False, "status": status, "gpus": []})
            self.ready.set()
            return
        while True:
            self._sample_once()
            self.ready.set()
            if self._stop.wait(self.period_s):
                return

    # --- sampling -------------------------------------------------------------------------------------------------
    def _sample_once(self) -> None:
        nvml = self._nvml
        gpus = []
        for index, (handle, name) in enumerate(zip(self._handles, self._names)):
            gpu = {"index": index, "name": name}
            # Each reading on its own: some boards (or MIG slices) do not report power or temperature.
            gpu["util_pct"] = _read(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            memory = _read(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
            gpu["mem_used_mib"] = None if memory is None else round(memory.used / 2**20)
            gpu["mem_total_mib"] = None if memory is None else round(memory.total / 2**20)
            power = _read(lambda: nvml.nvmlDeviceGetPowerUsage(handle))  # milliwatts
            gpu["power_w"] = None if power is None else round(power / 1000, 1)
            limit = _read(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
            gpu["power_limit_w"] = None if limit is None else round(limit / 1000, 1)
            gpu["temp_c"] = _read(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            gpus.append(gpu)
        self.samples += 1
        self.errors += sum(v is None for g in gpus for v in g.values())
        self._set({"available": True, "status": f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}", "gpus": gpus,
                   "sampled_at": time.time()})

    def _set(self, sample: dict) -> None:
        with self._lock:
            self._sample = sample

    def stats(self) -> dict:
        """The latest sample (cheap: no NVML call). `age_s` says how old it is."""
        with self._lock:
            out = dict(self._sample)
        sampled = out.pop("sampled_at", None)
        out["age_s"] = None if sampled is None else round(time.time() - sampled, 1)
        out["period_s"] = self.period_s
        return out


def _read(fn):
    try:
        return fn()
    except Exception:  # NVMLError_NotSupported and friends: this reading is unavailable, the others still count
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reason(err: Exception) -> str:
    text = str(err).strip()
    return text or type(err).__name__
