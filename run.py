"""Entry point: python run.py [group=option ...] [key=value ...] (add -m for a sweep). See README.md."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from baseq.config import check_group_choices, register_configs, validate
from baseq.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose_method(name: str) -> DictConfig:
    """The full method config of `name` under this job's other overrides."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("method")]
    return compose(config_name="config", overrides=[*overrides, f"method={name}"]).method


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from baseq import sweep, tracking
    from baseq.pipeline import run_job, summary_table  # heavy (torch, transformers): after config checks

    try:
        validate(cfg)
        check_group_choices([f"method={name}" for name in cfg.compare_with], CONF_DIR)
        compare = {name: compose_method(name) for name in cfg.compare_with if name != cfg.method.name}
        key = sweep.run_key(cfg)
        outcome = sweep.run_once(cfg.results_dir, key, lambda: run_job(cfg, compare, run_key=key),
                                 resume=cfg.resume, description=sweep.describe(cfg))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if outcome.status == "already_done":
        print(f"skipped {sweep.describe(cfg)}: done in {outcome.record['record_path']} (resume=false runs it again)")
    elif outcome.status == "in_progress":
        print(f"skipped {sweep.describe(cfg)}: another job is running it ({outcome.holder})", file=sys.stderr)
        return None
    else:
        tracking.log_run(outcome.record, cfg, HydraConfig.get().runtime.output_dir)
        print(summary_table(outcome.record))
    return outcome.record["metrics"].get("wikitext2_ppl")


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:], CONF_DIR)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    register_configs()
    main()
