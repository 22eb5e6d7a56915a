"""The test at the end of a run (and of ``--eval``): one evaluation of the test split, the console summary,
and everything written from it (metrics CSVs with bootstrap CIs, per-class table, predictions, confusion
matrices, ``report.html`` with the provenance of the result and, with ``--explain``, example heat maps).
"""
from __future__ import annotations

import os

import engine_finetune as engine
from util import distributed as D
from util.outputs.provenance import provenance
from util.outputs.reports import test_summary

EXAMPLE_HEATMAPS = 8  # heat maps shown in report.html (the first test images)


def split_counts(datasets: dict) -> dict:
    """{split: {class name: images (positives per label, images per grade)}} for the report."""
    return {s: dict(zip(d.class_names, d.class_counts().tolist())) for s, d in datasets.items()}


def run_test(model, loader, datasets: dict, task, num_classes: int, recorder, say, *, eval_loss, thresholds,
             temperature, class_names, amp, print_freq, classes, report: dict, explain=None,
             tested_epoch=None) -> dict:
    """Evaluate ``model`` on ``loader`` (the test split) and write the test outputs; returns the metrics.

    ``report``: what ``report.html`` states beside the numbers (``config``, and ``checkpoint``, ``weights``,
    ``data_path``, ``model``, ``device`` for the provenance); ``explain``: ``None``, or a callable
    ``(dataset) -> [(caption, png_path)]`` writing a heat map per test image (``--explain``); the report shows
    the first ``EXAMPLE_HEATMAPS``; ``tested_epoch``: the epoch of the checkpoint ``--eval`` scores."""
    stats, y_true, outputs = engine.evaluate(model, loader, task, num_classes, loss_fn=eval_loss,
                                             thresholds=thresholds, class_names=class_names, amp=amp,
                                             header="Test", print_freq=print_freq, classes=classes,
                                             temperature=temperature)
    D.stop_watching_peers()  # the test gather was the last collective: the other ranks may now exit
    for line in test_summary(stats, outputs, task.columns):
        say(line)
    if not recorder.enabled:
        return stats
    if tested_epoch is not None:
        recorder.tested_weights(checkpoint_epoch=tested_epoch)
    test_set = datasets["test"]
    heatmaps = list(explain(test_set))[:EXAMPLE_HEATMAPS] if explain else ()
    checkpoint = report.get("checkpoint")
    prov = provenance(checkpoint=checkpoint if checkpoint and os.path.isfile(checkpoint) else None,
                      weights=report.get("weights"), data_path=report.get("data_path"), model=report.get("model", ""),
                      device=report.get("device", ""))
    recorder.test(stats, y_true, outputs, test_set, num_classes, split_counts=split_counts(datasets),
                  config=report.get("config", {}), provenance=prov, temperature=temperature, heatmaps=heatmaps,
                  classes=classes)
    say(f"outputs: {os.path.abspath(recorder.run_dir)}")
    return stats
