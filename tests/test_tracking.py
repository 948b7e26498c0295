"""logger=wandb: a record mirrored to an offline W&B run (no account, no network)."""

import json
import os
import subprocess
import sys
from pathlib import Path

RECORD = {
    "run_id": "20260101T000000Z_tiny_quarot_w4a4kv4_abc123", "run_key": "0123456789abcdef", "status": "done",
    "model": "tiny", "method": "quarot", "quant": "w4a4kv4",
    "config": {"seed": 0, "method": {"name": "quarot", "act_clip_ratio": 0.9}},
    "metrics": {"wikitext2_ppl": 30.5, "wikitext2_windows": 4, "zeroshot": {"arc_easy": 40.0, "piqa": 60.0},
                "zeroshot_avg": 50.0, "compare": {"fp": {"wikitext2_ppl": 22.0}}},
    "timings_s": {"quantize": 3.0, "eval_ppl": 1.5}, "peak_memory_gb": {"device": {}, "host": 1.2},
}

# a fresh interpreter: WANDB_* settings are read when wandb starts, and wandb runs a service process
SCRIPT = """
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from omegaconf import OmegaConf
from baseq.tracking import log_run

record, out = json.loads(sys.argv[1]), Path(sys.argv[2])
(out / "plots").mkdir(parents=True)
plt.plot([1, 2, 3]); plt.savefig(out / "plots" / "loss.png")
cfg = OmegaConf.create({"logger": {"name": "wandb", "project": "baseq-test", "mode": "offline"}})
print("RUN_DIR", log_run(record, cfg, out))
print("LOCAL", log_run(record, OmegaConf.create({"logger": {"name": "local", "project": "p", "mode": "online"}})))
"""


def test_offline_wandb_run_holds_config_metrics_table_and_plots(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_SILENT": "true", "PYTHONPATH": os.environ["PYTHONPATH"]}   # this checkout's baseq (conftest)
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(RECORD), str(tmp_path / "output")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOCAL None" in out.stdout   # logger=local does nothing
    run_dir = Path(next(line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.startswith("RUN_DIR")))
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")

    [table] = (run_dir / "files" / "media" / "table").glob("zeroshot_table_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == ["task", "accuracy"]
    assert content["data"] == [["arc_easy", 40.0], ["piqa", 60.0], ["average", 50.0]]
    [image] = (run_dir / "files" / "media" / "images").rglob("*.png")
    assert "loss" in image.name
    # the run's transaction log holds the config and the flattened metrics
    [log] = run_dir.glob("run-*.wandb")
    data = log.read_bytes()
    for key in (b"wikitext2_ppl", b"zeroshot/arc_easy", b"zeroshot_avg", b"compare/fp/wikitext2_ppl",
                b"timings_s/quantize", b"act_clip_ratio", RECORD["run_key"].encode()):
        assert key in data, key


def test_mirroring_failure_does_not_fail_the_run(tmp_path):
    # an invalid mode makes wandb.init raise: the run only logs a warning
    script = ("from omegaconf import OmegaConf\nfrom baseq.tracking import log_run\n"
              "cfg = OmegaConf.create({'logger': {'name': 'wandb', 'project': 'p', 'mode': 'nonsense'}})\n"
              "print('RESULT', log_run({'run_id': 'r', 'record_path': '/x/r.json'}, cfg))\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "PYTHONPATH": os.environ["PYTHONPATH"]}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT None" in out.stdout
    assert "could not mirror run r to W&B" in out.stderr and "/x/r.json" in out.stderr
