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
