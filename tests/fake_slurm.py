"""Stand-ins for sbatch, srun, sacct, scancel and scontrol that run Slurm batch scripts on this machine.

tests/test_slurm_launcher.py puts shims named sbatch/srun/sacct/scancel/scontrol first on PATH, each
running `python fake_slurm.py <command> ...`, so that submitit's real Slurm executor (what launcher=slurm
uses) submits, polls, requeues and collects jobs end to end. State lives in $FAKE_SLURM_DIR:

    next_id                    the next job id
    <job>_<task>.state         PENDING, RUNNING, COMPLETED, FAILED or CANCELLED
    <job>_<task>.pid           the pid of a running array task's batch script
    <job>_<task>.step_pid      the pid of its job step (the command srun runs)
    <job>_<task>.requeue       present from `scontrol requeue` until the task runs again
    <job>_<task>.restarts      how many times the task was requeued (SLURM_RESTART_COUNT)
    submitted/<job>.sh         the batch scripts, as submitted

`scancel --signal SIG <job>_<task>` sends SIG to the task's job step, as Slurm does (without --batch, the
batch shell is not signalled): that is how a test preempts a job. `scontrol requeue` makes the task run
its batch script again once the current run exits, as Slurm's requeue of a preempted job does.

sbatch answers at once and runs the array tasks in a detached worker, one after another (a cluster would
run them in parallel; the order does not matter to the tests). Each task gets the SLURM_* variables that
submitit's job environment reads.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake_slurm"))


def _new_job_id() -> int:
    counter = STATE / "next_id"
    job_id = int(counter.read_text()) if counter.exists() else 1000
    counter.write_text(str(job_id + 1))
    return job_id


def _array_tasks(script: str) -> list[int]:
    match = re.search(r"^#SBATCH --array=(\d+)-(\d+)", script, re.MULTILINE)
    return list(range(int(match.group(1)), int(match.group(2)) + 1)) if match else [0]


def sbatch(args: list[str]) -> int:
    script_path = Path(args[-1])
    script = script_path.read_text()
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / "submitted").mkdir(exist_ok=True)
    job_id = _new_job_id()
    (STATE / "submitted" / f"{job_id}.sh").write_text(script)
    is_array = "#SBATCH --array=" in script
    tasks = _array_tasks(script)
    for task in tasks:
        (STATE / f"{_name(job_id, task, is_array)}.state").write_text("PENDING")
    # a detached worker runs the tasks; sbatch itself returns at once, like the real one
    subprocess.Popen([sys.executable, __file__, "_run_array", str(job_id), str(script_path), str(int(is_array)),
                      *map(str, tasks)], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job_id}")
    return 0


def _name(job_id: int, task: int, is_array: bool) -> str:
    return f"{job_id}_{task}" if is_array else str(job_id)


def _run_array(args: list[str]) -> int:
    job_id, script_path, is_array, tasks = int(args[0]), args[1], bool(int(args[2])), [int(t) for t in args[3:]]
    for task in tasks:
        name = _name(job_id, task, is_array)
        if (STATE / f"{name}.state").read_text() == "CANCELLED":
            continue
        # every array task has a job id of its own on a real cluster
        env = {**os.environ, "SLURM_JOB_ID": str(job_id * 1000 + task if is_array else job_id), "SLURM_NTASKS": "1",
               "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
               "SLURM_JOB_NODELIST": "localhost"}
        if is_array:
            env.update(SLURM_ARRAY_JOB_ID=str(job_id), SLURM_ARRAY_TASK_ID=str(task))
        while True:
            restarts = STATE / f"{name}.restarts"
            env["SLURM_RESTART_COUNT"] = restarts.read_text() if restarts.exists() else "0"
            env["FAKE_SLURM_TASK"] = name
            proc = subprocess.Popen(["bash", script_path], env=env)
            (STATE / f"{name}.pid").write_text(str(proc.pid))
            (STATE / f"{name}.state").write_text("RUNNING")
            code = proc.wait()
            requeue = STATE / f"{name}.requeue"
            if requeue.exists() and (STATE / f"{name}.state").read_text() != "CANCELLED":
                requeue.unlink()
                restarts.write_text(str(int(env["SLURM_RESTART_COUNT"]) + 1))
                continue   # the state stayed PENDING since the requeue: run the script again
            if (STATE / f"{name}.state").read_text() != "CANCELLED":
                (STATE / f"{name}.state").write_text("COMPLETED" if code == 0 else "FAILED")
            break
    return 0


def srun(args: list[str]) -> int:
    """srun [--unbuffered] [--output F] [--error F] command...: one task, with Slurm's file name patterns."""
    out = err = None
    i = 0
    while i < len(args) and args[i].startswith("--"):
        if args[i] in ("--output", "--error"):
            if args[i] == "--output":
                out = args[i + 1]
            else:
                err = args[i + 1]
            i += 2
        else:
            i += 1
    command = args[i:]

    def expand(pattern: str) -> str:
        job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
        return (pattern.replace("%A", job).replace("%a", os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
                .replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", "0"))

    stdout = open(expand(out), "a") if out else None
    stderr = open(expand(err), "a") if err else None
    try:
        step = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        if "FAKE_SLURM_TASK" in os.environ:
            (STATE / f"{os.environ['FAKE_SLURM_TASK']}.step_pid").write_text(str(step.pid))
        return step.wait()
    finally:
        for f in (stdout, stderr):
            if f:
                f.close()


def sacct(args: list[str]) -> int:
    """sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]"""
    wanted = {args[i + 1] for i, a in enumerate(args) if a == "-j"}
    print("JobID|State|NodeList")
    for state in sorted(STATE.glob("*.state")):
        name = state.name[: -len(".state")]
        if name.split("_")[0] in wanted:
            print(f"{name}|{state.read_text()}|localhost")
    return 0


def scancel(args: list[str]) -> int:
    target = args[0]
    sig = signal.SIGTERM
    if "--signal" in args:
        name = args[args.index("--signal") + 1].upper()
        sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}")
    for state in STATE.glob(f"{target.split('_')[0]}*.state"):
        name = state.name[: -len(".state")]
        if "_" in target and name != target:
            continue
        # --signal goes to the job step; a cancel (SIGTERM) to the whole batch script
        pid_file = STATE / (f"{name}.step_pid" if "--signal" in args else f"{name}.pid")
        if pid_file.exists() and state.read_text() == "RUNNING":
            try:
                os.kill(int(pid_file.read_text()), sig)
            except ProcessLookupError:
                pass
        if sig in (signal.SIGTERM, signal.SIGKILL) or state.read_text() == "PENDING":
            state.write_text("CANCELLED")
    return 0


def scontrol(args: list[str]) -> int:
    """scontrol requeue <job>_<task> (what submitit calls after checkpointing a preempted job)."""
    if args[:1] != ["requeue"]:
        print(f"fake scontrol supports only requeue, not {args}", file=sys.stderr)
        return 1
    name = args[1]
    (STATE / f"{name}.requeue").write_text("")
    (STATE / f"{name}.state").write_text("PENDING")
    return 0


COMMANDS = {"sbatch": sbatch, "srun": srun, "sacct": sacct, "scancel": scancel, "scontrol": scontrol,
            "_run_array": _run_array}


def install(bin_dir: Path) -> None:
    """Write executable shims for the five commands into bin_dir (to be put first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for command in ("sbatch", "srun", "sacct", "scancel", "scontrol"):
        shim = bin_dir / command
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(__file__)} {command} \"$@\"\n")
        shim.chmod(0o755)


if __name__ == "__main__":
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
