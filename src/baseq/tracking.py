"""Mirror run records to Weights & Biases (logger=wandb). Optional: analysis reads only the JSON records.

One W&B run per record, named by the record's run_id: the resolved config, the scalar metrics (perplexity,
zero-shot average and per task, the comparison methods', stage timings, peak memory), the zero-shot
scores as a wandb.Table, and every PNG under the run's output folder. `logger.mode=offline` needs no
account (sync later with `wandb sync`); `logger.mode=disabled` turns it into a no-op.

Mirroring never fails a run: the record is already written when this is called, so an error here (no
login, no network) is logged as a warning. Records can be mirrored afterwards too:

    python -m baseq.tracking results/runs/*.json --project baseq --mode offline
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("baseq")


def flat_metrics(record: dict) -> dict[str, float]:
    """Scalars of a record under slash-separated names (W&B groups charts by the first part)."""
    out: dict[str, float] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    add("", record.get("metrics", {}))
    add("timings_s", record.get("timings_s", {}))
    add("peak_memory_gb", record.get("peak_memory_gb", {}))
    return out


def zeroshot_table(record: dict):
    """The zero-shot scores as a wandb.Table (task, accuracy in percent), or None without zero-shot."""
    import wandb

    scores = record.get("metrics", {}).get("zeroshot")
    if not scores:
        return None
    rows = [[task, float(score)] for task, score in scores.items()]
    if "zeroshot_avg" in record["metrics"]:
        rows.append(["average", float(record["metrics"]["zeroshot_avg"])])
    return wandb.Table(columns=["task", "accuracy"], data=rows)


def log_run(record: dict, cfg: Any, output_dir: str | Path | None = None) -> str | None:
    """Mirror `record` to W&B when cfg.logger.name == "wandb"; returns the W&B run's folder, else None.

    output_dir: the run's output folder (Hydra's runtime.output_dir); the PNGs found under it are logged."""
    logger = cfg.logger
    if logger.name != "wandb" or logger.mode == "disabled":
        return None
    try:
        return _log(record, logger, Path(output_dir) if output_dir else None)
    except Exception as err:   # a mirror must not fail the run whose record is already written
        log.warning("could not mirror run %s to W&B (%s: %s); the record is at %s", record.get("run_id"),
                    type(err).__name__, str(err).strip().splitlines()[0][:200] if str(err).strip() else "",
                    record.get("record_path"))
        return None


def _log(record: dict, logger: Any, output_dir: Path | None) -> str:
    import wandb

    run = wandb.init(project=logger.project, mode=logger.mode, name=record["run_id"], id=_wandb_id(record),
                     config=record.get("config", {}), group=f"{record.get('model')}/{record.get('quant')}",
                     job_type=record.get("method"), tags=[str(record.get(k)) for k in ("model", "method", "quant")],
                     reinit="finish_previous")
    try:
        run.summary["status"] = record.get("status")
        run.summary["run_key"] = record.get("run_key")
        payload: dict[str, Any] = dict(flat_metrics(record))
        table = zeroshot_table(record)
        if table is not None:
            payload["zeroshot_table"] = table
        if output_dir is not None and output_dir.is_dir():
            for png in sorted(output_dir.rglob("*.png")):
                payload[f"plots/{png.relative_to(output_dir).with_suffix('').as_posix()}"] = wandb.Image(str(png))
        run.log(payload)
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def _wandb_id(record: dict) -> str:
    # W&B run ids allow [A-Za-z0-9_-]; ours are "<utc stamp>_<model>_<method>_<quant>_<hex>"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in record["run_id"])[:128]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Mirror baseq run records to Weights & Biases.")
    parser.add_argument("records", nargs="+", type=Path, help="run record JSON files (<results_dir>/runs/*.json)")
    parser.add_argument("--project", default="baseq")
    parser.add_argument("--mode", default="online", choices=["online", "offline"])
    args = parser.parse_args(argv)
    from types import SimpleNamespace

    logger = SimpleNamespace(name="wandb", project=args.project, mode=args.mode)
    for path in args.records:
        record = json.loads(path.read_text())
        print(f"{path}: {_log(record, logger, None)}")


if __name__ == "__main__":
    main()
