"""Adding a method touches one place: a module in src/baseq/methods/ (its schema, checks, quantize and
registration) plus its presets under conf/method/. The end-to-end test adds a toy method to a copy of the
tree and runs run.py on it; nothing else in the copy is edited."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from baseq.config import register_configs, validate
from baseq.errors import UserError
from baseq.methods import registry
from baseq.methods.base import MethodConfig
from conftest import REPO

TOY_MODULE = '''"""Toy: rounds every decoder-block linear weight to a multiple of method.step (a test method)."""

from dataclasses import dataclass

from ..errors import UserError
from .base import MethodConfig
from .registry import register


@dataclass
class ToyConfig(MethodConfig):
    step: float = 0.01


def validate(cfg) -> None:
    if not cfg.method.step > 0:
        raise UserError(f"method.step={cfg.method.step} must be > 0")


def quantize(model, family, ctx) -> None:
    import torch

    rounded = 0
    with torch.no_grad():
        for block in family.blocks(model):
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_((module.weight / ctx.method.step).round() * ctx.method.step)
                    rounded += 1
    ctx.report["rounded_linears"] = rounded


register("toy", schema=ToyConfig, quantize=quantize, label="Toy", validate=validate)
'''

TOY_PRESET = """defaults: [toy_schema, _self_]
name: toy
algorithm: toy
step: 0.05
"""


def run_in(tree: Path, *args, timeout=600):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0",
           "PYTHONPATH": os.pathsep.join(str(tree / p) for p in ("src", "kernels", "."))}
    return subprocess.run([sys.executable, *args], cwd=tree, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_a_toy_method_in_one_module_runs_through_run_py(tiny_model_dirs, tiny_data_root, tmp_path):
    tree = tmp_path / "tree"
    for part in ("src", "conf", "kernels", "analysis"):
        shutil.copytree(REPO / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "run.py", tree / "run.py")
    (tree / "src/baseq/methods/toy.py").write_text(TOY_MODULE)
    (tree / "conf/method/toy.yaml").write_text(TOY_PRESET)
    results = tmp_path / "results"
    args = ["run.py", "method=toy", "model=local", f"model.path={tiny_model_dirs['llama']}",
            f"data_root={tiny_data_root}", f"results_dir={results}", "device=cpu", "calib.nsamples=4",
            "calib.seqlen=32", "eval.ppl.seqlen=32", "eval.ppl.max_windows=3", "compare_with=[fp]"]

    out = run_in(tree, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    [record] = [json.loads(p.read_text()) for p in (results / "runs").glob("*.json")]
    assert record["status"] == "done" and record["method"] == "toy"
    assert record["config"]["method"]["step"] == 0.05               # composed on its schema, from its preset
    assert record["metrics"]["method_report"]["rounded_linears"] == 14   # 2 blocks x 7 linears: it ran
    assert record["metrics"]["wikitext2_ppl"] != record["metrics"]["compare"]["fp"]["wikitext2_ppl"]

    bad = run_in(tree, *args, "method.step=0", f"results_dir={tmp_path / 'bad'}")   # its own check
    assert bad.returncode == 1 and "method.step=0.0 must be > 0" in bad.stderr and "Traceback" not in bad.stderr

    label = run_in(tree, "-c", "from analysis.tables import method_label; print(method_label('toy'))")
    assert label.stdout.strip() == "Toy", label.stderr


def test_composing_a_config_imports_no_torch():
    """Config composition imports every method module for its schema; torch and transformers must wait for a
    run (config errors, analysis and planning come without them)."""
    out = run_in(REPO, "-c", "import sys; import baseq.config, baseq.planning, analysis.tables; "
                             "baseq.config.register_configs(); "
                             "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_method_config_must_be_built_on_the_method_schema():
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cpu", "method=fp", "method.algorithm=baseq"])
    with pytest.raises(UserError, match=r"method.algorithm=baseq needs its schema: .*\[baseq_schema, _self_\]"):
        validate(cfg)


def test_a_name_is_registered_once_and_a_schema_extends_method_config(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))

    def quantize(model, family, ctx):
        pass

    with pytest.raises(ValueError, match="'baseq' is registered twice"):
        registry.register("baseq", schema=MethodConfig, quantize=quantize, label="again")
    with pytest.raises(TypeError, match="must be MethodConfig or a dataclass subclassing it"):
        registry.register("other", schema=dict, quantize=quantize, label="Other")
