"""Resumable sweeps: a stable key per run configuration, the done record of a key, and a lock per key.

A sweep killed halfway (a Slurm time limit, a lost node) is resumed by running the same command again:
every job whose configuration already has a `done` record is skipped, failed and missing ones run.
`run_once` is the whole protocol; run.py calls it around `pipeline.run_job`.

The key is a hash of the resolved configuration minus what does not change what a run computes: where
it writes (results_dir), how it is launched (launcher, hydra), how it is mirrored (logger), where the
data files sit (data_root: the same data wherever it lives; each record names the files it read), and
the `resume` switch itself. Code changes do not change the key: after a fix that changes results, rerun
with resume=false (or into a new results_dir).

Locks: <results_dir>/locks/<key>.lock, created with O_CREAT|O_EXCL (atomic, also on NFS v3+), holding
the owner's host, pid and a random token. While the job runs, a heartbeat thread touches the file every
HEARTBEAT_S seconds. A lock is stale, and is broken by the next job that wants the key, when its owner
is on this host and its pid is gone, or when its heartbeat is older than STALE_AFTER_S (owners on other
hosts, e.g. a Slurm job killed with SIGKILL). A job that finds a live lock does not run the key.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from .config import enum_value

log = logging.getLogger("baseq")

# Top-level config keys that do not take part in the run key (see the module docstring).
NOT_IN_KEY = ("results_dir", "launcher", "logger", "hydra", "data_root", "resume")
# Bump when the key's definition changes (old records then no longer match, and are rerun).
KEY_VERSION = 1

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def key_fields(cfg: DictConfig | dict) -> dict:
    """The resolved configuration that the key hashes."""
    container = (OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if isinstance(cfg, DictConfig)
                 else dict(cfg))
    fields = {k: v for k, v in container.items() if k not in NOT_IN_KEY}
    if "device" in fields:   # "auto" and the device it resolved to are the same run
        from .config import resolve_device
        fields["device"] = resolve_device(enum_value(fields["device"])).type
    return fields


def run_key(cfg: DictConfig | dict) -> str:
    """A stable 16-hex-digit key of the run's configuration: same computation, same key."""
    canonical = json.dumps({"key_version": KEY_VERSION, **key_fields(cfg)}, sort_keys=True, separators=(",", ":"),
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def find_done_record(results_dir: str | Path, key: str) -> dict | None:
    """The newest `done` record of `key` under <results_dir>/runs (with its "record_path"), or None."""
    runs = Path(results_dir) / "runs"
    found = []
    for path in runs.glob("*.json") if runs.is_dir() else ():
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):   # a record being replaced, or not a record
            continue
        if record.get("run_key") == key and record.get("status") == "done":
            found.append({**record, "record_path": str(path)})
    return max(found, key=lambda r: r.get("finished_at") or "", default=None)


class RunLock:
    """An exclusive claim on one run key, held from `acquire` to `release` (see the module docstring)."""

    def __init__(self, results_dir: str | Path, key: str, description: str = ""):
        self.path = Path(results_dir) / "locks" / f"{key}.lock"
        self.key = key
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8),
                      "description": description, "since": datetime.now(timezone.utc).isoformat()}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def holder(self) -> dict | None:
        """The current lock file's owner, or None when there is no (readable) lock."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_stale(self, holder: dict | None) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False   # gone meanwhile: simply try again
        if holder is None:
            # unreadable: a writer between create and write, or a truncated file; wait for the heartbeat window
            return age > STALE_AFTER_S
        if holder.get("host") == self.owner["host"] and not _pid_alive(int(holder.get("pid", -1))):
            return True
        return age > STALE_AFTER_S

    def acquire(self) -> bool:
        """True when this process now holds the key; False when a live job holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if not self.is_stale(holder):
                    return False
                self._break(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            self._heartbeat = threading.Thread(target=self._beat, name=f"lock-heartbeat-{self.key}", daemon=True)
            self._heartbeat.start()
            return True
        return False

    def _break(self, stale_holder: dict | None) -> None:
        # Move the stale file aside under a unique name (atomic), then check that what was moved is the lock
        # judged stale: another job may have broken it and taken the key in between, and its fresh lock
        # must be put back rather than deleted.
        aside = self.path.with_name(f"{self.path.name}.stale-{self.owner['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, json.JSONDecodeError):
            moved = None
        if stale_holder is not None and moved is not None and moved.get("token") != stale_holder.get("token"):
            try:
                os.link(aside, self.path)   # put it back unless yet another lock appeared (then that one wins)
            except FileExistsError:
                pass
        else:
            log.warning("broke stale run lock %s (held by %s)", self.path, stale_holder)
        aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        holder = self.holder()
        if holder is not None and holder.get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM   # exists, owned by someone else
    return True


@dataclass
class RunOutcome:
    status: str                  # "ran" | "already_done" | "in_progress"
    record: dict | None = None   # the new record, the earlier done one, or None (in progress elsewhere)
    holder: dict | None = None   # for in_progress: who holds the key


def run_once(results_dir: str | Path, key: str, job: Callable[[], dict], resume: bool = True,
             description: str = "") -> RunOutcome:
    """Run `job` (which writes and returns the record) unless the key is done (resume=True) or running.

    The done check happens under the lock: a job that finished between another's check and its claim is
    then seen, so a key never runs twice concurrently and, with resume, never twice in sequence."""
    lock = RunLock(results_dir, key, description)
    if not lock.acquire():
        return RunOutcome("in_progress", holder=lock.holder())
    with lock:
        if resume:
            done = find_done_record(results_dir, key)
            if done is not None:
                return RunOutcome("already_done", record=done)
        return RunOutcome("ran", record=job())


def describe(cfg: Any) -> str:
    """A one-line human description of a run (for lock files and skip messages)."""
    return f"{cfg.model.name} {cfg.method.name} {cfg.quant.name} seed={cfg.seed}"
