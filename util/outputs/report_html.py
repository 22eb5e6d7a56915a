"""``report.html``: one self-contained page a clinician can open offline, without the run folder.

Everything is inside the file: CSS inline, pictures as base64 ``data:`` URIs, no JavaScript, nothing fetched.
Sections (each an ``id`` to link to): ``metrics`` (headline metrics with 95% bootstrap confidence intervals),
``per-class``, ``counts`` (images per class and split), ``curves`` (ROC and precision-recall per class with
AUCs), ``confusion`` (normalised per true class), ``calibration`` (reliability diagram, ECE, Brier; before and
after temperature scaling), ``referral`` (the metric when the most uncertain cases go to a clinician),
``training`` (the curves of ``log.txt``), ``config`` (the resolved run config), ``provenance`` (file hashes,
versions) and ``explanations`` (heat maps, when given). All text is HTML-escaped.

``write_ci_csv`` writes the same metric table as ``metrics_test_ci.csv`` (``metric, value, ci_low, ci_high``),
which ``tools/summarize_runs.py`` reads.
"""
from __future__ import annotations

import base64
import csv
import html
import math
import os
from datetime import datetime, timezone
from typing import Sequence

import numpy as np

import util.outputs.report_figures as figures
from util.errors import UserError
from util.fileio import atomic_path, display_path
from util.metrics.calibration import calibration_summary, referral_curve
from util.metrics.common import constant_output_warning
from util.task_names import TASK_NAMES

SECTIONS = ("metrics", "per-class", "counts", "curves", "confusion", "calibration", "referral", "training",
            "config", "provenance", "explanations")
CI_COLUMNS = ("metric", "value", "ci_low", "ci_high")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# what each headline metric means, in words a reader without the code can check against
METRIC_MEANING = {
    "accuracy": "share of test images given their true class",
    "f1": "F1 (harmonic mean of precision and recall), averaged over classes",
    "roc_auc": "area under the ROC curve, averaged over classes: the chance that a case ranks above a non-case",
    "hamming": "share of wrong yes/no decisions over every (image, class) pair (lower is better)",
    "jaccard": "overlap of predicted and true class (Jaccard index), averaged over classes",
    "precision": "positive predictive value, averaged over classes",
    "recall": "sensitivity, averaged over classes",
    "average_precision": "area under the precision-recall curve, averaged over classes",
    "kappa": "Cohen's kappa: agreement with the reference beyond chance",
    "kappa_quadratic": "quadratic-weighted kappa: agreement, distant errors counting more",
    "score": "model-selection score: (F1 + AUROC + kappa) / 3",
    "f1_macro": "F1 per label at threshold 0.5, averaged over labels",
    "f1_micro": "F1 over all (image, label) decisions at threshold 0.5",
    "precision_macro": "positive predictive value per label, averaged over labels",
    "recall_macro": "sensitivity per label, averaged over labels",
    "map": "area under the precision-recall curve per label, averaged over labels",
    "subset_accuracy": "share of images with every label right",
    "odir_kappa": "ODIR-5K challenge kappa over all (image, label) decisions",
    "odir_f1": "ODIR-5K challenge F1 (share of correct (image, label) decisions)",
    "odir_auc": "ODIR-5K challenge AUROC over all (image, label) probabilities",
    "odir_final": "ODIR-5K challenge score: (kappa + F1 + AUROC) / 3",
    "f1_macro_tuned": "F1 per label at the thresholds tuned on validation, averaged over labels",
    "f1_micro_tuned": "F1 over all decisions at the thresholds tuned on validation",
    "mae": "mean absolute error in grades (lower is better)",
    "accuracy_tuned": "share of images given their true grade, with the grade cuts tuned on validation",
    "f1_tuned": "F1 averaged over grades, with the cuts tuned on validation",
    "kappa_quadratic_tuned": "quadratic-weighted kappa, with the cuts tuned on validation",
}
COLUMN_TITLES = {"class": "class", "support": "images", "precision": "precision (PPV)",
                 "recall": "recall (sensitivity)", "f1": "F1", "auroc": "AUROC", "ap": "AP",
                 "threshold": "threshold", "f1_tuned": "F1 (tuned threshold)"}
LOWER_IS_BETTER = frozenset({"hamming", "mae"})
STRATA = {"single_label": "stratified by class", "multi_label": "stratified by label combination",
          "regression": "stratified by grade"}

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1b1b1b; margin: 0 auto;
       max-width: 1150px; padding: 1em 2em 3em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 2px solid #d0d7de; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; height: auto; border: 1px solid #e5e7ea; }
nav a { margin-right: 0.8em; }
.header td:first-child { font-weight: bold; }
.note { color: #555; font-size: 0.9em; }
.warning { background: #fff4e5; border-left: 4px solid #e69500; padding: 0.5em 0.8em; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 360px; }
figcaption { font-size: 0.85em; color: #444; }
code, pre { font-family: Menlo, Consolas, monospace; font-size: 0.88em; }
@media print { nav { display: none; } h2 { break-after: avoid; } img { break-inside: avoid; } }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def format_value(value, digits: int = 3) -> str:
    """A number for the page: ``digits`` decimals, integers as they are, ``n/a`` for an undefined value."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if _finite(value):
        return f"{float(value):.{digits}f}"
    if isinstance(value, (float, np.floating)):
        return "n/a"
    return str(value)


def format_ci(value, ci) -> str:
    """``0.812 (0.775–0.846)``; the value alone when there is no interval, ``n/a`` when it is undefined."""
    text = format_value(value)
    if ci is None:
        return text
    lo, hi = ci
    if _finite(lo) and _finite(hi):
        return f"{text} ({float(lo):.3f}\u2013{float(hi):.3f})"
    return f"{text} (CI n/a)"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(header: Sequence[str], rows: Sequence[Sequence], numeric: Sequence[bool] | None = None) -> str:
    """A table of already formatted cells (escaped here)."""
    numeric = list(numeric) if numeric is not None else [False] * len(header)
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if numeric[i] else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _note(text: str, kind: str = "note") -> str:
    return f'<p class="{kind}">{_e(text)}</p>'


def _section(sid: str, title: str, body: list[str]) -> str:
    return f'<section id="{sid}">\n<h2>{_e(title)}</h2>\n' + "\n".join(body) + "\n</section>"


def metric_rows(metrics: dict, cis: dict | None) -> list[tuple[str, float, tuple | None]]:
    """``(name, value, ci)`` of the headline metrics: those the CIs were computed for, in their order (the
    task's columns), else every finite scalar of ``metrics``; the loss is left out."""
    cis = cis or {}
    names = list(cis) or [k for k, v in metrics.items() if _finite(v) or isinstance(v, float)]
    return [(k, metrics.get(k, float("nan")), cis.get(k)) for k in names if k != "val_loss"]


def write_ci_csv(path: str, metrics: dict, cis: dict | None) -> str:
    """``metrics_test_ci.csv``: one row per headline metric, ``metric, value, ci_low, ci_high`` (an undefined
    value or bound is ``nan``), written atomically; returns ``path``."""
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="", encoding="utf8") as f:
        w = csv.writer(f)
        w.writerow(CI_COLUMNS)
        for name, value, ci in metric_rows(metrics, cis):
            lo, hi = ci if ci is not None else (float("nan"), float("nan"))
            w.writerow([name] + [f"{float(v):.6g}" if _finite(v) else "nan" for v in (value, lo, hi)])
    return path


def _header(title: str, task_name: str, config: dict, date: str, n: int, class_names, sections) -> list[str]:
    """The title, what was tested on what, and links to the sections present."""
    model = config.get("model", "")
    data = config.get("data_path", "")
    kind = {"single_label": "single-label classification", "multi_label": "multi-label classification",
            "regression": "grading by regression"}[task_name]
    rows = [("model", model), ("data", data), ("task", f"{kind} ({len(class_names)} "
                                                      f"{'labels' if task_name == 'multi_label' else 'classes'})"),
            ("test images", n), ("report date", date)]
    rows = [(k, v) for k, v in rows if v not in ("", None)]
    if config.get("resume"):
        rows.append(("checkpoint tested", config["resume"]))
    elif config.get("finetune"):
        rows.append(("pretrained weights", config["finetune"]))
    body = [f"<h1>{_e(title)}</h1>", '<table class="header">']
    body += [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows]
    body.append("</table>")
    links = " ".join(f'<a href="#{sid}">{_e(sid.replace("-", " "))}</a>' for sid in sections)
    body.append(f"<nav>{links}</nav>")
    return body


def _metrics_section(task_name: str, metrics: dict, cis: dict | None, n: int, n_resamples, tuned: bool) -> str:
    # without thresholds tuned on validation the *_tuned metrics are undefined by construction: left out
    rows = [(name, format_ci(value, ci), METRIC_MEANING.get(name, "")) for name, value, ci in
            metric_rows(metrics, cis) if tuned or not name.endswith("_tuned")]
    resamples = f"{n_resamples} " if n_resamples else ""
    intervals = (f"In brackets: the 95% confidence interval from {resamples}bootstrap resamples of the test images "
                 f"({STRATA[task_name]}): the range the metric would plausibly take on another test set of this "
                 "size drawn from the same population." if cis else "No confidence intervals were computed.")
    body = [_table(["metric", "value (95% CI)" if cis else "value", "meaning"], rows, [False, True, False]),
            _note(f"Computed on the {n} test images. {intervals} n/a: the metric is undefined for this data (for "
                  "example, a class with no test image).")]
    body += [_note(str(n_), "warning") for n_ in metrics.get("notes") or []]
    return _section("metrics", "Headline metrics", body)


def _per_class_section(task_name: str, rows: list[dict]) -> str:
    if not rows:
        return _section("per-class", "Per class", [_note("No per-class table was given.")])
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    def shown(key, value):  # a count gathered as a float is still a count
        return str(int(round(float(value)))) if key == "support" and _finite(value) else format_value(value)

    table = _table([COLUMN_TITLES.get(c, c) for c in cols], [[shown(c, r.get(c, "")) for c in cols] for r in rows],
                   [c != "class" for c in cols])
    what = {"single_label": "Each class against the others, at the predicted (top) class.",
            "multi_label": "Each label on its own, at threshold 0.5 (tuned: at the threshold tuned on validation).",
            "regression": "Each grade, the continuous output cut into grades."}[task_name]
    return _section("per-class", "Per class", [table, _note(what + " images: test images of the class "
                                                            "(multi-label: with the label).")])


def _counts_section(task_name: str, class_names, split_counts: dict) -> str:
    splits = list(split_counts)
    names = list(class_names)
    for counts in split_counts.values():  # a class the model does not know, should a split have one
        names += [str(c) for c in counts if str(c) not in names and not isinstance(c, (int, np.integer))]

    def count(split: str, i: int, name: str) -> int:  # keyed by class name or by class index
        counts = split_counts[split]
        return int(counts.get(name, counts.get(i, 0)))

    rows = [[name] + [count(s, i, name) for s in splits] for i, name in enumerate(names)]
    totals = ["total"] + [sum(int(v) for v in split_counts[s].values()) for s in splits]
    body = [_table(["class"] + splits, rows + [totals], [False] + [True] * len(splits))]
    if task_name == "multi_label":
        body.append(_note("Images with the label; an image may carry several labels, so the totals count "
                          "labels, not images."))
    return _section("counts", "Images per class and split", body)


def _curves_section(task_name, y_true, outputs, class_names) -> str:
    png, notes = figures.roc_pr_png(task_name, y_true, outputs, class_names)
    what = {"single_label": "Each class against all the others (one-vs-rest), scored by its probability.",
            "multi_label": "Each label, scored by its probability.",
            "regression": "Each question \u201cgrade at least g?\u201d, scored by the continuous output."}[task_name]
    body = [_img(png, "ROC and precision-recall curves") if png else _note("No curve could be drawn.")]
    body += [_note(what + " AUC: area under the ROC curve; AP: average precision (area under the "
                   "precision-recall curve).")] + [_note(n) for n in notes]
    return _section("curves", "ROC and precision-recall curves", body)


def _confusion_section(task_name, y_true, outputs, class_names, thresholds) -> str:
    png = figures.confusion_png(task_name, y_true, outputs, class_names, thresholds)
    at = {"single_label": "the predicted class is the most probable one",
          "multi_label": "a label is predicted when its probability is above " +
                         ("its threshold tuned on validation" if thresholds is not None else "0.5"),
          "regression": "the output is cut into grades at " +
                        ("the cuts tuned on validation" if thresholds is not None else "the midpoints between grades")
          }[task_name]
    rows = ("For each label, the row of the images without it (no) and with it (yes) each sum to 1 (counts in "
            "brackets): the diagonal holds its specificity and sensitivity." if task_name == "multi_label" else
            "Each row is one true class and sums to 1 (counts in brackets): the diagonal is the sensitivity of "
            "each class.")
    body = [_img(png, "normalised confusion matrix"), _note(f"{rows} Decisions: {at}.")]
    return _section("confusion", "Confusion matrix (normalised per true class)", body)


def _calibration_section(task_name, y_true, outputs, calibration, temperature) -> str:
    title = "Calibration"
    if calibration is None:
        calibration = {"before": calibration_summary(y_true, outputs, task_name), "after": None}
    before, after = calibration.get("before") or {}, calibration.get("after") or None
    if not before:
        why = ("a regression output is a grade, not a probability" if task_name == "regression"
               else "no calibration summary was given")
        return _section("calibration", title, [_note(f"Calibration is not reported: {why}.")])
    rows = [("as trained", format_value(before.get("ece")), format_value(before.get("brier")))]
    if after:
        rows.append(("after temperature scaling", format_value(after.get("ece")), format_value(after.get("brier"))))
    body = [_img(figures.reliability_png(before, after), "reliability diagram"),
            _table(["probabilities", "ECE", "Brier score"], rows, [False, True, True])]
    what = ("the top-class probability against how often the top class is right" if task_name == "single_label"
            else "each label's probability against how often the label is present")
    body.append(_note(f"Reliability diagram: {what}, in bins; points on the diagonal are well calibrated (a "
                      "predicted 80% comes true 80% of the time). ECE: expected calibration error, the "
                      "count-weighted mean gap between the two (0 is perfect). Brier score: mean squared error "
                      "of the probabilities (lower is better)."))
    if temperature is not None:
        body.append(_note(f"Temperature T = {float(temperature):.3f}, fitted on the validation split (T > 1: "
                          "the model was over-confident and its probabilities are softened; T < 1: "
                          "under-confident). Temperature scaling changes the probabilities, not the decisions "
                          "of single-label models."))
    return _section("calibration", title, body)


def _referral_section(task_name, y_true, outputs, class_names, thresholds, curve) -> str:
    title = "Referral of uncertain cases"
    if curve is None:
        curve = referral_curve(y_true, outputs, task_name, len(class_names), thresholds=thresholds)
    if not curve or not curve.get("fraction"):
        return _section("referral", title, [_note("No referral curve could be computed for this data.")])
    n = len(np.asarray(y_true))
    name = curve.get("metric_name", "metric")
    kept = curve.get("kept") or [n - int(math.floor(float(f) * n + 1e-9)) for f in curve["fraction"]]
    rows = [(f"{100 * float(f):.0f}%", n - int(k), format_value(m))
            for f, m, k in zip(curve["fraction"], curve["metric"], kept)]
    how = {"single_label": "lowest top-class probability",
           "multi_label": "probabilities closest to the thresholds on average",
           "regression": "outputs closest to a grade cut"}[task_name]
    body = [_img(figures.referral_png(curve), "referral curve"),
            _table(["referred", "images referred", f"{name} on the rest"], rows, [True, True, True]),
            _note(f"If the model's most uncertain cases ({how}) are referred to a clinician, this is its "
                  f"{name} on the cases it keeps. A curve that rises says the model knows when it is unsure.")]
    return _section("referral", title, body)


def _training_section(log_path, curve_metrics, metrics_shown, best_epoch) -> str:
    # by default the first headline metrics where higher is better (one axis for all)
    names = list(curve_metrics) if curve_metrics is not None else \
        [m for m in metrics_shown if m not in LOWER_IS_BETTER][:4]
    png = figures.training_png(log_path, names, best_epoch)
    if png is None:
        return _section("training", "Training", [_note("No training log (log.txt) with epochs: this run did "
                                                       "not train (for example an evaluation with --eval).")])
    return _section("training", "Training", [
        _img(png, "training curves"),
        _note("Left: training and validation loss per epoch. Right: validation metrics per epoch; the dashed line "
              "marks the epoch whose weights were tested." if best_epoch is not None else
              "Left: training and validation loss per epoch. Right: validation metrics per epoch.")])


def _plain(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    return "" if value is None else str(value)


def _explanations_section(heatmaps) -> str:
    figs, notes = [], []
    for caption, png_path in heatmaps:
        try:
            with open(png_path, "rb") as f:
                data = f.read()
        except OSError as err:
            notes.append(_note(f"{caption}: heat map {display_path(png_path)} could not be read ({err.strerror})."))
            continue
        if not data.startswith(PNG_SIGNATURE):
            notes.append(_note(f"{caption}: {display_path(png_path)} is not a PNG image; left out."))
            continue
        figs.append(f"<figure>{_img(data, caption)}<figcaption>{_e(caption)}</figcaption></figure>")
    body = ["<div>" + "\n".join(figs) + "</div>"] + notes
    body.append(_note("Heat maps show which parts of each image weighed most in the model's output; they do not "
                      "show why, and a bright region is not a finding."))
    return _section("explanations", "Example explanations", body)


def write_report(path: str, *, task_name: str, class_names: Sequence[str], y_true, outputs, thresholds,
                 metrics: dict, cis: dict | None, split_counts: dict, per_class_rows: list[dict], config: dict,
                 provenance: dict, log_path: str | None = None, calibration: dict | None = None,
                 temperature: float | None = None, heatmaps=(), title: str = "",
                 curve_metrics: Sequence[str] | None = None, best_epoch: int | None = None,
                 referral: dict | None = None, n_resamples: int | None = None, date: str | None = None) -> str:
    """Write ``report.html`` to ``path`` (atomically) and return ``path``.

    Args beyond the contract: ``curve_metrics`` the validation metrics drawn in the training curves (default:
    the first four headline metrics); ``best_epoch`` marks the tested epoch there; ``referral`` a
    ``referral_curve`` result (computed from ``outputs`` when ``None``); ``calibration`` ``None`` computes
    the summary of ``outputs`` (no temperature); ``n_resamples`` is quoted beside the CIs; ``date`` (ISO 8601)
    defaults to now (UTC).
    """
    if task_name not in TASK_NAMES:
        raise UserError(f"write_report: unknown task {task_name!r} (one of {', '.join(TASK_NAMES)}); pass the "
                        "task's name")
    y_true, outputs = np.asarray(y_true), np.asarray(outputs)
    if outputs.ndim != 2 or len(outputs) != len(y_true):
        raise UserError(f"write_report: outputs of shape {outputs.shape} for {len(y_true)} labels (expected "
                        f"[{len(y_true)}, outputs]); pass the outputs and labels of the same split")
    class_names = [str(c) for c in class_names]
    date = date or datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not title:
        data = os.path.basename(str(config.get("data_path") or "").rstrip("/\\"))
        title = f"{config['model']} on {data}" if config.get("model") and data else "Test report"
    shown = [name for name, _, _ in metric_rows(metrics, cis) if not name.endswith("_tuned")]
    sections = [
        _metrics_section(task_name, metrics, cis, len(y_true), n_resamples, thresholds is not None),
        _per_class_section(task_name, per_class_rows),
        _counts_section(task_name, class_names, split_counts),
        _curves_section(task_name, y_true, outputs, class_names),
        _confusion_section(task_name, y_true, outputs, class_names, thresholds),
        _calibration_section(task_name, y_true, outputs, calibration, temperature),
        _referral_section(task_name, y_true, outputs, class_names, thresholds, referral),
        _training_section(log_path, curve_metrics, shown, best_epoch),
        _section("config", "Run configuration", [_table(["setting", "value"], [(k, _plain(v)) for k, v in
                                                                               config.items()])]),
        _section("provenance", "Provenance", [
            _table(["item", "value"], [(k, _plain(v)) for k, v in provenance.items()]),
            _note("A file hash identifies the exact file used: a file with the same hash is the same file.")]),
    ]
    if heatmaps:
        sections.append(_explanations_section(heatmaps))
    ids = [sid for sid in SECTIONS if f'<section id="{sid}">' in "".join(sections)]
    body = _header(title, task_name, config, date, len(y_true), class_names, ids)
    body += [_note(w, "warning") for w in constant_output_warning(outputs)] + sections
    footer = _note("Made by main_finetune.py of the RETFound fine-tuning toolkit; this page needs no network "
                   "and no JavaScript.")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body)
            + f"\n<footer>{footer}</footer>\n</body>\n</html>\n")
    with atomic_path(path, suffix=".html") as tmp, open(tmp, "w", encoding="utf8") as f:
        f.write(page)
    return path
