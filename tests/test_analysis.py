"""python -m analysis.tables on synthetic records: which runs count, one set of tables per protocol, runs of
no protocol listed apart with the reason, blanks for missing runs, the gap-closed arithmetic, the paper's
reference numbers, where each number comes from and the written files."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # `analysis` is a top-level folder of the checkout, not part of the package

from analysis import protocol, tables  # noqa: E402

TASKS = tables.TASKS
H100_RECORDS = REPO / "experiments" / "results" / "smollm2_h100"


def record(results: Path, run_id: str, model: str, method: str, ppl: float | None = None, acc: float | None = None,
           quant: str = "w4a4kv4", status: str = "done", finished_at: str = "2026-01-01T00:00:00",
           run_protocol: str = "full", config: dict | None = None, **metrics):
    """A record as pipeline.run_job writes it; `config` holds only the keys a test sets (keys a record lacks
    are not compared with the protocol's defaults)."""
    if ppl is not None:
        metrics["wikitext2_ppl"] = ppl
    if acc is not None:   # per-task scores acc-4 .. acc+4: their mean is acc
        metrics["zeroshot"] = {t: acc + k - 4 for k, t in enumerate(TASKS)}
        metrics["zeroshot_avg"] = acc
    (results / "runs").mkdir(parents=True, exist_ok=True)
    (results / "runs" / f"{run_id}.json").write_text(json.dumps(
        {"run_id": run_id, "status": status, "model": model, "method": method, "quant": quant,
         "protocol": run_protocol, "finished_at": finished_at, "metrics": metrics,
         "config": {"device": "cuda" if run_protocol == "full" else "cpu", **(config or {})}}))


@pytest.fixture
def results(tmp_path) -> Path:
    r = tmp_path / "results"
    record(r, "fp", "llama-2-7b", "fp", 5.5, 65.0, quant="w16a16kv16")
    record(r, "quarot-old", "llama-2-7b", "quarot", 9.9, 10.0, finished_at="2025-12-01T00:00:00")
    record(r, "quarot", "llama-2-7b", "quarot", 6.5, 61.0)
    record(r, "quarot-failed", "llama-2-7b", "quarot", 99.0, 1.0, status="failed", finished_at="2027-01-01T00:00:00")
    record(r, "quarot-w4a8", "llama-2-7b", "quarot", 5.6, 64.0, quant="w4a8kv8")
    record(r, "spinquant", "llama-2-7b", "spinquant", 6.0, 62.0)
    record(r, "baseq", "llama-2-7b", "baseq", 5.75, 63.0)
    for rung, ppl in (("quarot", 6.5), ("rv", 6.4), ("rv_bias", 6.2), ("full", 5.75)):
        record(r, f"abl-{rung}", "llama-2-7b", f"baseq_ablation/{rung}", ppl)
    # a default run: quarot with full precision and RTN as comparisons inside it
    record(r, "smol", "smollm2-135m", "quarot", 30.0, compare={"fp": {"wikitext2_ppl": 22.0},
                                                                 "rtn": {"wikitext2_ppl": 500.0}})
    # newer runs of no protocol or of another one never replace the full-protocol numbers above
    record(r, "smoke", "smollm2-135m", "quarot", 9e7, finished_at="2027-01-01T00:00:00",
           config={"model": {"num_layers": 4}})
    record(r, "one-epoch", "llama-2-7b", "baseq", 2.2e10, finished_at="2027-01-01T00:00:00",
           config={"method": {"stage1_epochs": 1}, "calib": {"nsamples": 128}},
           compare={"fp": {"wikitext2_ppl": 5.4}})
    record(r, "cpu", "llama-2-7b", "quarot", 70.0, finished_at="2027-01-01T00:00:00", run_protocol="cpu-preset",
           config={"calib": {"nsamples": 4, "seqlen": 256}, "eval": {"name": "ppl", "ppl": {"max_windows": 4}}})
    return r


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_writes_every_table_and_plot(results, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis.tables", str(results), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"full", "cpu-preset", "excluded.md", "excluded.csv"}
    out = tmp_path / "out" / "full"
    assert (out / "sources.csv").stat().st_size > 0
    for name in ("table1", "table2", "appendix_a", "gap_closed"):
        for ext in ("md", "tex", "csv"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    for png in ("ppl_by_method.png", "accuracy_by_method.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "\\begin{tabular}" in (out / "table1.tex").read_text()
    bad = subprocess.run([sys.executable, "-m", "analysis.tables", str(tmp_path / "nothing")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "has no runs/ folder" in bad.stderr
    only = subprocess.run([sys.executable, "-m", "analysis.tables", str(results), "--out", str(tmp_path / "only"),
                           "--protocol", "cpu-preset"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert only.returncode == 0, only.stderr
    assert not (tmp_path / "only" / "full").exists() and (tmp_path / "only" / "cpu-preset" / "table1.md").is_file()


def test_table1_counts_the_newest_done_run_and_leaves_missing_ones_blank(results, tmp_path):
    tables.write_all(results, tmp_path)
    t1 = {(r["model"], r["method"]): r for r in rows(tmp_path / "full" / "table1.csv")}
    quarot = t1[("llama-2-7b", "QuaRot")]
    assert float(quarot["Wiki2 ppl"]) == 6.5 and float(quarot["0-shot avg"]) == 61.0   # not old, failed, w4a8, cpu
    assert float(t1[("llama-2-7b", "Full precision")]["Wiki2 ppl"]) == 5.5              # fp of any preset
    ost = t1[("llama-2-7b", "OSTQuant")]
    assert ost["Wiki2 ppl"] == "" and ost["0-shot avg"] == ""                            # blank, never 0
    assert float(ost["Wiki2 ppl (paper)"]) == 5.92 and float(ost["0-shot avg (paper)"]) == 62.08
    # comparison methods inside a record count as runs
    assert float(t1[("smollm2-135m", "Full precision")]["Wiki2 ppl"]) == 22.0
    assert float(t1[("smollm2-135m", "QuaRot")]["Wiki2 ppl"]) == 30.0
    assert float(t1[("llama-2-7b", "BASE-Q")]["Wiki2 ppl"]) == 5.75           # not the one-epoch run's
    assert not any("blocks" in model for model, _ in t1)
    assert t1[("smollm2-135m", "Full precision")]["Wiki2 ppl (paper)"] == ""
    md = (tmp_path / "full" / "table1.md").read_text()
    assert "protocol full" in md
    assert "| llama-2-7b | BASE-Q | 63.00 | 62.50? | 5.75 | 5.85? |" in md   # uncertain transcriptions marked
    # --quant picks another preset
    tables.write_all(results, tmp_path / "w4a8", quant="w4a8kv8")
    t1 = {(r["model"], r["method"]): r for r in rows(tmp_path / "w4a8" / "full" / "table1.csv")}
    assert float(t1[("llama-2-7b", "QuaRot")]["Wiki2 ppl"]) == 5.6


def test_table2_is_the_ladder_in_order_with_changes(results, tmp_path):
    tables.write_all(results, tmp_path)
    t2 = [r for r in rows(tmp_path / "full" / "table2.csv") if r["model"] == "llama-2-7b"]
    assert [r["method"] for r in t2] == ["QuaRot", "+ learned R_v", "+ bias correction",
                                         "+ unpaired (asymmetric) scale", "+ paired scale (BASE-Q)", "SpinQuant",
                                         "OSTQuant"]
    assert [r["Wiki2 ppl"] for r in t2[:5]] == ["6.5", "6.4", "6.2", "", "5.75"]
    assert t2[1]["change"] == "-0.1" and t2[4]["change"] == ""      # no change across a missing rung
    assert [r["Wiki2 ppl (paper)"] for r in t2] == ["6.12", "6.18", "6.12", "5.92", "5.85", "5.99", "5.92"]
    assert float(t2[1]["change (paper)"]) == pytest.approx(0.06)
    assert {r["model"] for r in rows(tmp_path / "full" / "table2.csv")} == {"llama-2-7b", "qwen2.5-3b", "llama-3-8b"}


def test_appendix_has_ours_and_the_papers_per_task(results, tmp_path):
    tables.write_all(results, tmp_path)
    a = {(r["model"], r["method"], r["source"]): r for r in rows(tmp_path / "full" / "appendix_a.csv")}
    ours = a[("llama-2-7b", "BASE-Q", "ours")]
    assert [float(ours[label]) for label in tables.TASK_LABELS] == [59.0 + k for k in range(9)]
    paper_fp = a[("llama-2-7b", "Full precision", "paper")]
    assert float(paper_fp["ARC-c"]) == 46.33 and float(paper_fp["WinoG."]) == 69.06
    assert a[("smollm2-135m", "RTN", "ours")]["Wiki2"] == "500.0"


def test_gap_closed_follows_the_design_formula(results, tmp_path):
    tables.write_all(results, tmp_path)
    gap = {(r["model"], r["vs"]): r for r in rows(tmp_path / "full" / "gap_closed.csv")}
    g = gap[("llama-2-7b", "QuaRot")]
    assert float(g["acc gap closed"]) == pytest.approx(100 * (1 - (65 - 63) / (65 - 61)), abs=1e-3)
    assert float(g["ppl gap closed"]) == pytest.approx(100 * (1 - (5.75 - 5.5) / (6.5 - 5.5)), abs=1e-3)
    paper = 100 * (1 - (65.22 - 62.50) / (65.22 - 61.59))
    assert float(g["acc gap closed (paper)"]) == pytest.approx(paper, abs=1e-3)
    assert gap[("llama-2-7b", "OSTQuant")]["acc gap closed"] == ""
    assert float(gap[("all", "SpinQuant")]["acc gap closed"]) == pytest.approx(100 * (1 - 2 / 3), abs=1e-3)


def test_gap_closed_edge_cases():
    assert tables.gap_closed(65.0, 63.0, 65.0, higher_is_better=True) is None   # the baseline has no gap
    assert tables.gap_closed(None, 63.0, 61.0, higher_is_better=True) is None
    assert tables.gap_closed(5.0, 5.0, 6.0, higher_is_better=False) == pytest.approx(100.0)


def test_paper_reference_reproduces_the_papers_headline():
    """The paper: BASE-Q narrows the accuracy gap by 50.5% / 42.9% / 29.2% vs QuaRot / SpinQuant / OSTQuant over
    the eight models where every method ran; the transcription gives the same to within a rounding step."""
    headline = tables.paper_headline(tables.PaperReference(), "baseq")
    assert headline["quarot"] == pytest.approx(50.5, abs=0.1)
    assert headline["spinquant"] == pytest.approx(42.9, abs=0.1)
    assert headline["ostquant"] == pytest.approx(29.2, abs=0.15)
    ref = tables.PaperReference()
    # DESIGN.md section 10
    for model, method, ppl in (("llama-2-7b", "fp", 5.47), ("llama-3-8b", "quarot", 7.82), ("qwen2.5-3b", "baseq", 10.83),
                               ("llama-3.2-1b", "ostquant", 12.84), ("qwen2.5-3b", "baseq_ablation/rv", 54.38)):
        assert ref.value(model, method, "wikitext2_ppl").value == ppl


def test_a_newer_run_without_a_metric_does_not_hide_an_older_ones():
    from analysis.tables import FP_QUANT, Results, Run

    ppl_run = Run("m", "fp", FP_QUANT, "2026-01-01", "a", True, {"wikitext2_ppl": 21.6})
    zeroshot_run = Run("m", "fp", FP_QUANT, "2026-01-02", "b", True, {"zeroshot_avg": 40.9})
    baseq_run = Run("m", "baseq", "w4a4kv4", "2026-01-01", "c", True, {"wikitext2_ppl": 32.6})
    results = Results([ppl_run, zeroshot_run, baseq_run], "w4a4kv4")
    assert results.value("m", "fp", "wikitext2_ppl") == 21.6
    assert results.value("m", "fp", "zeroshot_avg") == 40.9
    assert results.value("m", "baseq_ablation/full", "wikitext2_ppl") == 32.6  # the ladder's top rung
    assert results.value("m", "quarot", "wikitext2_ppl") is None


def test_each_protocol_has_its_own_tables(results, tmp_path):
    tables.write_all(results, tmp_path)
    cpu = {(r["model"], r["method"]): r for r in rows(tmp_path / "cpu-preset" / "table1.csv")}
    assert float(cpu[("llama-2-7b", "QuaRot")]["Wiki2 ppl"]) == 70.0
    assert cpu[("llama-2-7b", "BASE-Q")]["Wiki2 ppl"] == ""        # the full-protocol runs are not here
    assert "protocol cpu-preset" in (tmp_path / "cpu-preset" / "table1.md").read_text()


def test_runs_of_no_protocol_are_listed_apart_with_the_reason(results, tmp_path):
    tables.write_all(results, tmp_path)
    excluded = {(r["run_id"], r["method"]): r for r in rows(tmp_path / "excluded.csv")}
    assert set(excluded) == {("smoke", "quarot"), ("one-epoch", "baseq")}   # not the fp comparison in one-epoch
    assert excluded[("smoke", "quarot")]["differs from the protocol"] == "model.num_layers=4 (full: null)"
    assert excluded[("one-epoch", "baseq")]["differs from the protocol"] == "method.stage1_epochs=1 (full: 3)"
    assert excluded[("one-epoch", "baseq")]["record"] == str(results / "runs" / "one-epoch.json")
    fp_in_custom = [r for r in tables.read_runs(results) if r.run_id == "one-epoch" and r.method == "fp"]
    assert [r.protocol for r in fp_in_custom] == ["full"]   # fp does not depend on BASE-Q's epochs
    assert "one-epoch" in (tmp_path / "excluded.md").read_text()


def test_sources_name_the_record_of_each_number(results, tmp_path):
    tables.write_all(results, tmp_path)
    src = {(r["model"], r["method"], r["metric"]): r for r in rows(tmp_path / "full" / "sources.csv")}
    quarot = src[("llama-2-7b", "quarot", "wikitext2_ppl")]
    assert quarot["run_id"] == "quarot" and float(quarot["value"]) == 6.5
    assert quarot["record"] == str(results / "runs" / "quarot.json")
    assert quarot["other_runs"] == "1"                                  # quarot-old, older
    assert src[("smollm2-135m", "rtn", "wikitext2_ppl")]["run_id"] == "smol"   # a comparison inside smol
    assert not any(r["run_id"] in ("smoke", "one-epoch", "cpu") for r in src.values())


def verdict(config: dict, run_protocol: str | None = "full", method: str = "baseq", **kw) -> protocol.Verdict:
    rec = {"model": "smollm2-135m", "method": method, "quant": "w4a4kv4", "config": config}
    if run_protocol:
        rec["protocol"] = run_protocol
    return protocol.classify(rec, **kw)


def test_protocol_defaults_come_from_conf_for_each_protocol():
    assert verdict({"calib": {"nsamples": 128, "seqlen": 2048}, "method": {"stage2_epochs": 5}}).protocol == "full"
    cpu = {"calib": {"nsamples": 4, "seqlen": 256}, "method": {"stage2_epochs": 1}, "quant": {"w_clip_search": "none"}}
    assert verdict(cpu, "cpu-preset").protocol == "cpu-preset"
    off = verdict({**cpu, "calib": {"nsamples": 128, "seqlen": 256}}, "cpu-preset")
    assert off.protocol == "custom" and off.differences == ("calib.nsamples=128 (cpu-preset: 4)",)
    # a switched-off component of the method, a limited zero-shot run, another seed: not the protocol
    assert verdict({"method": {"paired_scale": False}}).reason == "method.paired_scale=False (full: True)"
    assert verdict({"eval": {"name": "zeroshot", "zeroshot": {"limit": 20}}}).reason == \
        "eval.zeroshot.limit=20 (full: null)"
    assert verdict({"seed": 1}).protocol == "custom"
    # where results go, batch sizes, comparisons: the same numbers
    neutral = {"results_dir": "/x", "data_root": "/d", "compare_with": ["fp"], "eval": {"name": "full",
               "ppl": {"batch_size": 8}, "zeroshot": {"batch_size": 64}}, "model": {"path": "/elsewhere.gguf"}}
    assert verdict(neutral).protocol == "full"


def test_protocol_edge_cases():
    assert verdict({"device": "cuda"}, run_protocol=None).protocol == "full"      # older records: from the device
    unknown = verdict({"device": "auto"}, run_protocol=None)
    assert unknown.protocol == "custom" and "not one of" in unknown.reason
    assert verdict({}).reason == "the record has no config to compare with the protocol"
    # a method without a preset in conf/: its own settings are not compared, the rest is
    assert verdict({"method": {"epochs": 9}}, method="spinquant").protocol == "full"
    assert verdict({"calib": {"nsamples": 8}}, method="spinquant").protocol == "custom"
    # a comparison method runs at its defaults: the job's method overrides are not its
    assert verdict({"method": {"stage1_epochs": 1}}, compared_method="fp").protocol == "full"


def test_committed_h100_records_classify_as_their_configs_say():
    runs = {(r.run_id, r.method): r for r in tables.read_runs(H100_RECORDS)}
    custom = {run_id for (run_id, _), r in runs.items() if r.protocol == "custom"}
    memory_runs = {"20261122T135011Z_smollm2-135m_baseq_w4a4kv4_89e288",      # 10 blocks, 1 epoch, 4 windows
                   "20261122T135211Z_smollm2-135m_baseq_w4a4kv4_bf764b"}      # 30 blocks, 1 epoch, 4 windows
    # every BASE-Q-pipeline run of that day trained on fp block inputs, the default then; the default is
    # quantized inputs now, so they are not today's protocol, and say why
    fp_input_runs = {run_id for (run_id, method), r in runs.items() if method.startswith("baseq")}
    assert custom == memory_runs | fp_input_runs and len(fp_input_runs) == 7
    assert all("method.train_inputs=fp (full: quantized)" in runs[k].excluded_because
               for k in runs if k[0] in fp_input_runs)
    assert all(r.protocol == "full" for r in runs.values() if r.run_id not in custom)
    reason = runs[("20261122T135011Z_smollm2-135m_baseq_w4a4kv4_89e288", "baseq")].excluded_because
    assert "model.num_layers=10 (full: null)" in reason and "method.stage1_epochs=1 (full: 3)" in reason


def test_tables_read_several_results_dirs(tmp_path):
    h200 = REPO / "experiments" / "results" / "fidelity_h200"
    runs = tables.read_runs([H100_RECORDS, h200 / "session2"])
    assert {r.record_path for r in runs} >= {str(p) for p in (h200 / "session2" / "runs").glob("*.json")}
    written = tables.write_all([H100_RECORDS, h200 / "session2"], tmp_path, protocol="full")
    sources = (tmp_path / "full" / "sources.csv").read_text()
    assert "fidelity_h200" in sources and "smollm2_h100" in sources
    assert tmp_path / "excluded.md" in written


def test_a_run_stopped_in_zeroshot_still_gives_its_perplexity(tmp_path):
    r = tmp_path / "results"
    record(r, "done", "llama-2-7b", "quarot", 6.5, 61.0)
    stopped = r / "runs" / "stopped.json"
    record(r, "stopped", "llama-2-7b", "quarot", 6.3, 1.0, status="preempted", finished_at="2027-01-01T00:00:00")
    data = json.loads(stopped.read_text())
    # the perplexity stage finished; zero-shot did not (its partial numbers must not count)
    data["stages_done"] = ["load_model", "load_eval_data", "quantize", "eval_ppl"]
    stopped.write_text(json.dumps(data))
    record(r, "stopped-early", "llama-2-7b", "fp", 5.5, status="failed")   # no stage list: nothing counts
    tables.write_all(r, tmp_path / "out")
    t1 = {(row["model"], row["method"]): row for row in rows(tmp_path / "out" / "full" / "table1.csv")}
    assert float(t1[("llama-2-7b", "QuaRot")]["Wiki2 ppl"]) == 6.3
    assert float(t1[("llama-2-7b", "QuaRot")]["0-shot avg"]) == 61.0
    assert t1[("llama-2-7b", "Full precision")]["Wiki2 ppl"] == ""
    sources = {(row["method"], row["metric"]): row for row in rows(tmp_path / "out" / "full" / "sources.csv")}
    assert sources[("quarot", "wikitext2_ppl")]["status"] == "preempted"
    assert sources[("quarot", "zeroshot_avg")]["status"] == "done"
