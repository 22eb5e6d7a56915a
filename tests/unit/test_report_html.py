"""report.html (util/outputs/report_html.py) for every task type: every section present, every picture an
embedded PNG, nothing fetched or scripted, all text escaped, each headline metric printed with its 95% CI;
and metrics_test_ci.csv."""
from __future__ import annotations

import base64
import csv
import io
import json
import os
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from engine_finetune import get_task
from util.outputs import report_html
from util.outputs.report_html import SECTIONS, format_ci, write_ci_csv, write_report

CLASSES = {"single_label": ["<b>", "drusen & CNV", "normal"], "multi_label": ["<b>", "glaucoma", "AMD"],
           "regression": ["<b>", "1", "2", "3", "4"]}


class Page(HTMLParser):
    """The section ids, the images (src per enclosing section) and every tag name of a page."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.tags, self.current = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.current = attrs.get("id")
            self.sections.append(self.current)
        elif tag == "img":
            self.images.append((self.current, attrs.get("src", "")))


def parse(path) -> tuple[str, Page]:
    text = open(path, encoding="utf8").read()
    page = Page()
    page.feed(text)
    return text, page


def section_text(text: str, sid: str) -> str:
    start = text.index(f'<section id="{sid}">')
    return text[start:text.index("</section>", start)]


def data(task_name, n=60, seed=0):
    rng = np.random.default_rng(seed)
    k = len(CLASSES[task_name])
    if task_name == "single_label":
        y = np.arange(n) % k
        logits = rng.normal(0, 1, (n, k)) + 2.0 * np.eye(k)[y]
        out = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    elif task_name == "multi_label":
        y = (rng.random((n, k)) < 0.4).astype(np.int64)
        y[0], y[1] = 1, 0  # every label has positives and negatives
        out = 1 / (1 + np.exp(-(rng.normal(0, 1, (n, k)) + 2.0 * (2 * y - 1))))
    else:
        y = (np.arange(n) % k).astype(np.float64)
        out = (y + rng.normal(0, 0.6, n))[:, None]
    return y, out.astype(np.float32)


# decision thresholds tuned on validation, as a run passes them (single-label has none)
TUNED = {"single_label": None, "multi_label": [0.4, 0.5, 0.6], "regression": [0.4, 1.5, 2.6, 3.5]}


def report(tmp_path, which, **kw):
    """write_report of the synthetic data of task ``which``; ``kw`` overrides any argument."""
    y, out = data(which)
    names = CLASSES[which]
    task = get_task(which)
    thresholds = kw.pop("thresholds", TUNED[which])
    metrics = task.metrics(y, out, len(names), names, thresholds)
    # CIs as a bootstrap would give them (a fixed offset, so the printed text can be checked exactly)
    cis = {c: (float(metrics[c]) - 0.05, float(metrics[c]) + 0.04) for c in task.columns if c != "val_loss"}
    log = tmp_path / "log.txt"
    log.write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1),
                                       **{f"val_{c}": 0.5 + 0.1 * e for c in task.headline}}) + "\n"
                           for e in range(3)))
    args = dict(task_name=which, class_names=names, y_true=y, outputs=out, thresholds=thresholds, metrics=metrics,
                cis=cis, split_counts={"train": {n: 10 for n in names}, "test": {n: 20 for n in names}},
                per_class_rows=metrics["per_class"],
                config={"model": "vit_test", "data_path": "/data/<OCTID>", "blr": 0.005},
                provenance={"weights": "w.pdparams sha256 abc", "code": "0123abc"}, log_path=str(log),
                best_epoch=2)
    args.update(kw)
    path = write_report(str(tmp_path / "report.html"), **args)
    return path, metrics, cis


@pytest.mark.parametrize("task_name", ["single_label", "multi_label", "regression"])
def test_every_section_every_picture_and_the_cis(tmp_path, task_name):
    heat = tmp_path / "heat.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(heat)
    path, metrics, cis = report(tmp_path, task_name, heatmaps=[("image <1>", str(heat))])
    text, page = parse(path)
    assert page.sections == list(SECTIONS)
    # every picture is an embedded PNG; the curves, confusion, referral and training sections each have one
    assert page.images
    for _, src in page.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "PNG" and img.size[0] > 0
    with_image = {sid for sid, _ in page.images}
    assert {"curves", "confusion", "referral", "training", "explanations"} <= with_image
    assert ("calibration" in with_image) == (task_name != "regression")
    # self-contained: no script, no stylesheet or picture from elsewhere
    assert "script" not in page.tags and "link" not in page.tags
    assert "http://" not in text and "https://" not in text and "url(" not in text
    # each headline metric with its CI, in the metrics section
    table = section_text(text, "metrics")
    for name, (lo, hi) in cis.items():
        cell = f"{float(metrics[name]):.3f} ({lo:.3f}\u2013{hi:.3f})"
        assert f"<td>{name}</td><td class=\"num\">{cell}</td>" in table, name
    assert "val_loss" not in table
    if task_name != "single_label":  # no thresholds tuned: the *_tuned metrics (NaN by construction) are left out
        path, metrics, cis = report(tmp_path, task_name, thresholds=None)
        table = section_text(open(path, encoding="utf8").read(), "metrics")
        assert "<td>f1_tuned</td>" not in table and "<td>f1_macro_tuned</td>" not in table
        assert "<td>mae</td>" in table or "<td>f1_macro</td>" in table
    # the ROC/PR legends carry the AUCs: one note per problem, none undefined here
    assert "undefined" not in section_text(text, "curves")


@pytest.mark.parametrize("task_name", ["single_label", "multi_label", "regression"])
def test_text_is_escaped(tmp_path, task_name):
    path, _, _ = report(tmp_path, task_name, title="Report <i>x</i>",
                        provenance={"data": "a&b <script>alert(1)</script>"})
    text, page = parse(path)
    assert "&lt;b&gt;" in section_text(text, "per-class") and "&lt;b&gt;" in section_text(text, "counts")
    assert "<b>" not in text and "<i>" not in text and "<script" not in text
    assert "a&amp;b &lt;script&gt;alert(1)&lt;/script&gt;" in section_text(text, "provenance")
    assert "/data/&lt;OCTID&gt;" in section_text(text, "config")
    assert "<title>Report &lt;i&gt;x&lt;/i&gt;</title>" in text


def test_calibration_before_and_after_temperature(tmp_path):
    bins = [{"lo": 0.5, "hi": 0.75, "confidence": 0.6, "accuracy": 0.5, "count": 10},
            {"lo": 0.75, "hi": 1.0, "confidence": 0.9, "accuracy": 0.7, "count": 30}]
    before = {"ece": 0.1234, "brier": 0.4567, "bins": bins}
    after = {"ece": 0.0321, "brier": 0.4012, "bins": bins}
    path, _, _ = report(tmp_path, "single_label", calibration={"before": before, "after": after},
                        temperature=1.5)
    text, page = parse(path)
    cal = section_text(text, "calibration")
    assert '<td>as trained</td><td class="num">0.123</td><td class="num">0.457</td>' in cal
    assert '<td>after temperature scaling</td><td class="num">0.032</td><td class="num">0.401</td>' in cal
    assert "Temperature T = 1.500" in cal
    assert [sid for sid, _ in page.images].count("calibration") == 1


def test_regression_has_no_calibration_and_says_why(tmp_path):
    path, _, _ = report(tmp_path, "regression")
    text, _ = parse(path)
    assert "a regression output is a grade, not a probability" in section_text(text, "calibration")


def test_missing_pieces_are_notes_not_errors(tmp_path):
    # an --eval run: no log; a heat map that is gone; a class with no test positive (AUC undefined)
    y, out = data("single_label")
    y = np.where(y == 2, 1, y)
    path, _, _ = report(tmp_path, "single_label", y_true=y, outputs=out, log_path=None,
                        heatmaps=[("gone", str(tmp_path / "missing.png"))])
    text, page = parse(path)
    assert "explanations" in page.sections and "missing.png could not be read" in text
    assert "No training log" in section_text(text, "training")
    assert "normal: no positive case in the test split" in section_text(text, "curves")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    # no heat maps: no explanations section and no link to it
    path, _, _ = report(tmp_path, "single_label")
    text, page = parse(path)
    assert "explanations" not in page.sections and 'href="#explanations"' not in text


def test_counts_stay_counts_and_the_header_says_what_was_tested(tmp_path):
    # per-class support gathered as floats is printed as a count; the header names the checkpoint tested
    rows = [{"class": "a", "support": 4.0, "f1": 0.5}, {"class": "b", "support": 6.0, "f1": 0.25}]
    path, _, _ = report(tmp_path, "single_label", per_class_rows=rows,
                        config={"model": "vit_test", "data_path": "/d/IDRiD/", "resume": "run/checkpoint-best"})
    text, _ = parse(path)
    assert '<td>a</td><td class="num">4</td><td class="num">0.500</td>' in section_text(text, "per-class")
    assert "<title>vit_test on IDRiD</title>" in text
    assert "<td>checkpoint tested</td><td>run/checkpoint-best</td>" in text


def test_format_ci():
    assert format_ci(0.8123, (0.7751, 0.8459)) == "0.812 (0.775\u20130.846)"
    assert format_ci(float("nan"), (float("nan"), float("nan"))) == "n/a (CI n/a)"
    assert format_ci(0.5, None) == "0.500"


def test_ci_csv(tmp_path):
    path = write_ci_csv(str(tmp_path / "metrics_test_ci.csv"), {"accuracy": 0.75, "f1": float("nan"),
                                                                "val_loss": 0.3},
                        {"accuracy": (0.7, 0.8), "f1": (float("nan"), float("nan"))})
    rows = list(csv.reader(open(path, encoding="utf8")))
    assert rows == [["metric", "value", "ci_low", "ci_high"], ["accuracy", "0.75", "0.7", "0.8"],
                    ["f1", "nan", "nan", "nan"]]


def test_unknown_task_is_a_user_error(tmp_path):
    with pytest.raises(report_html.UserError, match="write_report: unknown task 'grading'"):
        report(tmp_path, "single_label", task_name="grading")
