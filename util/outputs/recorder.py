"""Everything a training run writes per epoch and at its end, in one place (the loop only reports numbers).

Per epoch: a row of ``metrics_val.csv``, the per-class rows of ``per_class_val.csv``, VisualDL ``val/*``
scalars, a ``log.txt`` JSON line, ``checkpoint-best.pdparams`` (+ ``thresholds.json``) when the validation
metric improved and ``checkpoint-last.pdparams`` (resumable; with ``--save_last_every N`` every N epochs).
At the end: ``training_curves.png`` and the test outputs (``metrics_test.csv``, per-class table, predictions,
confusion matrices). Only the main process writes; other ranks get a recorder whose methods do nothing.

The metrics CSVs keep the reference's columns first (``task.columns``, ``val_loss`` being the loss of the
split the file is named after) and add ``epoch``; ``metrics_test.csv`` also ``checkpoint_epoch`` (the epoch
whose weights were tested) and ``timestamp`` (ISO 8601, UTC).
"""
from __future__ import annotations

import contextlib
import os
from datetime import datetime, timezone

import util.outputs.checkpoint as ckpt  # through the module: tests replace save_checkpoint there
from util.metrics.bootstrap import DEFAULT_RESAMPLES, task_metric_cis
from util.metrics.calibration import apply_temperature, calibration_summary
from util.outputs.plots import save_training_curves_png
from util.outputs.report_html import write_ci_csv, write_report
from util.outputs.reports import append_per_class_csv, save_thresholds_json, write_test_report
from util.outputs.run_log import metric_name

VAL_EXTRA_COLUMNS = ["epoch"]
TEST_EXTRA_COLUMNS = ["epoch", "checkpoint_epoch", "timestamp"]


def _epoch_or_nan(value) -> int | float:
    """An epoch number for a CSV cell; NaN (the CSVs' 'not known') when there is none."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return float("nan")


class Recorder:
    def __init__(self, run_dir: str | None, logger, task, class_names: list, identity: dict,
                 savemodel: bool = True):
        self.run_dir, self.logger, self.task = run_dir, logger, task
        self.class_names, self.identity, self.savemodel = list(class_names), identity, savemodel
        self.enabled = bool(logger.enabled and run_dir)
        self.tested = {"epoch": None, "checkpoint_epoch": None}

    def path(self, name: str) -> str | None:
        return os.path.join(self.run_dir, name) if self.run_dir else None

    def epoch(self, epoch: int, train_stats: dict, val_stats: dict, n_parameters: int) -> None:
        """The epoch's rows: metrics_val.csv, per_class_val.csv, VisualDL, log.txt."""
        if not self.enabled:
            return
        self.logger.csv_row("metrics_val.csv", list(self.task.columns) + VAL_EXTRA_COLUMNS, {**val_stats, "epoch": epoch})
        append_per_class_csv(self.path("per_class_val.csv"), val_stats.get("per_class", []), epoch)
        val = {metric_name(k): v for k, v in val_stats.items()}  # val_loss -> loss: val/loss, val_loss
        self.logger.scalars("val", val, epoch)
        self.logger.json_line({"epoch": epoch, "train_lr": train_stats["lr"], "train_loss": train_stats["loss"],
                               **{f"val_{k}": v for k, v in val.items()}, "n_parameters": n_parameters})
        self.logger.flush()

    def checkpoints(self, epoch: int, *, model, optimizer, scaler, schedule, val_stats: dict, val_metric: str,
                    improved: bool, best_score: float, best_epoch: int, best_thresholds,
                    epochs_without_improvement: int = 0, stopped_early: bool = False, save_last: bool = True,
                    best_model_state: dict | None = None, writer: ckpt.CheckpointWriter | None = None) -> None:
        """checkpoint-best (and thresholds.json) when improved, then checkpoint-last (unless ``save_last`` is
        false: ``--save_last_every``); both atomic, through ``writer`` (one group: in the background both are
        copied now and written after) or now. checkpoint-last also holds the early-stopping state
        (``--patience``), so a resumed run goes on counting. ``best_model_state``: the weights checkpoint-best
        stores instead of the model's own (a LoRA model's, merged)."""
        if not self.enabled:
            return
        meta = {**self.identity, "best_epoch": best_epoch}
        scalars = {k: v for k, v in val_stats.items() if isinstance(v, (int, float))}
        with writer.group() if writer is not None else contextlib.nullcontext():
            if improved and self.savemodel:
                ckpt.save_checkpoint(self.path("checkpoint-best.pdparams"), model=model, epoch=epoch,
                                     best_score=best_score, meta=meta, model_state=best_model_state, writer=writer,
                                     extra={"best_epoch": best_epoch, "val_metrics": scalars,
                                            "val_metric": val_metric, "thresholds": best_thresholds})
                if best_thresholds is not None:
                    save_thresholds_json(self.path("thresholds.json"), self.task.name, self.class_names,
                                         best_thresholds, f"tuned on the validation split at epoch {epoch}")
            if save_last:
                ckpt.save_checkpoint(self.path("checkpoint-last.pdparams"), model=model, optimizer=optimizer,
                                     scaler=scaler, epoch=epoch, best_score=best_score, meta=meta, writer=writer,
                                     extra={"best_epoch": best_epoch, "best_thresholds": best_thresholds,
                                            "schedule": schedule.state_dict(),
                                            "epochs_without_improvement": int(epochs_without_improvement),
                                            "stopped_early": bool(stopped_early)})

    def curves(self, best_epoch: int, metrics) -> None:
        if self.enabled:
            save_training_curves_png(self.path("log.txt"), self.path("training_curves.png"), best_epoch=best_epoch,
                                     metrics=tuple(metrics))

    def tested_weights(self, epoch=None, checkpoint_epoch=None) -> None:
        """What the test is about to score, for metrics_test.csv: the run's last trained epoch (``None`` when this
        run trained none, e.g. ``--eval``) and the epoch whose weights are tested."""
        self.tested = {"epoch": epoch, "checkpoint_epoch": checkpoint_epoch}

    def test(self, stats: dict, y_true, outputs, dataset, num_classes: int, *, split_counts: dict, config=None,
             provenance=None, temperature=None, heatmaps=(), classes=None) -> None:
        """metrics_test.csv (one evaluation: never appended), per-class table, predictions, confusion matrices,
        metrics_test_ci.csv (95% bootstrap CIs) and report.html."""
        if not self.enabled:
            return
        row = {**stats, "epoch": _epoch_or_nan(self.tested["epoch"]),
               "checkpoint_epoch": _epoch_or_nan(self.tested["checkpoint_epoch"]),
               "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.logger.csv_row("metrics_test.csv", list(self.task.columns) + TEST_EXTRA_COLUMNS, row, fresh=True)
        write_test_report(self.run_dir, self.task, stats, y_true, outputs, dataset, num_classes)
        class_names, thresholds = list(dataset.class_names), stats.get("thresholds")
        cis = task_metric_cis(self.task, y_true, outputs, num_classes, thresholds=thresholds,
                              class_names=class_names, classes=classes)
        write_ci_csv(self.path("metrics_test_ci.csv"), stats, cis)
        calibration = None
        if temperature is not None and self.task.name != "regression":  # evaluate() already applied T
            raw = apply_temperature(outputs, 1.0 / float(temperature), self.task.name)
            calibration = {"before": calibration_summary(y_true, raw, self.task.name),
                           "after": calibration_summary(y_true, outputs, self.task.name)}
        write_report(self.path("report.html"), task_name=self.task.name, class_names=class_names, y_true=y_true,
                     outputs=outputs, thresholds=thresholds, metrics=stats, cis=cis,
                     split_counts=split_counts,
                     per_class_rows=stats.get("per_class", []), config=config or {}, provenance=provenance or {},
                     log_path=self.path("log.txt"), calibration=calibration, temperature=temperature,
                     heatmaps=heatmaps, curve_metrics=self.task.headline,
                     best_epoch=self.tested["checkpoint_epoch"], n_resamples=DEFAULT_RESAMPLES)
