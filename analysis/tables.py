"""The paper's tables and plots, regenerated from run records.

    python -m analysis.tables <results_dir> [--out DIR] [--protocol full] [--quant w4a4kv4] [--method baseq]

Reads <results_dir>/runs/*.json and writes one set of tables per protocol (analysis/protocol.py: `full`,
`cpu-preset`) to <out>/<protocol>/ (--out default <results_dir>/analysis; --protocol: only that one):

    table1.{md,tex,csv}      zero-shot average and WikiText-2 ppl per model x method (fp, quarot, spinquant,
                             ostquant, baseq), ours next to the paper's
    table2.{md,tex,csv}      the ablation ladder: methods baseq_ablation/<rung> in the order of LADDER, with the
                             change from the previous rung, then SpinQuant and OSTQuant (the paper's Table 2)
    appendix_a.{md,tex,csv}  zero-shot accuracy per task (the paper's Appendix A, Tables 3-5)
    gap_closed.{md,tex,csv}  the share of the gap to full precision that --method closes relative to QuaRot,
                             SpinQuant and OSTQuant (DESIGN.md section 7), accuracy and ppl
    ppl_by_method.png, accuracy_by_method.png
    sources.csv              per (model, method, quant, metric) of ours: the run and record file it comes from

and <out>/excluded.{md,csv}: the runs of no protocol (`custom`: a config that differs from its protocol's
defaults in something that changes numbers, e.g. one training epoch or a model cut to 10 blocks), each with
the keys that differ. They are in no table: custom runs differ from one another too.

Which runs count: every metric of a "done" record, and from a record that did not finish (failed,
preempted, still running) the metrics of the stages it finished (its `stages_done`: eval_ppl for the
perplexity, eval_zeroshot for zero-shot), so a run stopped in zero-shot still gives its perplexity; sources.csv
gives each number's record and its status. A protocol's tables hold only runs of that protocol; per (model,
method, quant) the newest record (by finished_at). A
record's comparison methods (metrics.compare) count as runs of those methods, below standalone records of
the same key. Full precision ignores the quant preset, so fp runs of any preset are one key per model.
Missing runs are blank cells, never zeros. Accuracies are in percent, as the records and the paper hold them.

The paper's numbers are analysis/paper_reference.csv, transcribed from the paper's text (seeds/
base-q-paper.txt, an OCR of the PDF): one row per (source table, model, method, metric) with a confidence:
"ok" (legible), "uncertain" (a best reading; shown with a "?" suffix), "illegible" or "oom" (blank). Its
notes say where the paper's own numbers disagree (Table 1 vs the appendix, printed averages vs the mean of
the printed per-task values). Lookups prefer Table 1, then the appendix tables, then Table 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from analysis.protocol import CUSTOM, PROTOCOLS, classify
from baseq.methods import METHODS

TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "lambada_openai", "openbookqa", "piqa", "social_iqa",
         "winogrande")
TASK_LABELS = ("ARC-c", "ARC-e", "BoolQ", "HellaS.", "Lam.", "OBQA", "PIQA", "SIQA", "WinoG.")
TABLE1_METHODS = ("fp", "quarot", "spinquant", "ostquant", "baseq")
BASELINES = ("quarot", "spinquant", "ostquant")
# A method's label is the one it registers (baseq.methods); these are for the paper's methods this checkout
# does not have yet, whose reference numbers the tables show all the same. A registered label wins.
PAPER_METHOD_LABELS = {"spinquant": "SpinQuant", "ostquant": "OSTQuant"}
ABLATION_PREFIX = "baseq_ablation"
# The paper's Table 2, top to bottom: each rung adds one component to the one above.
LADDER = ("quarot", "rv", "rv_bias", "rv_bias_ascale", "full")
LADDER_LABELS = {"quarot": "QuaRot", "rv": "+ learned R_v", "rv_bias": "+ bias correction",
                 "rv_bias_ascale": "+ unpaired (asymmetric) scale", "full": "+ paired scale (BASE-Q)"}
# The paper's model order (Table 1); models of ours that are not in it follow, alphabetically.
MODEL_ORDER = ("qwen2.5-3b", "qwen2.5-14b", "qwen2.5-32b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.2-1b",
               "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.2-3b")
TABLE2_MODELS = ("qwen2.5-3b", "llama-2-7b", "llama-3-8b")
FP_QUANT = "-"   # the quant key of full-precision runs
METRICS = ("zeroshot_avg", "wikitext2_ppl", *TASKS)
REFERENCE_CSV = Path(__file__).with_name("paper_reference.csv")
REFERENCE_SOURCES = ("table1", "table3", "table4", "table5", "table2")


# ----------------------------------------------------------------------------------------------- records


@dataclass
class Run:
    model: str
    method: str
    quant: str
    finished_at: str
    run_id: str
    standalone: bool              # False: a comparison method inside another record
    metrics: dict[str, float]     # METRICS present in the record
    protocol: str = "full"        # analysis.protocol: full, cpu-preset or custom
    record_path: str = ""
    excluded_because: str = ""    # for custom runs: the keys that differ from the protocol's defaults
    status: str = "done"          # the record's status; a run that did not finish has only finished stages' metrics


# the record stage that measures each metric (zero-shot: the average and every task)
_STAGE_OF = {"wikitext2_ppl": "eval_ppl"}


def _counted_metrics(metrics: dict, record: dict, prefix: str = "") -> dict[str, float]:
    """The METRICS of a done record; of a record that did not finish, those whose stages did (stage names
    carry `prefix` for a comparison method inside the record)."""
    ours = _metrics_of(metrics)
    if record.get("status") == "done":
        return ours
    done = set(record.get("stages_done") or [])
    return {k: v for k, v in ours.items() if prefix + _STAGE_OF.get(k, "eval_zeroshot") in done}


def _metrics_of(metrics: dict) -> dict[str, float]:
    out = {}
    for key in ("zeroshot_avg", "wikitext2_ppl"):
        if isinstance(metrics.get(key), (int, float)):
            out[key] = float(metrics[key])
    for task, score in (metrics.get("zeroshot") or {}).items():
        if task in TASKS and isinstance(score, (int, float)):
            out[task] = float(score)
    return out


def _record_paths(results_dirs: str | Path | Iterable[str | Path]) -> list[Path]:
    dirs = [results_dirs] if isinstance(results_dirs, (str, Path)) else list(results_dirs)
    return [path for d in dirs for path in sorted((Path(d) / "runs").glob("*.json"))]


def read_runs(results_dirs: str | Path | Iterable[str | Path]) -> list[Run]:
    """Every record under <results_dir>/runs of one or several results_dirs with a metric that counts (see the
    module docstring), and the comparison methods inside them, each with its protocol."""
    runs = []
    for path in _record_paths(results_dirs):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"warning: skipping unreadable record {path}: {err}")
            continue
        status = record.get("status", "")
        complete = status == "done"
        stamp = record.get("finished_at") or record.get("started_at") or ""
        metrics = record.get("metrics") or {}
        model = _model_label(record)
        run_id = record.get("run_id", path.stem)
        verdict = classify(record)
        own = _counted_metrics(metrics, record)
        if own or complete:
            runs.append(Run(model, record["method"], _quant_key(record["method"], record["quant"]), stamp, run_id,
                            True, own, verdict.protocol, str(path), verdict.reason, status))
        for method, compared in (metrics.get("compare") or {}).items():
            verdict = classify(record, compared_method=method)
            theirs = _counted_metrics(compared, record, f"compare_{method}_")
            if theirs or complete:
                runs.append(Run(model, method, _quant_key(method, record["quant"]), stamp, run_id, False,
                                theirs, verdict.protocol, str(path), verdict.reason, status))
    return runs


def _model_label(record: dict) -> str:
    # a model cut to its first N blocks (model.num_layers, e.g. experiment=smoke) is another model
    blocks = ((record.get("config") or {}).get("model") or {}).get("num_layers")
    return f"{record['model']} ({blocks} blocks)" if blocks else record["model"]


def _quant_key(method: str, quant: str) -> str:
    return FP_QUANT if method == "fp" else quant


def runs_by_preference(runs: Iterable[Run]) -> dict[tuple[str, str, str], list[Run]]:
    """Per (model, method, quant), the runs in the order they count: standalone before comparison, then
    the newest first."""
    chosen: dict[tuple[str, str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.standalone, r.finished_at), reverse=True):
        chosen.setdefault((run.model, run.method, run.quant), []).append(run)
    return chosen


class Results:
    """Our numbers for one quant preset and one protocol: value(model, method, metric) or None. A metric
    comes from the first run (in runs_by_preference order) that measured it, so a zero-shot-only run does not
    hide the perplexity of an earlier run of the same configuration. Runs of other protocols are left out."""

    def __init__(self, runs: Iterable[Run], quant: str, protocol: str = "full"):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: tables exist for {', '.join(PROTOCOLS)} only")
        self.quant = quant
        self.protocol = protocol
        mine = [r for r in runs if r.protocol == protocol]
        self.by_key = {(m, me): r for (m, me, q), r in runs_by_preference(mine).items() if q in (quant, FP_QUANT)}

    def value(self, model: str, method: str, metric: str) -> float | None:
        run = self.source(model, method, metric)
        return None if run is None else run.metrics[metric]

    def source(self, model: str, method: str, metric: str) -> Run | None:
        """The run that value(model, method, metric) comes from."""
        for run in self.by_key.get((model, method), []):
            if metric in run.metrics:
                return run
        if method == f"{ABLATION_PREFIX}/full":  # the ladder's top rung is method=baseq with every switch on
            return self.source(model, "baseq", metric)
        return None

    def label(self) -> str:
        return f"{self.quant}, protocol {self.protocol}"

    def models(self) -> list[str]:
        return order_models({m for m, _ in self.by_key})

    def methods(self, model: str) -> list[str]:
        return [me for m, me in self.by_key if m == model]


def order_models(models: Iterable[str]) -> list[str]:
    models = set(models)
    return [m for m in MODEL_ORDER if m in models] + sorted(models - set(MODEL_ORDER))


# ---------------------------------------------------------------------------------------- paper numbers


@dataclass(frozen=True)
class PaperValue:
    value: float
    uncertain: bool


class PaperReference:
    """The paper's numbers (analysis/paper_reference.csv): value(model, method, metric) or None."""

    def __init__(self, path: Path = REFERENCE_CSV):
        self.cells: dict[tuple[str, str, str, str], PaperValue] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["value"].strip():
                    self.cells[(row["source"], row["model"], row["method"], row["metric"])] = PaperValue(
                        float(row["value"]), row["confidence"] == "uncertain")

    def value(self, model: str, method: str, metric: str) -> PaperValue | None:
        for source in REFERENCE_SOURCES:
            found = self.cells.get((source, model, method, metric))
            if found is not None:
                return found
        return None

    def models(self) -> list[str]:
        return order_models({model for _, model, _, _ in self.cells})


# ----------------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    """Rows of label strings, floats and None (blank); `uncertain` cells print with a '?' suffix."""
    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    uncertain: set[tuple[int, int]] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        row = []
        for j, cell in enumerate(cells):
            if isinstance(cell, PaperValue):
                if cell.uncertain:
                    self.uncertain.add((len(self.rows), j))
                cell = cell.value
            row.append(cell)
        self.rows.append(row)

    def text(self, i: int, j: int) -> str:
        cell = self.rows[i][j]
        if cell is None or (isinstance(cell, float) and math.isnan(cell)):
            return ""
        if isinstance(cell, float):
            return f"{cell:.2f}" + ("?" if (i, j) in self.uncertain else "")
        return str(cell)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" if self._is_label(j) else "---:" for j in range(len(self.columns))) + "|"]
        for i in range(len(self.rows)):
            lines.append("| " + " | ".join(self.text(i, j) for j in range(len(self.columns))) + " |")
        return "\n".join(lines + [""] + [f"{n}  " for n in self.notes]) + "\n"

    def latex(self) -> str:
        align = "".join("l" if self._is_label(j) else "r" for j in range(len(self.columns)))
        lines = [f"% {self.title}", f"\\begin{{tabular}}{{{align}}}", "\\toprule",
                 " & ".join(_tex(c) for c in self.columns) + " \\\\", "\\midrule"]
        for i in range(len(self.rows)):
            lines.append(" & ".join(_tex(self.text(i, j)) for j in range(len(self.columns))) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"] + [f"% {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            for row in self.rows:
                writer.writerow(["" if c is None else round(c, 4) if isinstance(c, float) else c for c in row])

    def write(self, out: Path) -> list[Path]:
        paths = [out / f"{self.name}.md", out / f"{self.name}.tex", out / f"{self.name}.csv"]
        paths[0].write_text(self.markdown())
        paths[1].write_text(self.latex())
        self.write_csv(paths[2])
        return paths

    def _is_label(self, j: int) -> bool:
        return any(isinstance(row[j], str) for row in self.rows)


def _tex(text: str) -> str:
    for char, escaped in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#")):
        text = text.replace(char, escaped)
    return text


def method_label(method: str) -> str:
    if method.startswith(ABLATION_PREFIX + "/"):
        rung = method.split("/", 1)[1]
        return LADDER_LABELS.get(rung, rung)
    if method in METHODS:
        return METHODS[method].label
    return PAPER_METHOD_LABELS.get(method, method)


UNCERTAIN_NOTE = ("? = uncertain transcription of the paper (analysis/paper_reference.csv); blank = no run / not "
                  "reported; the record of each of our numbers: sources.csv.")


def table1(ours: Results, paper: PaperReference) -> Table:
    table = Table("table1", f"Table 1: WikiText-2 ppl and 9-task zero-shot average, {ours.label()}",
                  ["model", "method", "0-shot avg", "0-shot avg (paper)", "Wiki2 ppl", "Wiki2 ppl (paper)"],
                  notes=[UNCERTAIN_NOTE])
    for model in ours.models():
        for method in TABLE1_METHODS:
            table.add(model, method_label(method),
                      ours.value(model, method, "zeroshot_avg"), paper.value(model, method, "zeroshot_avg"),
                      ours.value(model, method, "wikitext2_ppl"), paper.value(model, method, "wikitext2_ppl"))
    return table


def ladder_methods(methods: Iterable[str]) -> list[str]:
    """baseq_ablation/<rung> methods in ladder order; unknown rungs after, alphabetically."""
    rungs = {m.split("/", 1)[1] for m in methods if m.startswith(ABLATION_PREFIX + "/")}
    ordered = [r for r in LADDER if r in rungs] + sorted(rungs - set(LADDER))
    return [f"{ABLATION_PREFIX}/{r}" for r in ordered]


def table2(ours: Results, paper: PaperReference) -> Table:
    table = Table("table2", f"Table 2: ablation ladder, WikiText-2 ppl, {ours.label()} (change from the rung above)",
                  ["model", "method", "Wiki2 ppl", "change", "Wiki2 ppl (paper)", "change (paper)"],
                  notes=[UNCERTAIN_NOTE])
    ablated = [m for m in ours.models() if ladder_methods(ours.methods(m))]
    all_methods = {me for m in ablated for me in ours.methods(m)}
    ladder = ladder_methods([f"{ABLATION_PREFIX}/{r}" for r in LADDER] + list(all_methods))
    for model in order_models(set(ablated) | set(TABLE2_MODELS)):
        previous_ours = previous_paper = None
        for method in ladder:
            mine = ours.value(model, method, "wikitext2_ppl")
            theirs = paper.value(model, method, "wikitext2_ppl")
            table.add(model, method_label(method), mine, _delta(mine, previous_ours), theirs,
                      _delta(theirs.value if theirs else None, previous_paper))
            previous_ours, previous_paper = mine, theirs.value if theirs else None
        for method in ("spinquant", "ostquant"):
            table.add(model, method_label(method), ours.value(model, method, "wikitext2_ppl"), None,
                      paper.value(model, method, "wikitext2_ppl"), None)
    return table


def _delta(value: float | None, previous: float | None) -> float | None:
    return None if value is None or previous is None else value - previous


def appendix_a(ours: Results, paper: PaperReference) -> Table:
    table = Table("appendix_a", f"Appendix A: zero-shot accuracy per task (%), {ours.label()}",
                  ["model", "method", "source", *TASK_LABELS, "Avg.", "Wiki2"], notes=[UNCERTAIN_NOTE])
    for model in ours.models():
        present = ours.methods(model)
        methods = [m for m in TABLE1_METHODS] + sorted(set(present) - set(TABLE1_METHODS))
        for method in methods:
            table.add(model, method_label(method), "ours",
                      *(ours.value(model, method, m) for m in (*TASKS, "zeroshot_avg", "wikitext2_ppl")))
            reported = [paper.value(model, method, m) for m in (*TASKS, "zeroshot_avg", "wikitext2_ppl")]
            if any(reported):
                table.add(model, method_label(method), "paper", *reported)
    return table


def _gap(fp: float, value: float, higher_is_better: bool) -> float:
    """How far `value` is behind full precision (positive = worse)."""
    return fp - value if higher_is_better else value - fp


def gap_closed(fp: float | None, method: float | None, baseline: float | None, higher_is_better: bool) -> float | None:
    """1 - (FP - M) / (FP - B) in percent (DESIGN.md section 7; for ppl the gaps are M - FP and B - FP). None
    when a value is missing or the baseline has no gap to close."""
    if fp is None or method is None or baseline is None:
        return None
    gap_b = _gap(fp, baseline, higher_is_better)
    return None if gap_b <= 0 else 100.0 * (1.0 - _gap(fp, method, higher_is_better) / gap_b)


def mean_gap_closed(lookup, models: list[str], method: str, baseline: str, metric: str) -> float | None:
    """The paper's headline form: 1 - mean(gap of M) / mean(gap of B) over the models that have FP, M and B."""
    higher = metric != "wikitext2_ppl"
    gaps_m, gaps_b = [], []
    for model in models:
        fp, m, b = (lookup(model, x, metric) for x in ("fp", method, baseline))
        if None not in (fp, m, b):
            gaps_m.append(_gap(fp, m, higher))
            gaps_b.append(_gap(fp, b, higher))
    if not gaps_b or statistics.fmean(gaps_b) <= 0:
        return None
    return 100.0 * (1.0 - statistics.fmean(gaps_m) / statistics.fmean(gaps_b))


def gap_table(ours: Results, paper: PaperReference, method: str) -> Table:
    table = Table("gap_closed", f"Gap to full precision closed by {method_label(method)} (%), {ours.label()}",
                  ["model", "vs", "acc gap closed", "acc gap closed (paper)", "ppl gap closed",
                   "ppl gap closed (paper)"],
                  notes=["gap closed = 1 - (FP - M) / (FP - B) (DESIGN.md section 7; for ppl: lower is better). "
                         "'all' rows: 1 - mean(FP - M) / mean(FP - B) over the models with FP, M and B, the "
                         "paper's column over the same models."])

    def ours_value(model, m, metric):
        return ours.value(model, m, metric)

    def paper_value(model, m, metric):
        found = paper.value(model, m, metric)
        return found.value if found else None

    models = [m for m in ours.models() if ours.value(m, "fp", "wikitext2_ppl") is not None
              or ours.value(m, "fp", "zeroshot_avg") is not None]
    for model in models:
        for baseline in BASELINES:
            cells = []
            for metric in ("zeroshot_avg", "wikitext2_ppl"):
                higher = metric != "wikitext2_ppl"
                cells += [gap_closed(*(ours_value(model, x, metric) for x in ("fp", method, baseline)), higher),
                          gap_closed(*(paper_value(model, x, metric) for x in ("fp", method, baseline)), higher)]
            table.add(model, method_label(baseline), *cells)
    for baseline in BASELINES:
        cells = []
        for metric in ("zeroshot_avg", "wikitext2_ppl"):
            mine = mean_gap_closed(ours_value, models, method, baseline, metric)
            # the paper's column over the same models as ours (those with all three of ours)
            common = [m for m in models if None not in (ours_value(m, x, metric) for x in ("fp", method, baseline))]
            theirs = mean_gap_closed(paper_value, common, method, baseline, metric)
            cells += [mine, theirs]
        table.add("all", method_label(baseline), *cells)
    headline = paper_headline(paper, method)
    if headline:
        table.notes.append("The paper's headline recomputed from its tables (accuracy, over the models where it "
                           "reports every method): " + ", ".join(f"{v:.1f}% vs {method_label(b)}"
                                                                 for b, v in headline.items())
                           + " (its text: 50.5%, 42.9%, 29.2%).")
    return table


def paper_headline(paper: PaperReference, method: str) -> dict[str, float]:
    """The paper's 'gap narrowed by X%' numbers, recomputed from its Table 1 over the models where it reports
    every method (8 models: OSTQuant runs out of memory on the others)."""
    def value(model, m, metric):
        found = paper.value(model, m, metric)
        return found.value if found else None

    complete = [m for m in paper.models()
                if all(value(m, x, "zeroshot_avg") is not None for x in ("fp", method, *BASELINES))]
    out = {}
    for baseline in BASELINES:
        closed = mean_gap_closed(value, complete, method, baseline, "zeroshot_avg")
        if closed is not None:
            out[baseline] = closed
    return out


# ------------------------------------------------------------------------------------------------- plots


def plot_metric(ours: Results, paper: PaperReference, metric: str, path: Path, ylabel: str) -> Path:
    """One panel per model: our value per method (dots) and the paper's (crosses); missing runs are gaps.
    The y axis turns logarithmic when a panel's values span more than 4x (ppl of collapsed baselines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    models = ours.models()
    cols = min(3, max(1, len(models)))
    rows = max(1, math.ceil(len(models) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, model in zip(axes.flat, models):
        methods = [m for m in TABLE1_METHODS] + sorted(set(ours.methods(model)) - set(TABLE1_METHODS))
        mine = [(x, ours.value(model, m, metric)) for x, m in enumerate(methods)]
        mine = [(x, v) for x, v in mine if v is not None]
        reported = [(x, paper.value(model, m, metric)) for x, m in enumerate(methods)]
        reported = [(x, v.value) for x, v in reported if v is not None]
        if mine:
            ax.scatter(*zip(*mine), color="tab:blue", zorder=3, label="ours")
        if reported:
            ax.scatter(*zip(*reported), marker="x", color="black", zorder=3, label="paper")
        values = [v for _, v in mine + reported]
        if values and min(values) > 0 and max(values) / min(values) > 4:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xticks(range(len(methods)), [method_label(m) for m in methods], rotation=45, ha="right", fontsize=7)
        ax.set_xlim(-0.5, len(methods) - 0.5)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(model, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        if mine or reported:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- CLI


def sources_table(ours: Results) -> Table:
    """Where each of our numbers comes from: the run and record file that Results.value reads, and how many
    other runs of the same key measured the metric (older ones, or a comparison below a standalone run)."""
    table = Table("sources", f"Sources of our numbers, {ours.label()}",
                  ["model", "method", "quant", "metric", "value", "run_id", "record", "status", "finished_at",
                   "other_runs"])
    for (model, method), runs in sorted(ours.by_key.items()):
        for metric in METRICS:
            run = ours.source(model, method, metric)
            if run is not None:
                others = sum(metric in r.metrics for r in runs) - 1
                table.add(model, method, run.quant, metric, run.metrics[metric], run.run_id, run.record_path,
                          run.status, run.finished_at, str(others))
    return table


def excluded_table(runs: Iterable[Run]) -> Table:
    """The runs of no protocol, with the reason; they appear in no table."""
    table = Table("excluded", "Runs in no table: their config differs from their protocol's defaults",
                  ["model", "method", "quant", "run_id", "record", "differs from the protocol"],
                  notes=["analysis/protocol.py says which keys count; compare_with, paths and batch sizes do not."])
    for run in sorted(runs, key=lambda r: (r.record_path, not r.standalone, r.method)):
        if run.protocol == CUSTOM:
            table.add(run.model, run.method, run.quant, run.run_id, run.record_path, run.excluded_because)
    return table


def write_protocol(runs: list[Run], out: Path, protocol: str, quant: str, method: str,
                   paper: PaperReference) -> list[Path]:
    """Every table and plot of one protocol, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    ours = Results(runs, quant, protocol)
    written: list[Path] = []
    for table in (table1(ours, paper), table2(ours, paper), appendix_a(ours, paper), gap_table(ours, paper, method)):
        written += table.write(out)
    sources = out / "sources.csv"
    sources_table(ours).write_csv(sources)
    written.append(sources)
    if ours.models():
        written.append(plot_metric(ours, paper, "wikitext2_ppl", out / "ppl_by_method.png", "WikiText-2 ppl"))
        written.append(plot_metric(ours, paper, "zeroshot_avg", out / "accuracy_by_method.png", "zero-shot avg (%)"))
    return written


def write_all(results_dirs: str | Path | Iterable[str | Path], out: str | Path | None = None,
              quant: str = "w4a4kv4", method: str = "baseq", reference: Path = REFERENCE_CSV,
              protocol: str | None = None) -> list[Path]:
    """Tables of each protocol found in the records of one or several results_dirs (or only `protocol`)
    into <out>/<protocol>/ (default: <first results_dir>/analysis), and the list of excluded runs into
    <out>/excluded.{md,csv}."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"--protocol {protocol}: choose one of {', '.join(PROTOCOLS)}")
    dirs = [results_dirs] if isinstance(results_dirs, (str, Path)) else list(results_dirs)
    out = Path(out) if out else Path(dirs[0]) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    runs = read_runs(dirs)
    paper = PaperReference(reference)
    found = [p for p in PROTOCOLS if any(r.protocol == p for r in runs)]
    written: list[Path] = []
    for name in [protocol] if protocol else found:
        written += write_protocol(runs, out / name, name, quant, method, paper)
    excluded = excluded_table(runs)   # md and csv only: a LaTeX list of excluded runs is of no use
    (out / "excluded.md").write_text(excluded.markdown())
    excluded.write_csv(out / "excluded.csv")
    return written + [out / "excluded.md", out / "excluded.csv"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dirs", type=Path, nargs="+", metavar="results_dir",
                        help="one or more results_dirs, each holding runs/*.json")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <results_dir>/analysis)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None,
                        help="only this protocol's tables (default: every protocol the records have)")
    parser.add_argument("--quant", default="w4a4kv4", help="the quant preset of the tables (default: w4a4kv4)")
    parser.add_argument("--method", default="baseq", help="the method whose gap closing is computed")
    args = parser.parse_args(argv)
    for results_dir in args.results_dirs:
        if not (results_dir / "runs").is_dir():
            parser.error(f"{results_dir} has no runs/ folder; give the results_dir of the runs")
    for path in write_all(args.results_dirs, args.out, args.quant, args.method, protocol=args.protocol):
        print(path)


if __name__ == "__main__":
    main()
