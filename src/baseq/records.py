"""One immutable JSON record per run: <results_dir>/runs/<run_id>.json, written once, atomically."""

from __future__ import annotations

import json
import os
import platform
import resource
import secrets
import subprocess
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "accelerate", "hydra-core", "omegaconf", "gguf", "lm_eval", "triton",
            "numpy", "baseq")


def new_run_id(model: str, method: str, quant: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    label = f"{model}_{method}_{quant}".replace("/", "-")  # ablation names hold a slash
    return f"{stamp}_{label}_{secrets.token_hex(3)}"


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """HEAD (with -dirty for uncommitted changes), or BASEQ_GIT_COMMIT where the tree is a copy without .git
    (the GPU machine: the script that copies the tree sets it)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode != 0:
            return os.environ.get("BASEQ_GIT_COMMIT")
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("BASEQ_GIT_COMMIT")


def host_peak_memory_gb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StageTimer:
    """Wall time per named stage, with the device's peak memory per stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.device_peak_gb: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                self.device_peak_gb[name] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "host": platform.node(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def write_record(results_dir: str | Path, record: dict) -> Path:
    """Write the record atomically (temp file + rename); refuses to overwrite an existing one."""
    runs = Path(results_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{record['run_id']}.json"
    if path.exists():
        raise FileExistsError(f"run record {path} already exists; records are immutable")
    fd, tmp = tempfile.mkstemp(dir=runs, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path

