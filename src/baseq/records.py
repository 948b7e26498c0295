"""One JSON record per run: <results_dir>/runs/<run_id>.json.

The record exists from the run's start: RunRecord writes it as `running`, rewrites it (atomically: temp
file + os.replace) when a stage starts and when it finishes, and a last time as `done`, `failed` (with
the stage that failed) or `preempted` (stopped by a signal). A crash or a kill therefore keeps every
metric finished so far. Once a record has a terminal status it is immutable: writing it again raises."""

from __future__ import annotations

import json
import os
import platform
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: run.py names its run (new_run_id) before the config is validated,
# and config errors are reported without loading torch

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


def git_commit() -> str:
    """The commit of the code: BASEQ_GIT_COMMIT where whoever copied the tree states it (a GPU machine's copy
    of the tree can carry a stale .git), else git's HEAD ("<sha>" or "<sha>-dirty"), else, in a copy without
    .git, "tree:<digest>" with the content digest of the code (baseq.version.code_digest)."""
    from .version import code_digest

    stated = os.environ.get("BASEQ_GIT_COMMIT")
    if stated:
        return stated
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"tree:{code_digest()}"


def host_peak_memory_gb() -> float:
    """Peak resident memory of this process in GiB. On Linux, /proc's VmHWM: ru_maxrss carries over the
    parent's resident size through fork + exec, so a run started by a large process (a test, a notebook)
    would report the parent's memory as its own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20   # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20   # bytes on macOS, KiB elsewhere


class StageTimer:
    """Wall time per named stage, with the device's peak memory per stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.device_peak_gb: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        import torch

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


def environment(device) -> dict:
    import torch

    env = {"python": platform.python_version(), "host": platform.node(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


TERMINAL_STATUSES = ("done", "failed", "preempted")


class RecordClosedError(RuntimeError):
    """A record with a terminal status (done/failed/preempted) was about to be written again."""


def record_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / "runs" / f"{run_id}.json"


def write_record(results_dir: str | Path, record: dict) -> Path:
    """Write the record atomically (temp file + rename). A record may be rewritten while it is `running`;
    one whose file already holds a terminal status is immutable and is not overwritten."""
    path = record_path(results_dir, record["run_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            status = json.loads(path.read_text()).get("status")
        except (OSError, json.JSONDecodeError):
            status = None
        if status in TERMINAL_STATUSES:
            raise RecordClosedError(f"run record {path} is {status}; records are immutable once finished")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class RunRecord:
    """The record of a run while it runs. `stage(name)` times a stage and writes the record when it starts
    (so a killed run says where it was) and when it ends (so its metrics are kept); `method(...)` is the
    view through which one method (the run's own, or a comparison) reports its metrics; `finish` writes
    the terminal status, once."""

    def __init__(self, results_dir: str | Path, fields: dict, timer: StageTimer):
        self.results_dir = results_dir
        self.timer = timer
        self.data = {**fields, "status": "running", "stage": None, "stages_done": [],
                     "metrics": fields.get("metrics", {}), "timings_s": timer.seconds,
                     "peak_memory_gb": {"device": timer.device_peak_gb, "host": None}}
        self.closed = False
        if self.path.exists():
            raise FileExistsError(f"run record {self.path} already exists")
        self.write()

    @property
    def path(self) -> Path:
        return record_path(self.results_dir, self.data["run_id"])

    def write(self) -> Path:
        if self.closed:
            raise RecordClosedError(f"run record {self.path} is {self.data['status']}; records are immutable "
                                    f"once finished")
        self.data["peak_memory_gb"]["host"] = host_peak_memory_gb()
        self.data["record_path"] = str(self.path)
        return write_record(self.results_dir, self.data)

    @contextmanager
    def stage(self, name: str):
        self.data["stage"] = name
        self.write()
        with self.timer.stage(name):
            yield
        self.data["stages_done"].append(name)
        self.data["stage"] = None
        self.write()

    def finished(self, name: str) -> bool:
        return name in self.data["stages_done"]

    def method(self, compare_name: str | None = None) -> "MethodRecord":
        """The part of the record of the run's own method (None) or of comparison `compare_name`."""
        if compare_name is None:
            return MethodRecord(self, self.data["metrics"], "")
        compare = self.data["metrics"].setdefault("compare", {})
        return MethodRecord(self, compare.setdefault(compare_name, {}), f"compare_{compare_name}_")

    def finish(self, status: str, error: dict | None = None) -> Path:
        """Write the terminal status (done/failed/preempted); the record is immutable afterwards."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"unknown terminal status {status!r}; one of {TERMINAL_STATUSES}")
        self.data.update(status=status, stage=None, finished_at=datetime.now(timezone.utc).isoformat())
        if error is not None:
            self.data["error"] = error
        path = self.write()
        self.closed = True
        return path


@dataclass
class MethodRecord:
    """One method's part of a run record: its stages are named with `prefix` (compare_<name>_ for a
    comparison), its metrics go into `metrics` and are on disk once the stage that measured them ends."""

    run: RunRecord
    metrics: dict
    prefix: str

    def stage(self, name: str):
        return self.run.stage(self.prefix + name)

    def finished(self, name: str) -> bool:
        return self.run.finished(self.prefix + name)

    def update(self, **metrics) -> None:
        self.metrics.update(metrics)
