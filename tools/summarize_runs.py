"""Print a table of test metrics from run folders (``<run>/metrics_test.csv``), optionally beside
published numbers, as Markdown with 95% confidence intervals, or runs side by side.

    python tools/summarize_runs.py output_dir/RETFound_mae_meh-OCTID output_dir/RETFound_mae_meh-Retina
    python tools/summarize_runs.py --demo output_dir/demo_retinamnist
    python tools/summarize_runs.py --markdown RUN ...    # a Markdown table: value (95% CI) per headline metric
    python tools/summarize_runs.py --compare RUN_A RUN_B  # every metric a row, one column per run, the best marked

The intervals come from ``<run>/metrics_test_ci.csv`` (columns ``metric, value, ci_low, ci_high``: bootstrap
95% CIs on the test split); a run without that file shows its values alone. A folder of repeated runs
(``--seeds N`` or ``--kfold K``: ``seeds_summary.csv`` or ``kfold_summary.csv`` instead of ``metrics_test.csv``)
shows the mean over its sub-runs with the 95% t-interval of the mean, its name marked ``(N seeds)``.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys

COLUMNS = ("accuracy", "f1", "roc_auc", "kappa", "kappa_quadratic", "average_precision")
# the headline columns of the other task types' metrics_test.csv
MULTILABEL_COLUMNS = ("f1_macro", "f1_micro", "roc_auc", "map", "odir_final", "f1_macro_tuned")
REGRESSION_COLUMNS = ("accuracy", "f1", "kappa_quadratic", "mae", "f1_tuned", "kappa_quadratic_tuned")


def columns_for(row: dict) -> tuple[str, ...]:
    for cols in (MULTILABEL_COLUMNS, REGRESSION_COLUMNS):
        if cols[-1] in row:
            return cols
    return COLUMNS

# MedMNIST v2 (Yang et al., Scientific Data 2023), RetinaMNIST test set: (AUROC, accuracy).
RETINAMNIST_PUBLISHED = {
    "ResNet-18 (28)": (0.717, 0.524),
    "ResNet-18 (224)": (0.710, 0.493),
    "ResNet-50 (28)": (0.726, 0.528),
    "ResNet-50 (224)": (0.716, 0.511),
    "auto-sklearn": (0.690, 0.515),
    "AutoKeras": (0.719, 0.503),
    "Google AutoML Vision": (0.750, 0.531),
}


def read_last_row(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, newline="", encoding="utf8") as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else None


CI_FILE = "metrics_test_ci.csv"
# columns of metrics_test.csv that are not metrics; the loss is not bootstrapped and says little to a reader
NOT_METRICS = ("val_loss", "epoch", "checkpoint_epoch", "timestamp")
LOWER_IS_BETTER = ("hamming", "mae")


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


# folders of repeated runs (util/protocol): kind -> what one sub-run is called
PROTOCOL_SUMMARIES = {"seeds": "seed", "kfold": "fold"}


def read_protocol_summary(run: str) -> tuple[dict, dict, str] | None:
    """``({metric: mean}, {metric: (ci_low, ci_high)}, ' (N seeds)')`` of a folder of repeated runs (its
    ``seeds_summary.csv`` or ``kfold_summary.csv``: a row per metric), or ``None``."""
    for kind, what in PROTOCOL_SUMMARIES.items():
        path = os.path.join(run, f"{kind}_summary.csv")
        if not os.path.isfile(path):
            continue
        with open(path, newline="", encoding="utf8") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return None
        n = max(int(v) for v in (_number(r.get("n")) for r in rows) if math.isfinite(v)) if rows else 0
        return ({r["metric"]: r["mean"] for r in rows},
                {r["metric"]: (_number(r["ci_low"]), _number(r["ci_high"])) for r in rows},
                f" ({n} {what}{'s' if n != 1 else ''})")
    return None


def load_run(run: str) -> tuple[dict | None, dict, str]:
    """The test metrics of a run folder, their CIs and a suffix for its name: ``metrics_test.csv`` and
    ``metrics_test_ci.csv``, else a protocol summary (mean and t-interval over its sub-runs); ``(None, {}, '')``
    when there is neither."""
    row = read_last_row(os.path.join(run, "metrics_test.csv"))
    if row is not None:
        return row, read_cis(run), ""
    return read_protocol_summary(run) or (None, {}, "")


def read_cis(run: str) -> dict[str, tuple[float, float]]:
    """``metric -> (ci_low, ci_high)`` from ``<run>/metrics_test_ci.csv``; empty when the run has none."""
    path = os.path.join(run, CI_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf8") as f:
        return {r["metric"]: (_number(r.get("ci_low")), _number(r.get("ci_high"))) for r in csv.DictReader(f)}


def cell(value, ci=None) -> str:
    """``0.812 (0.775–0.846)``; ``-`` for a metric the run does not have, ``n/a`` for an undefined one,
    ``(CI n/a)`` for an interval that is undefined (a metric NaN in every resample)."""
    if value in (None, ""):
        return "-"
    v = _number(value)
    if math.isnan(v):
        return "n/a"
    if ci is None:  # the run has no interval for it (no metrics_test_ci.csv, or not bootstrapped)
        return f"{v:.3f}"
    if not all(math.isfinite(b) for b in ci):
        return f"{v:.3f} (CI n/a)"
    return f"{v:.3f} ({ci[0]:.3f}\u2013{ci[1]:.3f})"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _md_row(cells) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"


def markdown_table(runs: list[str]) -> tuple[list[str], int]:
    """Markdown lines: one table per column set (task type), a row per run with value (95% CI) per headline
    metric; and the number of runs without metrics_test.csv."""
    lines, header, missing = [], None, 0
    repeated = False
    for run in runs:
        row, cis, suffix = load_run(run)
        name = os.path.basename(os.path.normpath(run))
        cols = columns_for(row) if row is not None else header or COLUMNS
        if cols != header:
            lines += ([""] if lines else []) + [_md_row(["run", *cols]), "|---|" + "---:|" * len(cols)]
            header = cols
        if row is None:
            lines.append(_md_row([name, "(no metrics_test.csv: the run did not finish)", *[""] * (len(cols) - 1)]))
            missing += 1
            continue
        repeated = repeated or bool(suffix)
        lines.append(_md_row([name + suffix, *(cell(row.get(c), cis.get(c)) for c in cols)]))
    lines += ["", "Test split; in brackets the 95% bootstrap confidence interval (from metrics_test_ci.csv, where "
                  "the run has one)."]
    if repeated:
        lines.append("Rows marked (N seeds) or (N folds): the mean over the sub-runs, in brackets the 95% t-interval "
                     "of the mean (seeds_summary.md, kfold_summary.md).")
    return lines, missing


def _overlap(a, b) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def compare_table(runs: list[str]) -> tuple[list[str], int]:
    """Markdown lines: every metric of the runs a row, one column per run (value and 95% CI), then the best run
    and whether its CI overlaps another run's (overlapping intervals do not show a difference)."""
    loaded = [load_run(r) for r in runs]
    names = [os.path.basename(os.path.normpath(r)) + suffix for r, (_, _, suffix) in zip(runs, loaded)]
    rows = [row for row, _, _ in loaded]
    cis = [ci for _, ci, _ in loaded]
    metrics: list[str] = []
    for row, ci in zip(rows, cis):
        for m in list(ci) + list(row or {}):
            if m not in metrics and m not in NOT_METRICS:
                metrics.append(m)
    lines = [_md_row(["metric", *names, "best"]), "|---|" + "---:|" * len(names) + "---|"]
    for m in metrics:
        values = [_number((row or {}).get(m)) for row in rows]
        cells = [cell((row or {}).get(m), ci.get(m)) if row is not None else "(no metrics_test.csv)"
                 for row, ci in zip(rows, cis)]
        finite = [i for i, v in enumerate(values) if math.isfinite(v)]
        best = ""
        if len(finite) > 1:
            pick = min if m in LOWER_IS_BETTER else max
            b = pick(finite, key=lambda i: values[i])
            others = [cis[i].get(m) for i in finite if i != b]
            if cis[b].get(m) and all(o and all(map(math.isfinite, o)) for o in others) \
                    and all(map(math.isfinite, cis[b][m])):
                apart = not any(_overlap(cis[b][m], o) for o in others)
                best = f"{names[b]} ({'CI clear of the others' if apart else 'CIs overlap'})"
            else:
                best = names[b]
        lines.append(_md_row([m, *cells, best]))
    lines += ["", "Test split; in brackets the 95% bootstrap confidence interval (metrics_test_ci.csv). Overlapping "
                  "intervals do not show that one run is better; a paired comparison needs the same test images."]
    return lines, sum(row is None for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--demo", action="store_true", help="compare with the published RetinaMNIST numbers")
    mode.add_argument("--markdown", action="store_true",
                      help="a Markdown table, each headline metric with its 95%% CI")
    mode.add_argument("--compare", action="store_true",
                      help="runs side by side (Markdown): every metric a row, one column per run")
    a = p.parse_args(argv)
    if a.markdown or a.compare:
        lines, missing = (compare_table if a.compare else markdown_table)(a.runs)
        print("\n".join(lines))
        return 1 if missing == len(a.runs) else 0
    width = max(len(os.path.basename(os.path.normpath(r)) + load_run(r)[2]) for r in a.runs) + 2
    missing, header = 0, None
    for run in a.runs:
        row, _, suffix = load_run(run)
        name = (os.path.basename(os.path.normpath(run)) + suffix).ljust(width)
        cols = columns_for(row) if row is not None else header or COLUMNS
        # each column as wide as its name (at least a value's) plus two spaces, so no two headers touch
        widths = [max(len(c), 8) + 2 for c in cols]
        if cols != header:  # a header line whenever the task type (and so the columns) changes
            print("run".ljust(width) + "".join(c.rjust(w) for c, w in zip(cols, widths)))
            header = cols
        if row is None:
            print(name + "  (no metrics_test.csv: the run did not finish)")
            missing += 1
            continue
        print(name + "".join(f"{float(row[c]):{w}.4f}" if row.get(c) not in (None, "") else "-".rjust(w)
                             for c, w in zip(cols, widths)))
        if a.demo:
            auc, acc = float(row["roc_auc"]), float(row["accuracy"])
            print("\nRetinaMNIST test set       AUROC   accuracy")
            print(f"{'this run':<26}{auc:6.3f}   {acc:6.3f}")
            for k, (pa, pc) in RETINAMNIST_PUBLISHED.items():
                print(f"{k:<26}{pa:6.3f}   {pc:6.3f}")
            target = RETINAMNIST_PUBLISHED["ResNet-18 (28)"]
            verdict = "meets" if auc >= target[0] and acc >= target[1] else "does NOT meet"
            print(f"\nThis run {verdict} the published ResNet-18 (28) result (AUROC >= {target[0]}, "
                  f"accuracy >= {target[1]}).")
    return 1 if missing == len(a.runs) else 0


if __name__ == "__main__":
    sys.exit(main())
