"""Print a table of test metrics from run folders (``<run>/metrics_test.csv``), optionally beside
published numbers.

    python tools/summarize_runs.py output_dir/RETFound_mae_meh-OCTID output_dir/RETFound_mae_meh-Retina
    python tools/summarize_runs.py --demo output_dir/demo_retinamnist
"""
from __future__ import annotations

import argparse
import csv
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--demo", action="store_true", help="compare with the published RetinaMNIST numbers")
    a = p.parse_args(argv)
    width = max(len(os.path.basename(os.path.normpath(r))) for r in a.runs) + 2
    missing, header = 0, None
    for run in a.runs:
        row = read_last_row(os.path.join(run, "metrics_test.csv"))
        name = os.path.basename(os.path.normpath(run)).ljust(width)
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
