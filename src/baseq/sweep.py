"""Resumable sweeps: a stable key per run, the done record of a key, a lock per key, and the summary of a
sweep's failed jobs.

A sweep killed halfway (a Slurm time limit, a lost node) is resumed by running the same command again:
every job whose key already has a `done` record is skipped, failed and missing ones run, and a job whose
key has a `preempted` record (or a `running` one whose process is gone) resumes from it (see
pipeline.run_job). `run_once` is the whole protocol; run.py calls it around `pipeline.run_job`.

The key (KEY_VERSION 2) hashes three parts, each stored in the record under `run_key_parts`:
  config: the resolved configuration minus what does not change what a run computes: where it writes
          (results_dir), how it is launched (launcher, hydra), how it is mirrored (logger), where the data
          files sit (data_root: the data part covers their content) and the `resume` switch itself;
  data:   a content digest of every data file the run reads (WikiText-2 test and train, the zero-shot
          task files), or the hub dataset's id when it reads from the hub (baseq.version.file_digest);
  code:   a content digest of the code (baseq.version.code_digest), which works without .git.
So a run calibrated on other data, or made before a code change, is not skipped as done: it is run again,
and run.py says why in one line.

Locks: <results_dir>/locks/<key>.lock, created with O_CREAT|O_EXCL (atomic, also on NFS v3+), holding
the owner's host, pid and a random token. While the job runs, a heartbeat thread touches the file every
HEARTBEAT_S seconds. A lock is stale, and is broken by the next job that wants the key, when its owner
is on this host and its pid is gone, or when its heartbeat is older than STALE_AFTER_S (owners on other
hosts, e.g. a Slurm job killed with SIGKILL). A job that finds a live lock does not run the key.

Failed jobs of a multirun: run.py does not let one job's error stop the sweep. It notes each failed job
in <hydra.sweep.dir>/failed_jobs/<job num>.json (a file per job: the jobs may run in other processes or
on other hosts), and the Hydra callback FailedJobsReport (conf/config.yaml, hydra.callbacks) lists them
at the end of the sweep, one line each, and exits non-zero.
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

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import enum_value
from .version import code_digest, file_digest

log = logging.getLogger("baseq")

# Top-level config keys that do not take part in the run key (see the module docstring).
NOT_IN_KEY = ("results_dir", "launcher", "logger", "hydra", "data_root", "resume")
# Bump when the key's definition changes (old records then no longer match, and are rerun).
# 2: the key covers the data read and the code (run_key_parts), not only the configuration.
KEY_VERSION = 2

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


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def data_digests(cfg: DictConfig | dict) -> dict[str, str]:
    """{what the run reads: a digest of it}: the content of each local file (under data_root), or
    hub:<dataset> for data read from the Hugging Face hub."""
    from . import data
    from .evaluation.zeroshot import LOCAL_FILES

    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    root = data.resolve_data_root(cfg.get("data_root"))
    methods = [cfg.method.get("algorithm")] + [name for name in cfg.get("compare_with", [])]
    reads: dict[str, Path | str] = {}
    evaluation = cfg.get("eval", {})
    if evaluation.get("ppl") is not None:
        reads["wikitext2_test"] = "hub:wikitext/wikitext-2-raw-v1/test" if root is None else data.wikitext2_file("test", root)
    if any(m != "fp" for m in methods):   # every method but fp may calibrate on WikiText-2 train
        if root is None:
            reads["wikitext2_train"] = "hub:wikitext/wikitext-2-raw-v1/train"
        else:
            try:
                reads["wikitext2_train"] = data.wikitext2_file("train", root)
            except Exception:   # not every method calibrates; one that does fails with the loader's message
                reads["wikitext2_train"] = "absent"
    if evaluation.get("zeroshot") is not None:
        from importlib import metadata

        for task in evaluation.zeroshot.tasks:
            if root is None:
                reads[f"zeroshot/{task}"] = f"hub:lm_eval-{metadata.version('lm_eval')}/{task}"
                continue
            for rel in LOCAL_FILES[task].files:
                path = root / rel
                reads[f"zeroshot/{task}/{rel}"] = path if path.is_file() else "absent"
    return {what: file_digest(source)[:16] if isinstance(source, Path) else source for what, source in reads.items()}


def key_parts(cfg: DictConfig | dict) -> dict:
    """The three parts of the run key (see the module docstring): config, data, code."""
    return {"config": _digest(key_fields(cfg)), "data": data_digests(cfg), "code": code_digest()}


def key_of(parts: dict) -> str:
    return _digest({"key_version": KEY_VERSION, **parts})


def run_key(cfg: DictConfig | dict) -> str:
    """A stable 16-hex-digit key of the run: same configuration, data and code, same key."""
    return key_of(key_parts(cfg))


def _records(results_dir: str | Path):
    runs = Path(results_dir) / "runs"
    for path in runs.glob("*.json") if runs.is_dir() else ():
        try:
            yield path, json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):   # a record being replaced, or not a record
            continue


def find_done_record(results_dir: str | Path, key: str) -> dict | None:
    """The newest `done` record of `key` under <results_dir>/runs (with its "record_path"), or None."""
    found = [{**record, "record_path": str(path)} for path, record in _records(results_dir)
             if record.get("run_key") == key and record.get("status") == "done"]
    return max(found, key=lambda r: r.get("finished_at") or "", default=None)


def find_outdated_done_record(results_dir: str | Path, parts: dict) -> tuple[dict, list[str]] | None:
    """The newest `done` record with the same configuration as `parts` but other code or data, and what
    differs (["code"], ["data (wikitext2_train)"], ...); None when there is none."""
    found = []
    for path, record in _records(results_dir):
        old = record.get("run_key_parts") or {}
        if record.get("status") != "done" or old.get("config") != parts["config"] or old == parts:
            continue
        changed = [] if old.get("code") == parts["code"] else ["code"]
        old_data = old.get("data") or {}
        files = sorted(k for k in set(old_data) | set(parts["data"]) if old_data.get(k) != parts["data"].get(k))
        if files:
            changed.append(f"data ({', '.join(files)})")
        found.append(({**record, "record_path": str(path)}, changed))
    return max(found, key=lambda found: found[0].get("finished_at") or "", default=None)


def find_resumable_record(results_dir: str | Path, key: str, this_run_id: str | None = None) -> dict | None:
    """The newest record of `key` that stopped before the end: `preempted`, or `running` but not this
    run's own (called under the key's lock, a running record's process is gone: killed without a chance
    to write, e.g. by SIGKILL)."""
    found = [{**record, "record_path": str(path)} for path, record in _records(results_dir)
             if record.get("run_key") == key and record.get("status") in ("preempted", "running")
             and record.get("run_id") != this_run_id]
    return max(found, key=lambda r: r.get("started_at") or "", default=None)


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


FAILED_JOBS_DIR = "failed_jobs"


def note_failed_job(sweep_dir: str | Path, job_num: int, overrides: list[str], error: str,
                    record_path: str | None) -> Path:
    """Leave a note of a failed multirun job for FailedJobsReport (a file per job, written atomically)."""
    folder = Path(sweep_dir) / FAILED_JOBS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job_num}.json"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps({"job_num": job_num, "overrides": overrides, "error": error,
                               "record_path": record_path}))
    os.replace(tmp, path)
    return path


def failed_jobs(sweep_dir: str | Path) -> list[dict]:
    folder = Path(sweep_dir) / FAILED_JOBS_DIR
    notes = [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []
    return sorted(notes, key=lambda note: note["job_num"])


class FailedJobsReport(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): at the end of a multirun, one line per failed
    job, then exit 1. Hydra calls on_multirun_end in the launching process, whatever the launcher; the
    jobs' notes reach it through the sweep folder (see note_failed_job)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # a sweep rerun into the same folder starts with no failures
        folder = Path(str(config.hydra.sweep.dir)) / FAILED_JOBS_DIR
        for note in folder.glob("*.json") if folder.is_dir() else ():
            note.unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = failed_jobs(str(config.hydra.sweep.dir))
        if not failed:
            return
        import sys

        print(f"{len(failed)} job(s) of the sweep failed:", file=sys.stderr)
        for note in failed:
            where = f"record {note['record_path']}" if note["record_path"] else "no record (failed before it ran)"
            print(f"  failed job #{note['job_num']} ({' '.join(note['overrides'])}): {note['error']}; {where}",
                  file=sys.stderr)
        sys.exit(1)
