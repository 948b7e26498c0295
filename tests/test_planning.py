"""baseq.planning: its formulas against real modules and the code that trains, its time projection, its CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import baseq.methods.baseq.steps as baseq_steps
from baseq import planning
from baseq.config import QuantConfig, register_configs
from baseq.errors import UserError
from baseq.methods import METHODS
from baseq.methods.baseq import BaseQConfig
from baseq.methods.base import MethodContext
from baseq.models.families import family_of
from baseq.training import TrainingLog
from conftest import tiny_llama

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "experiments/results/fidelity_h200/session4/runs/20261202T052023Z_qwen2.5-coder-0.5b_baseq_w4a4kv4_eb03e0.json"
TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            vocab_size=256)
register_configs()


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_block_and_model_bytes_are_those_of_real_transformers_modules(family, dtype):
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    model = model_class(config_class(**TINY, tie_word_embeddings=False)).to(dtype)
    shape = planning.ModelShape(**TINY, attention_bias=family == "qwen2")
    dtype_bytes = torch.finfo(dtype).bits // 8
    assert planning.block_weights(shape, dtype_bytes) == parameter_bytes(model.model.layers[0])
    assert planning.eval_model_weights(shape, dtype_bytes, head_untied=True) == parameter_bytes(model)


def test_tied_head_counts_once_until_a_rotation_unties_it():
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True))
    shape = planning.ModelShape(**TINY, tie_word_embeddings=True)
    assert planning.non_block_weights(shape, 4, head_untied=False) == parameter_bytes(model) - 2 * parameter_bytes(
        model.model.layers[0])
    assert planning.non_block_weights(shape, 4, head_untied=True) - planning.non_block_weights(shape, 4, False) == \
        TINY["vocab_size"] * TINY["hidden_size"] * 4


@pytest.mark.parametrize("overrides", [{}, {"rv_per_kv_head": False, "kv_bias": True, "kv_clip_per_head": False},
                                       {"paired_scale": False, "unpaired_scale": False}],
                         ids=["default", "shared-rv-kv-bias", "no-scales"])
def test_trained_parameter_counts_are_what_baseq_hands_the_optimizer(monkeypatch, overrides):
    """BASE-Q runs for real on a tiny model; train_block only records the parameter groups it is given."""
    handed = []

    def record_groups(block, inputs, targets, kwargs, groups, *args, **kwds):
        handed.append({g.name: sum(p.numel() for p in g.params) for g in groups})
        return TrainingLog([])

    monkeypatch.setattr(baseq_steps, "train_block", record_groups)
    model = tiny_llama(hidden=64, ffn=160, heads=4, kv_heads=2, layers=2, dtype=torch.float32)
    method = OmegaConf.structured(BaseQConfig(name="baseq", algorithm="baseq", stage1_epochs=1, stage2_epochs=1,
                                              train_batch_size=2, **overrides))
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    ctx = MethodContext(method=method, quant=OmegaConf.structured(QuantConfig(name="w4a4kv4", w_clip_search="none")),
                        device=torch.device("cpu"), seed=0, load_calibration=lambda: ids)
    METHODS["baseq"].quantize(model, family_of(model), ctx)

    planned = planning.baseq_trained_parameters(planning.ModelShape(**TINY),
                                                OmegaConf.to_container(method, resolve=True, enum_to_str=True))
    assert handed == [planned["stage1"], planned["stage2"]] * 2   # two blocks, stage 1 then stage 2


def baseq_method_dict(**overrides) -> dict:
    cfg = OmegaConf.structured(BaseQConfig(name="baseq", algorithm="baseq", stage1_epochs=3, stage2_epochs=5,
                                           **overrides))
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def synthetic_record(num_layers=None) -> dict:
    return {"config": {"model": {"name": "llama-2-7b", "path": "meta-llama/Llama-2-7b-hf", "num_layers": num_layers},
                       "method": baseq_method_dict(), "calib": {"nsamples": 128, "seqlen": 2048}},
            "timings_s": {"quantize.stage1": 320.0, "quantize.gptq": 64.0, "quantize.stage2": 480.0,
                          "quantize": 960.0},
            "environment": {"gpu": "a GPU"}}


def facts(nsamples=128, **method) -> planning.RunFacts:
    return planning.RunFacts(algorithm="baseq", method_name="baseq", method=baseq_method_dict(**method), quant={},
                             calib={"nsamples": nsamples, "seqlen": 2048}, eval_ppl=None, dtype="float16",
                             dtype_bytes=2, device_type="cuda")


def test_time_projection_is_a_linear_flop_scaling_of_the_measured_block():
    shape = planning.model_shape({"name": "llama-2-7b", "path": "meta-llama/Llama-2-7b-hf"})
    same = planning.project_calibration_time(synthetic_record(), "rec", shape, facts())
    assert same["record_blocks"] == 32 and same["seconds"] == pytest.approx(960.0)
    assert same["stages"]["other"]["record_seconds_per_block"] == pytest.approx(96.0 / 32)

    deeper = planning.ModelShape(**{**planning.asdict(shape), "num_hidden_layers": 64})
    assert planning.project_calibration_time(synthetic_record(), "rec", deeper, facts())["seconds"] == \
        pytest.approx(2 * 960.0)

    # twice the calibration tokens: twice the FLOPs of every token-proportional stage, so twice its time
    double = planning.project_calibration_time(synthetic_record(), "rec", shape, facts(nsamples=256))
    for name in ("stage1", "stage2", "other"):
        assert double["stages"][name]["flop_ratio"] == pytest.approx(2.0)
        assert double["stages"][name]["seconds_per_block"] == pytest.approx(2 * same["stages"][name]["seconds_per_block"])
    gptq = double["stages"]["gptq"]
    assert gptq["seconds_per_block"] == pytest.approx(gptq["record_seconds_per_block"] * gptq["flops_per_block"]
                                                      / gptq["record_flops_per_block"])

    # a record of the first 8 blocks: its per-block time is its time over 8
    short = planning.project_calibration_time(synthetic_record(num_layers=8), "rec", shape, facts())
    assert short["seconds"] == pytest.approx(4 * 960.0)


def test_time_projection_refuses_records_it_cannot_use():
    shape = planning.model_shape({"name": "llama-2-7b", "path": "meta-llama/Llama-2-7b-hf"})
    unfinished = synthetic_record()
    del unfinished["timings_s"]
    with pytest.raises(UserError, match="no timings_s.quantize"):
        planning.project_calibration_time(unfinished, "rec", shape, facts())
    other_method = synthetic_record()
    other_method["config"]["method"] = {"name": "quarot", "algorithm": "quarot", "weights": "gptq"}
    with pytest.raises(UserError, match="quarot run"):
        planning.project_calibration_time(other_method, "rec", shape, facts())


def test_cli_plans_llama2_70b_baseq_and_writes_the_same_numbers(capsys, tmp_path):
    out = tmp_path / "plan.json"
    code = planning.main(["model=llama-2-70b", "method=baseq", "device=cuda", "--from-record", str(RECORD),
                          "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    plan = json.loads(out.read_text())
    assert "device peak, eager model" in printed and "host peak, lazy model" in printed
    assert f"{plan['device_peak']['lazy']['gib']:.2f} GiB" in printed
    assert f"{plan['host']['eager']['gib']:.2f} GiB" in printed
    assert plan["shape"]["num_hidden_layers"] == 80 and plan["load_dtype"] == "float16"
    assert plan["calib"] == {"dataset": "wikitext2", "nsamples": 128, "seqlen": 2048, "batch_size": 1}
    assert "linear FLOP scaling" in printed and RECORD.name in printed and plan["time"]["blocks"] == 80
    # the host rows: the eager model (and its compare_with copy) against one block at a time
    assert plan["host"]["eager"]["bytes"] > 50 * plan["host"]["lazy"]["bytes"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks that device=cuda still fails without a GPU")
def test_planning_puts_the_runs_own_resolvers_back():
    planning.make_plan(["model=llama-2-7b", "device=cuda"])
    config = OmegaConf.create({"device": "cuda", "value": "${by_device:${device},1,2}"})
    with pytest.raises(Exception, match="no CUDA GPU"):
        OmegaConf.to_container(config, resolve=True)


def test_unknown_model_without_shape_is_one_line_error(capsys):
    assert planning.main(["model=local", "model.path=/nonexistent/model-folder"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no shape known for model 'local'") and "--shape" in err and "\n" not in err
    # with --shape the same model plans
    assert planning.main(["model=local", "model.path=/nonexistent/model-folder", "--shape",
                          "hidden_size=64,intermediate_size=160,num_attention_heads=4,num_hidden_layers=2,vocab_size=256"]) == 0
    assert "device peak" in capsys.readouterr().out


def test_module_entry_point_exits_nonzero_with_one_line():
    out = subprocess.run([sys.executable, "-m", "baseq.planning", "model=local", "model.path=/nonexistent/model-folder"],
                         cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode != 0 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: ")


def test_a_local_folder_plans_from_its_config_json(tmp_path, capsys):
    Qwen2Config(**TINY, tie_word_embeddings=True).save_pretrained(tmp_path)
    shape = planning.model_shape({"name": "local", "path": str(tmp_path)})
    assert shape == planning.ModelShape(**TINY, tie_word_embeddings=True, checkpoint_dtype=shape.checkpoint_dtype,
                                        attention_bias=True, source=shape.source)
    assert str(tmp_path / "config.json") in shape.source
    # --shape changes a known shape; model.num_layers keeps the first blocks
    changed = planning.model_shape({"name": "local", "path": str(tmp_path), "num_layers": 1}, {"vocab_size": 512})
    assert changed.vocab_size == 512 and changed.num_hidden_layers == 1


def test_a_record_of_an_unknown_model_is_refused_in_one_line():
    shape = planning.model_shape({"name": "llama-2-7b", "path": "meta-llama/Llama-2-7b-hf"})
    record = synthetic_record()
    record["config"]["model"] = {"name": "local", "path": "/somewhere/else.gguf"}
    with pytest.raises(UserError, match="no shape known for the record's model 'local'"):
        planning.project_calibration_time(record, "rec", shape, facts())


def test_zero_shot_reads_a_lazy_model_whole():
    plan = planning.make_plan(["model=llama-2-7b", "model.lazy=true", "eval=full", "compare_with=[]"])
    whole = plan["eval_phases"]["zeroshot"]["bytes"]
    assert plan["host"]["lazy"]["bytes"] == whole   # every block read into host memory for lm-eval
    assert plan["device_peak"]["lazy"]["bytes"] >= whole
    plain = planning.make_plan(["model=llama-2-7b", "model.lazy=true", "eval=ppl", "compare_with=[]"])
    assert plain["host"]["lazy"]["bytes"] < whole / 10 and plain["eval_phases"]["zeroshot"] is None
