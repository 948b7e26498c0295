"""Records keep what was finished: written as stages end, a failed stage named, SIGTERM -> preempted and
a rerun resumes; save_quantized / load_quantized through run.py; a multirun survives a bad job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from baseq.records import RecordClosedError, RunRecord, StageTimer, write_record
from conftest import SAMPLE_TEXT
from test_run_py import REPO, records, run, run_in_process, tiny_args


def test_record_is_written_at_each_stage_and_immutable_once_finished(tmp_path):
    import torch

    record = RunRecord(tmp_path, {"run_id": "r1"}, StageTimer(torch.device("cpu")))
    on_disk = lambda: json.loads(record.path.read_text())   # noqa: E731
    assert on_disk()["status"] == "running"
    main = record.method()
    with main.stage("eval_ppl"):
        assert on_disk()["stage"] == "eval_ppl"   # a killed run says where it was
        main.update(wikitext2_ppl=12.5)
    assert on_disk()["metrics"] == {"wikitext2_ppl": 12.5} and on_disk()["stages_done"] == ["eval_ppl"]
    with record.method("fp").stage("eval_ppl"):
        record.method("fp").update(wikitext2_ppl=10.0)
    assert on_disk()["metrics"]["compare"]["fp"] == {"wikitext2_ppl": 10.0}
    assert "compare_fp_eval_ppl" in on_disk()["timings_s"]
    record.finish("done")
    assert on_disk()["status"] == "done" and on_disk()["finished_at"]
    with pytest.raises(RecordClosedError, match="is done; records are immutable"):
        record.write()
    # nor can another writer replace the finished file
    with pytest.raises(RecordClosedError, match="is done"):
        write_record(tmp_path, {**record.data, "status": "running"})


def test_a_stage_failing_after_perplexity_keeps_the_perplexity(tiny_model_dirs, tiny_data_root, tmp_path):
    # the tiny data root has no zero-shot files: zero-shot fails after perplexity was measured
    out = run(tiny_args(tiny_model_dirs["llama"], tiny_data_root, tmp_path / "res", "method=quarot",
                        "compare_with=[]", "eval=full", "eval.zeroshot.tasks=[piqa]", "eval.ppl.max_windows=3"))
    assert out.returncode == 1 and "piqa" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    [rec] = records(tmp_path / "res")
    assert rec["status"] == "failed" and rec["error"]["stage"] == "eval_zeroshot"
    assert rec["metrics"]["wikitext2_ppl"] > 1 and rec["metrics"]["wikitext2_windows"] == 3
    assert "eval_ppl" in rec["stages_done"] and "eval_zeroshot" not in rec["stages_done"]


def slow_data_root(root: Path) -> Path:
    """Enough WikiText-2 test text that evaluating every window takes seconds, for a signal to land."""
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "wiki.test.raw").write_text(SAMPLE_TEXT.replace(" . ", " . \n \n") * 3)
    (root / "wikitext2" / "wiki.train.raw").write_text(SAMPLE_TEXT * 3)
    return root


def wait_for_stage(results: Path, stage: str, proc=None, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (results / "runs").glob("*.json"):
            try:
                rec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if rec.get("stage") == stage:
                return rec
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before stage {stage}: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"no record reached stage {stage}")


def test_sigterm_leaves_a_preempted_record_and_a_rerun_resumes(tiny_model_dirs, tmp_path):
    results = tmp_path / "res"
    args = tiny_args(tiny_model_dirs["llama"], slow_data_root(tmp_path / "data"), results, "method=quarot",
                     "compare_with=[fp]", "save_quantized=true", "eval.ppl.max_windows=null")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    running = wait_for_stage(results, "eval_ppl", proc)   # the main method's, after quantize and save
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "run the same command again to resume" in stderr, stderr
    [first] = records(results)
    assert first["run_id"] == running["run_id"] and first["status"] == "preempted"
    assert first["error"]["signal"] == "SIGTERM" and first["error"]["stage"] == "eval_ppl"
    assert "quantize" in first["stages_done"] and Path(first["quantized_model"]).is_dir()
    fp_ppl = first["metrics"]["compare"]["fp"]["wikitext2_ppl"]

    out = run_in_process(args)   # resuming is the records' business, not the process's
    assert out.returncode == 0, out.stderr[-3000:]
    second = next(r for r in records(results) if r["run_id"] != first["run_id"])
    assert second["status"] == "done" and second["resumed_from"] == first["record_path"]
    # the comparison finished before the signal: kept, not measured again; the model is loaded, not quantized
    assert second["metrics"]["compare"]["fp"]["wikitext2_ppl"] == fp_ppl
    assert "load_model" not in second["stages_done"] and "quantize" not in second["timings_s"]
    assert "load_quantized" in second["stages_done"] and second["metrics"]["wikitext2_ppl"] > 1
    assert second["quantized_model"] == first["quantized_model"]


def test_load_quantized_evaluates_the_saved_model_without_quantizing(tiny_model_dirs, tiny_data_root, tmp_path):
    results = tmp_path / "res"
    common = tiny_args(tiny_model_dirs["qwen2"], tiny_data_root, results, "method=quarot", "compare_with=[]")
    out = run_in_process([*common, "save_quantized=true"])
    assert out.returncode == 0, out.stderr[-3000:]
    [saved] = records(results)
    folder = Path(saved["quantized_model"])
    assert folder == results / "models" / saved["run_id"] and (folder / "model.safetensors").is_file()

    out = run_in_process([*common, f"load_quantized={folder}", "model.path=/not/needed"])
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = next(r for r in records(results) if r["run_id"] != saved["run_id"])
    assert loaded["status"] == "done" and "quantize" not in loaded["stages_done"]
    assert loaded["metrics"]["wikitext2_ppl"] == saved["metrics"]["wikitext2_ppl"]

    out = run([*common, f"load_quantized={folder}", "method.act_clip_ratio=0.5"])   # the CLI's one-line error
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "was made with method.act_clip_ratio=0.9, this run has method.act_clip_ratio=0.5" in out.stderr


def test_a_multirun_goes_on_past_failing_jobs_and_lists_them(tiny_model_dirs, tiny_data_root, tmp_path):
    results = tmp_path / "res"
    out = run(["-m", "model.num_layers=1,999", "method.gptq.damp=0.01,-1",
               *tiny_args(tiny_model_dirs["llama"], tiny_data_root, results, "method=quarot", "compare_with=[]")])
    assert out.returncode == 1
    recs = records(results)
    assert sorted(r["status"] for r in recs) == ["done", "failed"]   # the validation failures have no record
    failed = next(r for r in recs if r["status"] == "failed")
    assert failed["error"]["stage"] == "load_model" and "num_layers=999" in failed["error"]["message"]
    assert "3 job(s) of the sweep failed:" in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("  failed job #")]
    assert len(lines) == 3, out.stderr[-3000:]
    [load_failure] = [line for line in lines if "model.num_layers=999 method.gptq.damp=0.01" in line]
    assert f"record {failed['record_path']}" in load_failure
    assert all("must be > 0" in line and "no record" in line for line in lines if "damp=-1" in line)


def test_sigterm_raises_preempted_once_and_the_handler_is_restored():
    from baseq.signals import Preempted, stop_signals_raise

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="stopped by SIGTERM"):
        with stop_signals_raise() as received:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert received == ["SIGTERM"] and signal.getsignal(signal.SIGTERM) is before
    with stop_signals_raise() as received:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except Preempted:
            os.kill(os.getpid(), signal.SIGTERM)   # while the record is written: noted, not raised
            time.sleep(0.2)
    assert received == ["SIGTERM", "SIGTERM"]


def test_a_launchers_own_handler_keeps_running():
    """Under submitit the preemption signal's handler (checkpoint, requeue, exit) is the launcher's."""
    from baseq.signals import stop_signals_raise

    calls = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with stop_signals_raise() as received:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.2)
        assert calls == [signal.SIGUSR2] and received == ["SIGUSR2"]
    finally:
        signal.signal(signal.SIGUSR2, before)
