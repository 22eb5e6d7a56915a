"""Compare two runs on the same test images: the difference of a metric, its 95% CI and a p-value.

    python tools/compare_runs.py RUN_A RUN_B                      # roc_auc: paired bootstrap and DeLong's test
    python tools/compare_runs.py RUN_A RUN_B --metric f1,kappa --resamples 5000
    python tools/compare_runs.py RUN_A RUN_B --json               # the numbers as JSON

RUN is a run folder (its ``predictions_test.csv``, written by training or by ``--eval``) or such a CSV file.
The rows of the two files are matched by the ``file`` column (and the labels must agree): a paired comparison
needs the same test images, so different test sets are an error. The metric is computed from the stored
outputs exactly as the run computed it (``*_tuned`` metrics use the run's ``thresholds.json``). For every
metric: the paired bootstrap (``util.metrics.compare.paired_bootstrap``, stratified by class as the runs'
own intervals are); for ``roc_auc`` also DeLong's test (binary or macro one-vs-rest, ``delong_test``).
Exit status: 0, or 2 with a message when the inputs cannot be compared.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message="No ccache found")  # Paddle's, at import

import numpy as np  # noqa: E402

from util.errors import UserError  # noqa: E402

PREDICTIONS = "predictions_test.csv"


@dataclass
class Predictions:
    where: str
    name: str
    task: str
    class_names: list
    files: list
    y: np.ndarray
    outputs: np.ndarray
    num_classes: int
    thresholds: list | None


def _prefixed(header: list, prefix: str) -> list[str]:
    return [c for c in header if c.startswith(prefix)]


def read_predictions(run: str) -> Predictions:
    """The labels and outputs of a run's ``predictions_test.csv`` (a run folder or the file itself)."""
    path = os.path.join(run, PREDICTIONS) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UserError(f"{run}: no {PREDICTIONS} (the test predictions a run or --eval writes); pass a run folder "
                        "that finished its test, or the CSV itself")
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf8") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    if not rows or "file" not in header:
        raise UserError(f"{path}: no rows, or no 'file' column (a {PREDICTIONS} as the toolkit writes it); pass "
                        "a run's predictions file")
    if "output" in header:
        task, names = "regression", []
        y = np.array([float(r["label"]) for r in rows])
        outputs = np.array([[float(r["output"])] for r in rows])
        per_class = os.path.join(folder, "per_class_test.csv")  # a row per grade of the data
        num_classes = int(np.rint(y).max()) + 1
        if os.path.isfile(per_class):
            with open(per_class, newline="", encoding="utf8") as f:
                num_classes = len(list(csv.DictReader(f)))
    else:
        names = [c[len("prob_"):] for c in _prefixed(header, "prob_")]
        outputs = np.array([[float(r[f"prob_{c}"]) for c in names] for r in rows])
        if _prefixed(header, "label_"):
            task = "multi_label"
            y = np.array([[int(r[f"label_{c}"]) for c in names] for r in rows], dtype=np.int64)
        else:
            task = "single_label"
            y = np.array([int(r["label"]) for r in rows], dtype=np.int64)
        num_classes = len(names)
    thresholds = None
    tuned = os.path.join(folder, "thresholds.json")
    if os.path.isfile(tuned):
        with open(tuned, encoding="utf8") as f:
            thresholds = json.load(f).get("thresholds")
    return Predictions(path, os.path.basename(folder), task, names, [r["file"] for r in rows], y, outputs,
                       num_classes, thresholds)


def _keys(files: list) -> list[tuple[str, int]]:
    """(file, occurrence) for each row: a file listed twice is matched by its order."""
    seen: dict[str, int] = {}
    out = []
    for f in files:
        seen[f] = seen.get(f, 0) + 1
        out.append((f, seen[f]))
    return out


def match(a: Predictions, b: Predictions) -> np.ndarray:
    """The row of ``b`` for each row of ``a``; ``UserError`` when the two were not tested on the same images."""
    if a.task != b.task or a.class_names != b.class_names:
        raise UserError(f"{a.where} and {b.where}: different tasks or classes ({a.task} {a.class_names} vs "
                        f"{b.task} {b.class_names}) (two models of one task on one test set); compare runs of the "
                        "same task")
    ka, kb = _keys(a.files), _keys(b.files)
    index = {k: i for i, k in enumerate(kb)}
    only_a = [k[0] for k in ka if k not in index]
    only_b = [k[0] for k in kb if k not in set(ka)]
    if only_a or only_b:
        raise UserError(f"{a.where} ({len(ka)} images) and {b.where} ({len(kb)} images) were tested on different "
                        f"images: {len(only_a)} only in A (e.g. {', '.join(only_a[:3]) or '-'}), {len(only_b)} only "
                        f"in B (e.g. {', '.join(only_b[:3]) or '-'}) (a paired comparison needs the same test set); "
                        "evaluate both checkpoints on the same data (--eval --resume RUN --data_path D)")
    order = np.array([index[k] for k in ka], dtype=np.int64)
    differ = np.flatnonzero((a.y != b.y[order]).reshape(len(order), -1).any(axis=1))
    if differ.size:
        raise UserError(f"{a.where} and {b.where}: the labels of {differ.size} matched images differ (e.g. "
                        f"{', '.join(a.files[i] for i in differ[:3])}) (the same labels for the same file); "
                        "check that both runs read the same table")
    return order


def _metric_fn(task, metrics: list[str], pred: Predictions, classes):
    """``(y, outputs) -> {metric: value}``: the run's metrics, through the fast numpy re-computation of
    ``util.metrics.bootstrap`` when it gives the task function's numbers on these rows (as the bootstrap of
    the run's own intervals checks it), else the task function."""
    from util.metrics import bootstrap

    thresholds = pred.thresholds
    for m in metrics:
        if m.endswith("_tuned") and thresholds is None:
            raise UserError(f"{pred.where}: --metric {m} needs the thresholds tuned on validation, and the run has no "
                            "thresholds.json beside its predictions; compare the untuned metric")
    subset = {"classes": classes} if classes is not None else {}

    def reported(y, out):
        values = task.metrics(y, out, pred.num_classes, pred.class_names or None, thresholds, **subset)
        return {m: values[m] for m in metrics}

    fast = bootstrap._NUMPY_METRICS.get(task.name)  # the bootstrap's fast path, checked here as it checks it
    if fast is None or not np.isfinite(pred.outputs).all():
        return reported

    def numpy_metrics(y, out):
        values = fast(y, out, pred.num_classes, thresholds, classes)
        return {m: values[m] for m in metrics}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine, ref = numpy_metrics(pred.y, pred.outputs), reported(pred.y, pred.outputs)
    for m in metrics:
        x, r = float(mine[m]), float(ref[m])
        if not ((math.isnan(x) and math.isnan(r)) or abs(x - r) <= 1e-9 * max(1.0, abs(r))):
            return reported
    return numpy_metrics


def compare(a: Predictions, b: Predictions, metrics: list[str], resamples: int, seed: int, level: float) -> dict:
    import engine_finetune as engine
    from util.metrics.bootstrap import task_strata
    from util.metrics.compare import delong_test, paired_bootstrap

    task = engine.get_task(a.task)
    known = [c for c in task.columns if c != "val_loss"]
    for m in metrics:
        if m not in known:
            raise UserError(f"--metric {m}: not a test metric of the {a.task} task ({', '.join(known)}); pick one")
    order = match(a, b)
    b_outputs = b.outputs[order]
    classes = None
    if a.task == "single_label":
        present = sorted(set(a.y.tolist()))
        if len(present) < a.num_classes:  # --eval on a subset of the classes: macro over those present
            classes = present
    boot = paired_bootstrap(_metric_fn(task, metrics, a, classes), a.y, a.outputs, b_outputs,
                            strata=task_strata(a.task, a.y), n_resamples=resamples, seed=seed, level=level,
                            metric_b=_metric_fn(task, metrics, b, classes))
    out = {"a": a.where, "b": b.where, "n": len(a.y), "task": a.task, "classes": classes, "results": []}
    for m in metrics:
        out["results"].append({"metric": m, "test": "paired bootstrap", **boot[m]})
        if m == "roc_auc":
            d = delong_test(a.y, a.outputs, b_outputs, a.task, classes=classes, level=level)
            out["results"].append({"metric": m, "test": "DeLong", "a": d["auc_a"], "b": d["auc_b"],
                                   "diff": d["diff"], "ci": d["ci"], "p": d["p"], "z": d["z"], "se": d["se"],
                                   "averaged_over": d["classes"], "left_out": d["left_out"], "n": d["n"]})
    return out


def _f(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def _p(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else (f"{v:.3g}" if v >= 1e-4 else f"{v:.1e}")


def markdown(res: dict, names: tuple[str, str], class_names: list, level: float) -> list[str]:
    pct = f"{100 * level:g}%"
    lines = [f"A = {names[0]} ({res['a']})", f"B = {names[1]} ({res['b']})",
             f"{res['n']} test images in both, matched by file ({res['task'].replace('_', '-')})", "",
             f"| metric | A | B | A \u2212 B ({pct} CI) | p | test |", "|---|---:|---:|---:|---:|---|"]
    for r in res["results"]:
        if r["test"] == "DeLong":
            cols = [class_names[c] if c < len(class_names) else str(c) for c in r["averaged_over"]]
            how = ("DeLong" + (f", macro one-vs-rest over {len(cols)} classes" if len(cols) > 1 else
                                f", class {cols[0]}") if cols else "DeLong (undefined)")
        else:
            how = f"paired bootstrap, {r['resamples']} resamples"
        lines.append(f"| {r['metric']} | {_f(r['a'])} | {_f(r['b'])} | {_f(r['diff'])} ({_f(r['ci'][0])} to "
                     f"{_f(r['ci'][1])}) | {_p(r['p'])} | {how} |")
    lines += ["", "p: two-sided, for no difference between A and B on these images. Bootstrap: resampling the "
                  "test images (within each class), both models scored on the same resample; DeLong: the "
                  "variance of the AUROC difference from its structural components (util/metrics/compare.py)."]
    if res["classes"] is not None:
        lines.append(f"Macro averages over the {len(res['classes'])} classes present in the test labels.")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", help="run folder (or predictions_test.csv) of model A")
    p.add_argument("run_b", help="run folder (or predictions_test.csv) of model B, tested on the same images")
    p.add_argument("--metric", default="roc_auc", help="comma-separated metric names (default: roc_auc)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default: 0)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default: 0.95)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    a = p.parse_args(argv)
    try:
        if a.resamples < 1:
            raise UserError(f"--resamples {a.resamples}: out of range (1 or more; 2000 is usual); pass e.g. 2000")
        if not 0 < a.level < 1:
            raise UserError(f"--level {a.level}: out of range (a level in (0, 1)); pass e.g. 0.95")
        metrics = [m.strip() for m in a.metric.split(",") if m.strip()]
        pa, pb = read_predictions(a.run_a), read_predictions(a.run_b)
        res = compare(pa, pb, metrics, a.resamples, a.seed, a.level)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print("\n".join(markdown(res, (pa.name, pb.name), pa.class_names, a.level)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
