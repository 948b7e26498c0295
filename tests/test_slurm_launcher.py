"""launcher=slurm end to end: a real `run.py -m` sweep through submitit's Slurm executor, against stand-in
sbatch/srun/sacct/scancel (tests/fake_slurm.py) that run the submitted batch script on this machine."""

import os
import time

import fake_slurm
from test_run_py import records, run, tiny_args


def test_slurm_sweep_runs_each_job_as_an_array_task(tiny_model_dirs, tiny_data_root, tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    fake_slurm.install(bin_dir)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}
    results = tmp_path / "results"
    out = run(["-m", "launcher=slurm", "method=fp,quarot", "compare_with=[]", "hydra.launcher.timeout_min=5",
               "hydra.launcher.partition=debug", "hydra.launcher.mem_gb=4", "hydra.launcher.cpus_per_task=1",
               *tiny_args(tiny_model_dirs["llama"], tiny_data_root, results)], env_extra=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    recs = records(results)
    assert sorted(r["method"] for r in recs) == ["fp", "quarot"]
    assert all(r["status"] == "done" and r["metrics"]["wikitext2_ppl"] > 1 for r in recs)
    assert all(r["protocol"] == "cpu-preset" for r in recs)   # the config's resolvers work inside the jobs
    # one array of two tasks went through sbatch, with the configured resources, each task via srun
    [script] = (state / "submitted").glob("*.sh")
    text = script.read_text()
    for line in ("#SBATCH --array=0-1%", "#SBATCH --partition=debug", "#SBATCH --time=5", "#SBATCH --mem=4GB",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=1"):
        assert line in text, text
    assert "srun --unbuffered" in text and "submitit.core._submit" in text
    # the launcher returns when the results are in; the stand-in marks a task COMPLETED when its script exits
    deadline = time.monotonic() + 30
    while any(p.read_text() == "RUNNING" for p in state.glob("*.state")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(p.read_text() for p in state.glob("*.state")) == ["COMPLETED"] * 2


def test_preempted_slurm_job_is_requeued_and_resumes(tiny_model_dirs, tmp_path):
    """Slurm warns a job it preempts with SIGUSR2 (submitit's --signal); submitit checkpoints the Hydra job
    (hydra-submitit-launcher's checkpoint() resubmits it as it was), requeues it with scontrol and exits.
    The record says preempted; the requeued job finds it and resumes: the comparison measured before the
    signal is kept, the saved quantized model is loaded instead of quantized again."""
    import signal
    import subprocess
    import sys

    from test_records import slow_data_root, wait_for_stage
    from test_run_py import REPO

    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    fake_slurm.install(bin_dir)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state),
           "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    results = tmp_path / "results"
    # timeout_min=60: the signal comes early in the job's time, so submitit treats it as a preemption
    args = ["-m", "launcher=slurm", *tiny_args(tiny_model_dirs["llama"], slow_data_root(tmp_path / "data"), results),
            "method=quarot", "compare_with=[fp]", "save_quantized=true", "eval.ppl.max_windows=null",
            "hydra.launcher.timeout_min=60", "hydra.launcher.cpus_per_task=1"]
    sweep = subprocess.Popen([sys.executable, "run.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for_stage(results, "eval_ppl", sweep)
    [task] = [p.name[: -len(".state")] for p in state.glob("*.state") if p.read_text() == "RUNNING"]
    subprocess.run([str(bin_dir / "scancel"), task, "--signal", "USR2"], env=env, check=True)
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, err[-3000:]

    # requeued once; COMPLETED once the requeued run's script exits (the launcher returns on the result)
    deadline = time.monotonic() + 30
    while (state / f"{task}.state").read_text() == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (state / f"{task}.restarts").read_text() == "1" and (state / f"{task}.state").read_text() == "COMPLETED"
    first, second = sorted(records(results), key=lambda r: r["started_at"])
    assert first["status"] == "preempted" and first["error"]["signal"] == signal.Signals.SIGUSR2.name
    assert second["status"] == "done" and second["resumed_from"] == first["record_path"]
    assert second["metrics"]["compare"]["fp"] == first["metrics"]["compare"]["fp"]
    assert "load_quantized" in second["stages_done"] and "quantize" not in second["stages_done"]
    assert second["metrics"]["wikitext2_ppl"] > 1
