"""Resumable sweeps: run keys, done records, run locks, and a killed sweep rerun end to end."""

import json
import multiprocessing
import os
import time

import torch
from omegaconf import OmegaConf

from baseq import sweep
from test_run_py import records, run, tiny_args


def config(**overrides):
    cfg = {"model": {"name": "tiny", "path": "/m"}, "method": {"name": "quarot", "algorithm": "quarot"},
           "quant": {"name": "w4a4kv4", "a_bits": 4}, "calib": {"nsamples": 4}, "eval": {"ppl": {"max_windows": 3}},
           "logger": {"name": "local"}, "device": "cpu", "seed": 0, "results_dir": "results", "data_root": None,
           "compare_with": [], "resume": True}
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return OmegaConf.create(cfg)


def data_copy(root, test_text="the test text\n", train_text="the train text\n"):
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "wiki.test.raw").write_text(test_text)
    (root / "wikitext2" / "wiki.train.raw").write_text(train_text)
    return str(root)


def test_run_key_ignores_where_and_how_but_not_what(tmp_path):
    here = data_copy(tmp_path / "a")
    key = sweep.run_key(config(data_root=here))
    assert len(key) == 16 and key == sweep.run_key(config(data_root=here))
    # the same data in another folder is the same run
    for where_or_how in ({"results_dir": "/scratch/x"}, {"logger.name": "wandb"},
                         {"data_root": data_copy(tmp_path / "b")}, {"resume": False}):
        assert sweep.run_key(config(**{"data_root": here, **where_or_how})) == key, where_or_how
    for what in ({"seed": 1}, {"method.name": "rtn"}, {"quant.a_bits": 8}, {"calib.nsamples": 8},
                 {"eval.ppl.max_windows": None}, {"compare_with": ["fp"]}, {"model.path": "/other"}):
        assert sweep.run_key(config(data_root=here, **what)) != key, what
    resolved = "cuda" if torch.cuda.is_available() else "cpu"
    assert sweep.run_key(config(data_root=here, device="auto")) == sweep.run_key(config(data_root=here, device=resolved))


def test_run_key_changes_with_the_data_read_and_the_code(tmp_path, monkeypatch):
    monkeypatch.setenv("BASEQ_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    data_copy(root)
    parts = sweep.key_parts(config(data_root=str(root)))
    assert set(parts["data"]) == {"wikitext2_test", "wikitext2_train"}
    key = sweep.key_of(parts)
    # other calibration text under the same data_root: another run
    time.sleep(0.01)
    (root / "wikitext2" / "wiki.train.raw").write_text("other train text\n")
    changed = sweep.key_parts(config(data_root=str(root)))
    assert changed["data"]["wikitext2_train"] != parts["data"]["wikitext2_train"]
    assert changed["data"]["wikitext2_test"] == parts["data"]["wikitext2_test"] and sweep.key_of(changed) != key
    # the calibration text is not part of an fp run (it reads none)
    fp = config(data_root=str(root), **{"method.algorithm": "fp"})
    assert set(sweep.key_parts(fp)["data"]) == {"wikitext2_test"}
    # other code: another run (code_digest is a content hash of the tree; see baseq.version)
    monkeypatch.setattr(sweep, "code_digest", lambda: "0" * 16)
    assert sweep.run_key(config(data_root=str(root))) != sweep.key_of(changed)


def test_code_digest_follows_the_content_of_the_code(tmp_path, monkeypatch):
    from baseq import version

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(version, "PACKAGE_DIR", tmp_path / "pkg")
    monkeypatch.setattr(version, "REPO", tmp_path)
    version.code_digest.cache_clear()
    first = version.code_digest()
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    version.code_digest.cache_clear()
    assert version.code_digest() != first
    version.code_digest.cache_clear()


def test_file_digests_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    from baseq import version

    monkeypatch.setenv("BASEQ_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "big.txt"
    f.write_text("content")
    first = version.file_digest(f)
    [cached] = (tmp_path / "cache" / "digests").iterdir()
    assert cached.read_text() == first
    os.utime(f, (1, 1))   # a changed file (new mtime) is hashed again
    assert version.file_digest(f) == first and len(list((tmp_path / "cache" / "digests").iterdir())) == 2


def test_records_without_git_name_the_code_by_its_digest(monkeypatch):
    from baseq import records, version

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.delenv("BASEQ_GIT_COMMIT", raising=False)
    monkeypatch.setattr(records.subprocess, "run", no_git)
    assert records.git_commit() == f"tree:{version.code_digest()}"
    # whoever copied the tree can state its commit; that wins over git, whose .git may be a stale copy
    monkeypatch.setenv("BASEQ_GIT_COMMIT", "0123abc")
    assert records.git_commit() == "0123abc"


def test_a_done_record_of_the_same_config_with_other_code_is_found_with_what_changed(tmp_path):
    parts = {"config": "c", "data": {"wikitext2_test": "d1"}, "code": "new"}
    write(tmp_path, "old", run_key="k0", status="done", finished_at="1",
          run_key_parts={"config": "c", "data": {"wikitext2_test": "d0"}, "code": "old"})
    record, changed = sweep.find_outdated_done_record(tmp_path, parts)
    assert record["run_id"] == "old" and changed == ["code", "data (wikitext2_test)"]
    assert sweep.find_outdated_done_record(tmp_path, {**parts, "config": "other"}) is None


def write(results, name, **record):
    (results / "runs").mkdir(parents=True, exist_ok=True)
    (results / "runs" / f"{name}.json").write_text(json.dumps({"run_id": name, **record}))


def test_find_done_record_takes_the_newest_done_one(tmp_path):
    assert sweep.find_done_record(tmp_path, "k") is None
    write(tmp_path, "a", run_key="k", status="done", finished_at="2026-01-01T00:00:00")
    write(tmp_path, "b", run_key="k", status="done", finished_at="2026-01-02T00:00:00")
    write(tmp_path, "c", run_key="k", status="failed", finished_at="2026-01-03T00:00:00")
    write(tmp_path, "d", run_key="other", status="done", finished_at="2026-01-04T00:00:00")
    (tmp_path / "runs" / ".tmp-partial.json").write_text("{")
    assert sweep.find_done_record(tmp_path, "k")["run_id"] == "b"


def test_lock_is_exclusive_and_released(tmp_path):
    first, second = sweep.RunLock(tmp_path, "k"), sweep.RunLock(tmp_path, "k")
    assert first.acquire()
    assert not second.acquire()
    assert second.holder()["pid"] == os.getpid()
    first.release()
    assert not first.path.exists()
    assert second.acquire()
    second.release()


def test_stale_locks_are_broken(tmp_path):
    lock = sweep.RunLock(tmp_path, "k")
    lock.path.parent.mkdir(parents=True)
    # a dead process on this host
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    lock.path.write_text(json.dumps({"host": lock.owner["host"], "pid": dead.pid, "token": "old"}))
    assert lock.acquire()
    assert lock.holder()["token"] == lock.owner["token"]
    lock.release()
    # another host: held while its heartbeat is fresh, broken once it is older than STALE_AFTER_S
    lock.path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "remote"}))
    assert not sweep.RunLock(tmp_path, "k").acquire()
    old = time.time() - sweep.STALE_AFTER_S - 1
    os.utime(lock.path, (old, old))
    fresh = sweep.RunLock(tmp_path, "k")
    assert fresh.acquire()
    fresh.release()


def test_heartbeat_keeps_a_long_job_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "HEARTBEAT_S", 0.05)
    lock = sweep.RunLock(tmp_path, "k")
    assert lock.acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 10
    lock.release()


def test_run_once_runs_skips_and_reruns(tmp_path):
    calls = []

    def job():
        calls.append(1)
        record = {"run_id": f"r{len(calls)}", "run_key": "k", "status": "done", "finished_at": f"{len(calls)}"}
        write(tmp_path, record["run_id"], **{k: v for k, v in record.items() if k != "run_id"})
        return record

    assert sweep.run_once(tmp_path, "k", job).status == "ran"
    skipped = sweep.run_once(tmp_path, "k", job)
    assert skipped.status == "already_done" and skipped.record["run_id"] == "r1" and len(calls) == 1
    assert sweep.run_once(tmp_path, "k", job, resume=False).status == "ran" and len(calls) == 2
    held = sweep.RunLock(tmp_path, "k")
    assert held.acquire()
    busy = sweep.run_once(tmp_path, "k", job)
    assert busy.status == "in_progress" and busy.holder["token"] == held.owner["token"] and len(calls) == 2
    held.release()


def _claim(results, marker, barrier):
    def job():
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        write(results, f"run-{os.getpid()}", run_key="k", status="done", finished_at="x")
        return {}

    barrier.wait()
    sweep.run_once(results, "k", job)


def test_concurrent_jobs_with_one_key_run_it_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_claim, args=(tmp_path, tmp_path / "ran.txt", barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len((tmp_path / "ran.txt").read_text().split()) == 1


def test_killed_sweep_rerun_runs_only_the_missing_job(tiny_model_dirs, tiny_data_root, tmp_path):
    results = tmp_path / "results"
    args = ["-m", "method=fp,rtn,quarot", "compare_with=[]", *tiny_args(tiny_model_dirs["llama"], tiny_data_root,
                                                                       results)]
    out = run(args, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first = {r["method"]: r for r in records(results)}
    assert set(first) == {"fp", "rtn", "quarot"} and all(r["run_key"] for r in first.values())
    assert len({r["run_key"] for r in first.values()}) == 3
    # the sweep "was killed" before quarot's record was written
    os.remove(results / "runs" / f"{first['quarot']['run_id']}.json")

    out = run(args, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    second = {r["method"]: r for r in records(results)}
    assert len(records(results)) == 3
    assert second["fp"]["run_id"] == first["fp"]["run_id"] and second["rtn"]["run_id"] == first["rtn"]["run_id"]
    assert second["quarot"]["run_id"] != first["quarot"]["run_id"]
    assert second["quarot"]["run_key"] == first["quarot"]["run_key"]
    assert out.stdout.count("skipped") == 2
    assert out.stdout.count("(same config, data and code; resume=false runs it again)") == 2
    assert not list((results / "locks").glob("*.lock"))

    # resume=false runs everything again
    out = run([*args, "resume=false"], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(records(results)) == 6
