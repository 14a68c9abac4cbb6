"""Shared bench helpers: environment description, git commit, JSON result writing."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """Short commit hash of the checkout, or 'unknown' outside git. FLASHLIVE_COMMIT, when set, wins: a copy of the
    tree on another machine (bench/gpu_run.sh on a lent GPU) may carry a stale .git."""
    import os

    if os.environ.get("FLASHLIVE_COMMIT"):
        return os.environ["FLASHLIVE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info() -> dict:
    """Device name, torch version, CPU count and git commit for a result file."""
    import os

    info = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "git_commit": git_commit()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    except ImportError:
        info["torch"] = None
        info["device"] = f"cpu x{os.cpu_count()}"
    return info


def write_result(name: str, payload: dict) -> Path:
    """Write payload (with env_info merged under 'env') to bench/results/<name>.json; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**payload, "env": env_info()}, indent=2) + "\n")
    return path


def gpu_tag(device_name: str | None) -> str:
    """'h200' for 'NVIDIA H200', 'rtx4090' for 'NVIDIA GeForce RTX 4090', 'cpu' without a GPU."""
    import re

    if not device_name or device_name.startswith("cpu"):
        return "cpu"
    m = re.search(r"\b([A-Z]+\d+)", device_name.replace("GeForce ", "").replace("RTX ", "RTX"))
    return m.group(1).lower() if m else "gpu"
