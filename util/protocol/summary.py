"""The summary tables of a protocol, from the sub-runs' own files (``metrics_test.csv``, ``metrics_test_ci.csv``,
``predictions_test.csv``), so a summary can always be rebuilt from the folders.

Repeated runs (``seeds_summary.csv`` / ``kfold_summary.csv``): one row per metric with ``n`` (the sub-runs
where it is defined), ``mean``, ``sd`` (sample SD, n - 1), the 95% interval of the mean
``mean ± t_{0.975, n-1} · sd / √n`` (Student's t over the sub-runs, as the RETFound paper reports five
seeds; undefined for n < 2) and then one column per sub-run. The ``.md`` shows a row per sub-run and the
mean, interval and SD of the headline metrics, and names the sub-runs that are missing. Folds are not
independent samples (their training sets overlap), so over folds the interval is a rough guide only.

External validation (``external_summary.csv``): one row per dataset with the number of test images and
every metric with its 95% bootstrap interval from the sub-run's ``metrics_test_ci.csv``
(``util.metrics.bootstrap``).

References: Zhou et al., "A foundation model for generalizable disease detection from retinal images",
Nature 2023 (five seeds, 95% CIs); Bengio and Grandvalet, "No Unbiased Estimator of the Variance of K-Fold
Cross-Validation", JMLR 2004 (why the fold interval is optimistic).
"""
from __future__ import annotations

import csv
import io
import math
import os

import numpy as np

from util.fileio import atomic_path
from util.protocol.runs import SubRun, is_finished

LEVEL = 0.95
# columns of metrics_test.csv that are not metrics
NOT_METRICS = ("val_loss", "epoch", "checkpoint_epoch", "timestamp")
# the headline metrics of each task's metrics_test.csv (the last name tells the task apart), for the .md
HEADLINE = (("f1_macro", "f1_micro", "roc_auc", "map", "odir_final", "f1_macro_tuned"),
            ("accuracy", "f1", "kappa_quadratic", "mae", "f1_tuned", "kappa_quadratic_tuned"),
            ("accuracy", "f1", "roc_auc", "kappa", "kappa_quadratic", "average_precision"))


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))


def read_metrics(folder: str) -> dict[str, float] | None:
    """The test metrics of a run folder (last row of ``metrics_test.csv``), ``None`` when it has none."""
    path = os.path.join(folder, "metrics_test.csv")
    if not os.path.isfile(path):
        return None
    rows = read_csv(path)
    if not rows:
        return None
    return {k: _number(v) for k, v in rows[-1].items() if k not in NOT_METRICS}


def read_cis(folder: str) -> dict[str, tuple[float, float]]:
    path = os.path.join(folder, "metrics_test_ci.csv")
    if not os.path.isfile(path):
        return {}
    return {r["metric"]: (_number(r["ci_low"]), _number(r["ci_high"])) for r in read_csv(path)}


def headline(metrics) -> list[str]:
    names = list(metrics)
    for cols in HEADLINE:
        if cols[-1] in names or cols is HEADLINE[-1]:
            return [c for c in cols if c in names]
    return names


def t_quantile(q: float, dof: int) -> float:
    from scipy import stats  # here: util.config imports this package for every command line

    return float(stats.t.ppf(q, dof))


def t_interval(values, level: float = LEVEL) -> dict:
    """``n, mean, sd, ci_low, ci_high`` of the finite ``values``: the Student-t interval of their mean."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = float(v.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    sd = float(v.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def _fmt(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else "nan"


def _md(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "n/a"


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _write(path: str, text: str) -> str:
    with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:
        with open(tmp, "w", encoding="utf8", newline="") as f:
            f.write(text)
    return path


def _csv_text(header: list, rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _results(sub: SubRun) -> dict | None:
    """The test metrics of a sub-run that finished (this time or earlier); ``None`` for a failed one."""
    done = sub.ok or (sub.status is None and is_finished(sub.folder, sub.after))  # None: not reached this time
    return read_metrics(sub.folder) if done else None


def missing_lines(subruns: list[SubRun]) -> list[str]:
    missing = [s for s in subruns if s.info.get("metrics") is None]
    if not missing:
        return []
    return ["", f"Missing ({len(missing)} of {len(subruns)}): "
            + "; ".join(f"{s.name} ({s.status or 'not run'})" for s in missing)
            + ". Run the same command again to finish them (finished sub-runs are kept)."]


def write_repeat_summary(base: str, kind: str, subruns: list[SubRun], what: str,
                         notes: list[str] = ()) -> tuple[str, str, list[str]]:
    """``<base>/<kind>_summary.csv`` and ``.md`` over the sub-runs' test metrics (module docstring); ``what``
    names a sub-run in the table (``seed``, ``fold``); ``notes``: lines added at the end. Returns both paths
    and the Markdown lines."""
    for s in subruns:
        s.info["metrics"] = _results(s)
    present = [s for s in subruns if s.info["metrics"] is not None]
    metrics: list[str] = []
    for s in present:
        metrics += [m for m in s.info["metrics"] if m not in metrics]
    summary = {m: t_interval([s.info["metrics"].get(m, math.nan) for s in present]) for m in metrics}
    header = ["metric", "n", "mean", "sd", "ci_low", "ci_high", *(s.name for s in subruns)]
    rows = [[m, summary[m]["n"], *(_fmt(summary[m][k]) for k in ("mean", "sd", "ci_low", "ci_high")),
             *(_fmt(s.info["metrics"].get(m, math.nan)) if s.info["metrics"] is not None else "" for s in subruns)]
            for m in metrics]
    csv_path = _write(os.path.join(base, f"{kind}_summary.csv"), _csv_text(header, rows))
    cols = headline(metrics)
    lines = [f"{len(present)} of {len(subruns)} {what}s of {os.path.basename(os.path.normpath(base))}, test split",
             "", _md_row(["sub-run", "folder", *cols]), "|---|---|" + "---:|" * len(cols)]
    for s in subruns:
        m = s.info["metrics"]
        cells = [_md(m.get(c, math.nan)) for c in cols] if m is not None else [s.status or "not run"] + [""] * (
            len(cols) - 1)
        lines.append(_md_row([s.label, s.name, *cells]))
    lines.append(_md_row(["mean", "", *(_md(summary[c]["mean"]) for c in cols)]))
    lines.append(_md_row(["95% CI", "", *(f"{_md(summary[c]['ci_low'])}\u2013{_md(summary[c]['ci_high'])}"
                                          for c in cols)]))
    lines.append(_md_row(["SD", "", *(_md(summary[c]["sd"]) for c in cols)]))
    n = len(present)
    lines += ["", f"95% CI: the Student-t interval of the mean over the {n} {what}s, mean \u00b1 t(0.975, n - 1) "
                  f"\u00b7 SD / \u221an with n = {n}" + (f" (t = {t_quantile(0.975, n - 1):.3f})" if n > 1 else
                                                       " (undefined for fewer than two)")
              + "; SD is the sample SD (n - 1). Every metric, with each sub-run's value: "
              + os.path.basename(csv_path) + "."]
    if kind == "kfold":
        lines.append("Folds share most of their training data, so they are not independent samples: the interval "
                     "understates the uncertainty (Bengio and Grandvalet, 2004); the SD shows the spread.")
    lines += missing_lines(subruns) + list(notes)
    md_path = _write(os.path.join(base, f"{kind}_summary.md"), "\n".join(lines) + "\n")
    return csv_path, md_path, lines


def _test_count(folder: str) -> int | None:
    path = os.path.join(folder, "predictions_test.csv")
    return len(read_csv(path)) if os.path.isfile(path) else None


def write_external_summary(base: str, subruns: list[SubRun]) -> tuple[str, str, list[str]]:
    """``<base>/external_summary.csv`` and ``.md``: a row per dataset (module docstring). Each sub-run's
    ``info`` holds ``role`` (internal or external) and ``data_path``."""
    for s in subruns:
        s.info["metrics"] = _results(s)
    metrics: list[str] = []
    for s in subruns:
        metrics += [m for m in (s.info["metrics"] or {}) if m not in metrics]
    header = ["dataset", "role", "data_path", "run", "n", *(f"{m}{x}" for m in metrics for x in ("", "_ci_low",
                                                                                               "_ci_high"))]
    rows, md_rows = [], []
    cols = headline(metrics)
    for s in subruns:
        m, cis = s.info["metrics"], read_cis(s.folder)
        n = _test_count(s.folder) if m is not None else None
        values = []
        for name in metrics:
            lo, hi = cis.get(name, (math.nan, math.nan))
            values += ([_fmt(m.get(name, math.nan)), _fmt(lo), _fmt(hi)] if m is not None else ["", "", ""])
        rows.append([s.label, s.info.get("role", ""), s.info.get("data_path", ""), s.folder,
                     "" if n is None else n, *values])
        if m is None:
            md_rows.append(_md_row([s.label, s.info.get("role", ""), "", s.status or "not run",
                                    *[""] * (len(cols) - 1)]))
            continue
        cells = []
        for c in cols:
            lo, hi = cis.get(c, (math.nan, math.nan))
            v = m.get(c, math.nan)
            ci = f" ({_md(lo)}\u2013{_md(hi)})" if math.isfinite(lo) and math.isfinite(hi) else ""
            cells.append(_md(v) + (ci if math.isfinite(v) else ""))
        md_rows.append(_md_row([s.label, s.info.get("role", ""), n, *cells]))
    csv_path = _write(os.path.join(base, "external_summary.csv"), _csv_text(header, rows))
    lines = [f"Test split of each dataset, {os.path.basename(os.path.normpath(base))}'s checkpoint", "",
             _md_row(["dataset", "role", "n", *cols]), "|---|---|---:|" + "---:|" * len(cols), *md_rows, "",
             "In brackets the 95% bootstrap confidence interval over the test images (metrics_test_ci.csv of each "
             f"run). Every metric: {os.path.basename(csv_path)}."]
    lines += missing_lines(subruns)
    md_path = _write(os.path.join(base, "external_summary.md"), "\n".join(lines) + "\n")
    return csv_path, md_path, lines
