"""run.py end to end on tiny random models: records, comparisons, failures and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(args, cwd=REPO, env_extra=None, timeout=600):
    """`python run.py ARGS` in a fresh interpreter: for what only a process shows (exit codes, one-line CLI
    errors, signals, sweeps); each costs the imports of torch, transformers, hydra and lm-eval again."""
    import os
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_in_process(args) -> subprocess.CompletedProcess:
    """run.py ARGS executed in this process as `python run.py ARGS` executes it (runpy, as __main__, the same
    argv): for tests of what a run computes and records, without a fresh interpreter's imports. Its exit
    status comes back as returncode; stdout and stderr are captured; the logging handlers Hydra installs are
    removed afterwards."""
    import contextlib
    import io
    import logging
    import os
    import runpy

    loggers = [logging.getLogger(), logging.getLogger("hydra")]
    saved_loggers = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    saved_argv, saved_full_error = sys.argv[:], os.environ.get("HYDRA_FULL_ERROR")
    out, err = io.StringIO(), io.StringIO()
    code = 0
    os.environ["HYDRA_FULL_ERROR"] = "0"
    sys.argv = [str(REPO / "run.py"), *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO / "run.py"), run_name="__main__")
            except SystemExit as exit:   # what the interpreter would make of it
                if exit.code is None or isinstance(exit.code, int):
                    code = exit.code or 0
                else:
                    print(exit.code, file=sys.stderr)
                    code = 1
    finally:
        sys.argv = saved_argv
        if saved_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error
        for logger, handlers, level, propagate in saved_loggers:
            for handler in logger.handlers:
                if handler not in handlers:
                    handler.close()
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
    return subprocess.CompletedProcess(["run.py", *args], code, out.getvalue(), err.getvalue())


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


def tiny_args(model_dir, data_root, results, *extra):
    return ["model=local", f"model.path={model_dir}", f"data_root={data_root}", f"results_dir={results}",
            "device=cpu", "calib.nsamples=4", "calib.seqlen=32", "eval.ppl.seqlen=32", "eval.ppl.max_windows=3",
            *extra]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quarot_run_writes_done_record_with_comparisons(tiny_model_dirs, tiny_data_root, tmp_path, family):
    out = run_in_process(tiny_args(tiny_model_dirs[family], tiny_data_root, tmp_path, "method=quarot",
                                   "compare_with=[fp,rtn]"))
    assert out.returncode == 0, out.stderr[-3000:]
    [rec] = records(tmp_path)
    assert rec["status"] == "done" and rec["method"] == "quarot" and rec["quant"] == "w4a4kv4"
    ppl = rec["metrics"]["wikitext2_ppl"]
    assert ppl > 1 and rec["metrics"]["wikitext2_windows"] == 3
    assert set(rec["metrics"]["compare"]) == {"fp", "rtn"}
    assert rec["config"]["calib"]["nsamples"] == 4
    for stage in ("load_model", "quantize", "eval_ppl"):
        assert rec["timings_s"][stage] >= 0
    assert rec["peak_memory_gb"]["host"] > 0 and rec["versions"]["torch"]
    assert "wikitext2 ppl" in out.stdout and "quarot" in out.stdout


def test_rotation_only_run_matches_fp(tiny_model_dirs, tiny_data_root, tmp_path):
    out = run_in_process(tiny_args(tiny_model_dirs["qwen2"], tiny_data_root, tmp_path, "method=quarot",
                                   "quant=w16a16kv16", "compare_with=[fp]"))
    assert out.returncode == 0, out.stderr[-3000:]
    [rec] = records(tmp_path)
    fp = rec["metrics"]["compare"]["fp"]["wikitext2_ppl"]
    assert abs(rec["metrics"]["wikitext2_ppl"] - fp) / fp < 1e-4


def test_default_method_is_baseq_and_training_reaches_the_record(tiny_model_dirs, tiny_data_root, tmp_path):
    out = run_in_process(tiny_args(tiny_model_dirs["llama"], tiny_data_root, tmp_path, "method.stage1_epochs=1",
                                   "method.stage2_epochs=1"))
    assert out.returncode == 0, out.stderr[-3000:]
    [rec] = records(tmp_path)
    assert rec["status"] == "done" and rec["method"] == "baseq"
    blocks = rec["metrics"]["method_report"]["blocks"]
    assert len(blocks) == 2 and all(b["final_mse_quantized_inputs"] > 0 for b in blocks)
    assert rec["timings_s"]["quantize.stage1"] > 0 and rec["timings_s"]["quantize.stage2"] > 0
    assert set(rec["metrics"]["compare"]) == {"fp"}


def test_missing_model_path_fails_with_one_line_and_failed_record(tiny_data_root, tmp_path):
    out = run(tiny_args(tmp_path / "nope", tiny_data_root, tmp_path))
    assert out.returncode != 0
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
    [rec] = records(tmp_path)
    assert rec["status"] == "failed" and "does not exist" in rec["error"]["message"]
    assert rec["metrics"] == {}


@pytest.mark.parametrize("args, expected", [
    (["method=nosuch"], "unknown method 'nosuch'; available:"),
    (["model=llama-9b"], "unknown model 'llama-9b'; available:"),
    (["device=gpu"], "gpu"),
    (["calib.nsamplez=3"], "nsamplez"),
    (["quant.a_bits=5.5"], "a_bits"),
    (["method.act_clip_ratio=1.0"], "learned clip is a sigmoid"),
    (["method.loss=l1"], "loss"),
    (["eval.zeroshot.batch_size=16"], "eval=ppl has no zeroshot evaluation"),
    (["method.train_precision=fp8"], "train_precision"),
    (["eval=zeroshot", "eval.ppl.seqlen=512"], "eval=zeroshot has no ppl evaluation"),
])
def test_bad_config_fails_before_loading(args, expected, tmp_path):
    out = run([f"results_dir={tmp_path}", *args], timeout=120)
    assert out.returncode != 0
    assert expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_unsupported_hadamard_size_is_a_clear_error(tiny_data_root, tmp_path):
    from conftest import tiny_llama, train_tiny_tokenizer, SAMPLE_TEXT
    import torch

    tok = train_tiny_tokenizer(SAMPLE_TEXT)
    model = tiny_llama(hidden=40, ffn=80, heads=4, kv_heads=2, vocab=len(tok), dtype=torch.float32)  # head_dim 10
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = run(tiny_args(tmp_path / "m", tiny_data_root, tmp_path / "res", "method=quarot", "compare_with=[]"))
    assert out.returncode != 0
    assert "10" in out.stderr and "Hadamard" in out.stderr and "Traceback" not in out.stderr
    [rec] = records(tmp_path / "res")
    assert rec["status"] == "failed"


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = run([f"results_dir={tmp_path}", "device=cuda"], timeout=120)
    assert out.returncode != 0 and "no CUDA GPU" in out.stderr and "Traceback" not in out.stderr


def test_kernels_eval_records_the_runtime_ppl_next_to_the_fake_quant_ppl(tiny_model_dirs, tiny_data_root, tmp_path):
    import os

    args = tiny_args(tiny_model_dirs["llama"], tiny_data_root, tmp_path, "method=quarot", "compare_with=[]",
                     "eval.kernels=true")
    # Triton reads TRITON_INTERPRET when the kernels are defined: in this process if it was set at its start (as
    # conftest does without a GPU), else in a fresh interpreter
    if os.environ.get("TRITON_INTERPRET") == "1":
        out = run_in_process(args)
    else:
        out = run(args, env_extra={"TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    [rec] = records(tmp_path)
    metrics = rec["metrics"]
    assert abs(metrics["wikitext2_ppl_kernels"] / metrics["wikitext2_ppl"] - 1) < 5e-3
    assert metrics["kernels_vs_fake_ppl"] == pytest.approx(metrics["wikitext2_ppl_kernels"] / metrics["wikitext2_ppl"] - 1)
    assert rec["timings_s"]["eval_ppl_kernels"] > 0


def test_kernels_eval_without_a_gpu_is_one_line(tiny_model_dirs, tiny_data_root, tmp_path):
    out = run(tiny_args(tiny_model_dirs["llama"], tiny_data_root, tmp_path, "method=quarot", "compare_with=[]",
                        "eval.kernels=true"), env_extra={"TRITON_INTERPRET": "0"})
    assert out.returncode != 0
    assert "eval.kernels=true" in out.stderr and "Traceback" not in out.stderr
    [rec] = records(tmp_path)
    assert rec["status"] == "failed"


def test_authors_recipe_and_quarot_record_what_could_not_apply(tiny_model_dirs, tiny_data_root, tmp_path):
    # tiny models: hidden 64, 4 heads of 16. The authors' preset with one epoch per stage, and QuaRot (with its
    # cross-head o_proj Hadamard) compared in the same job
    out = run_in_process(tiny_args(tiny_model_dirs["qwen2"], tiny_data_root, tmp_path, "method=baseq_authors",
                                   "method.stage1_epochs=1", "method.stage2_epochs=1", "compare_with=[quarot]"))
    assert out.returncode == 0, out.stderr[-3000:]
    [rec] = records(tmp_path)
    method = rec["config"]["method"]
    assert method["residual_rotation"] == "hadamard_unsigned" and method["stage1_quantizers"] == "down_proj"
    assert method["gptq"]["act_order"] and method["gptq"]["normalize_tokens"] and method["bias_init"] == "zero"
    assert method["train_batch_size"] == 2 and method["lr"]["eta_min_stage2"] == 3e-6
    blocks = rec["metrics"]["method_report"]["blocks"]
    assert blocks[0]["learned"]["k_cache"]["clip"][0] != pytest.approx(0.8808, abs=1e-6)   # it learned
    # 4 heads have a Hadamard: QuaRot's cross-head transform applies and nothing needs saying
    assert "notes" not in rec["metrics"]["compare"]["quarot"].get("method_report", {})
    assert rec["metrics"]["wikitext2_ppl"] > 1


def test_summary_table_shows_what_a_method_could_not_apply():
    from baseq.pipeline import summary_table

    note = "o_proj_hadamard=cross_heads: no Hadamard of order 9 (the head count); using ..."
    record = {"model": "m", "quant": "w4a4kv4", "protocol": "full", "method": "quarot", "record_path": "r.json",
              "metrics": {"wikitext2_ppl": 42.0, "wikitext2_windows": 3, "method_report": {"notes": [note]},
                          "compare": {"fp": {"wikitext2_ppl": 21.0}}}}
    table = summary_table(record)
    assert f"note (quarot): {note}" in table and "+21.000" in table
