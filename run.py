"""Entry point: python run.py [group=option ...] [key=value ...] (add -m for a sweep). See README.md."""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from baseq.config import check_group_choices, check_overrides_under_null_sections, register_configs, validate
from baseq.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose_method(name: str) -> DictConfig:
    """The full method config of `name` under this job's other overrides."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("method")]
    return compose(config_name="config", overrides=[*overrides, f"method={name}"]).method


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One job. In a single run a UserError is one line and exit 1. In a -m sweep no job's error stops the
    sweep: the job is noted as failed (its record, if it got that far, says `failed`) and the sweep goes
    on; baseq.sweep.FailedJobsReport lists the failed jobs at the end and exits non-zero."""
    from baseq.records import new_run_id, record_path
    from baseq.signals import Preempted
    from baseq.sweep import note_failed_job

    hydra_cfg = HydraConfig.get()
    run_id = new_run_id(cfg.model.name, cfg.method.name, cfg.quant.name)
    try:
        return run(cfg, run_id)
    except Preempted as err:
        # SIGTERM stops a sweep too (it was meant for the whole process); rerunning the command resumes
        print(f"{err}: record {record_path(cfg.results_dir, run_id)} says preempted; run the same command again "
              f"to resume", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except Exception as err:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            if isinstance(err, UserError):
                print(f"error: {err}", file=sys.stderr)
                sys.exit(1)
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not isinstance(err, UserError):
            traceback.print_exc()
            message = f"{type(err).__name__}: {message}"
        print(f"error: {message}", file=sys.stderr)
        path = record_path(cfg.results_dir, run_id)
        note_failed_job(hydra_cfg.sweep.dir, hydra_cfg.job.num, list(hydra_cfg.overrides.task), message,
                        str(path) if path.exists() else None)
        return None


def run(cfg: DictConfig, run_id: str) -> float | None:
    validate(cfg)
    check_group_choices([f"method={name}" for name in cfg.compare_with], CONF_DIR)
    from baseq import sweep, tracking
    from baseq.pipeline import run_job, summary_table  # heavy (torch, transformers): after the config checks
    compare = {name: compose_method(name) for name in cfg.compare_with if name != cfg.method.name}
    parts = sweep.key_parts(cfg)
    key = sweep.key_of(parts)
    description = sweep.describe(cfg)
    if cfg.resume and sweep.find_done_record(cfg.results_dir, key) is None:
        outdated = sweep.find_outdated_done_record(cfg.results_dir, parts)
        if outdated is not None:
            print(f"running {description} again: {outdated[0]['record_path']} is done for the same config but "
                  f"{' and '.join(outdated[1])} changed since")
    outcome = sweep.run_once(cfg.results_dir, key, lambda: run_job(cfg, compare, key, parts, run_id),
                             resume=cfg.resume, description=description)
    if outcome.status == "already_done":
        print(f"skipped {description}: done in {outcome.record['record_path']} (same config, data and code; "
              f"resume=false runs it again)")
    elif outcome.status == "in_progress":
        print(f"skipped {description}: another job is running it ({outcome.holder})", file=sys.stderr)
        return None
    else:
        tracking.log_run(outcome.record, cfg, HydraConfig.get().runtime.output_dir)
        print(summary_table(outcome.record))
    return outcome.record["metrics"].get("wikitext2_ppl")


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:], CONF_DIR)
        check_overrides_under_null_sections(sys.argv[1:], CONF_DIR)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    register_configs()
    main()
