"""report.html of a tiny real run, opened in headless Chromium: every section is in the rendered DOM with its
pictures, and a screenshot of the page is not blank. Skipped where no Chromium is installed, except in CI
(environment variable ``CI`` set), where a missing browser fails the test instead of hiding it."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml
from PIL import Image

import main_finetune
from engine_finetune import get_task
from helpers import TINY_ARGS, make_class_folders
from util.metrics.bootstrap import task_metric_cis
from util.outputs.report_html import SECTIONS, write_report

BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome")


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    reason = f"no headless browser found (looked for {', '.join(BROWSERS)} on PATH); install chromium"
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason} (.ci/run installs it with apt-get)")
    pytest.skip(reason)


def headless(binary: str, profile, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start; a fresh profile per call
    res = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--no-first-run", f"--user-data-dir={profile}", *args],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


class Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.ids.append(attrs.get("id"))
        elif tag == "img":
            self.images.append(attrs.get("src") or "")


def rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))


def report_of_run(run, data, tmp_path) -> str:
    """The run's report.html; until the run writes one, a report made here from the run's own files
    (predictions, log, config) and data folder, with a heat map so that every section is there."""
    own = run / "report.html"
    if own.is_file():
        return str(own)
    preds = rows(run / "predictions_test.csv")
    names = [c[len("prob_"):] for c in preds[0] if c.startswith("prob_")]
    y = np.array([int(r["label"]) for r in preds])
    out = np.array([[float(r[f"prob_{c}"]) for c in names] for r in preds])
    task = get_task("single_label")
    metrics = task.metrics(y, out, len(names), names, None)
    cis = task_metric_cis(task, y, out, len(names), class_names=names, n_resamples=200)
    heat = tmp_path / "heat.png"
    Image.fromarray((np.indices((32, 32)).sum(0) * 4).astype(np.uint8)).convert("RGB").save(heat)
    config = yaml.safe_load((run / "config.yaml").read_text())
    return write_report(str(tmp_path / "report.html"), task_name="single_label", class_names=names, y_true=y,
                        outputs=out, thresholds=None, metrics=metrics, cis=cis,
                        split_counts={s: {c: len(os.listdir(os.path.join(data, s, c))) for c in names}
                                      for s in ("train", "val", "test")},
                        per_class_rows=metrics["per_class"], config=config, provenance={"run": str(run)},
                        log_path=str(run / "log.txt"), heatmaps=[("test image 0", str(heat))])


def test_report_renders_in_headless_chromium(tmp_path):
    binary = browser()
    data = make_class_folders(tmp_path / "data", counts={"train": 4, "val": 2, "test": 3})
    assert main_finetune.cli([*TINY_ARGS, "--data_path", data, "--nb_classes", "3", "--epochs", "1",
                              "--output_dir", str(tmp_path / "out"), "--task", "r"]) == 0
    path = report_of_run(tmp_path / "out" / "r", data, tmp_path)
    source = Dom()
    source.feed(open(path, encoding="utf8").read())
    assert set(SECTIONS) - {"explanations"} <= set(source.ids)

    dom = Dom()
    dom.feed(headless(binary, tmp_path / "profile", "--dump-dom", f"file://{path}").stdout)
    assert dom.ids == source.ids  # every section survived the browser's parse, in order
    assert len(dom.images) == len(source.images) >= 5
    assert all(src.startswith("data:image/png;base64,") for src in dom.images)

    shot = tmp_path / "shot.png"
    headless(binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3000", f"file://{path}")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (3000, 1200) and pixels.var() > 0
