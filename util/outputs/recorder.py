"""Everything a training run writes per epoch and at its end, in one place (the loop only reports numbers).

Per epoch: a row of ``metrics_val.csv``, the per-class rows of ``per_class_val.csv``, VisualDL ``val/*``
scalars, a ``log.txt`` JSON line, ``checkpoint-best.pdparams`` (+ ``thresholds.json``) when the validation
metric improved and ``checkpoint-last.pdparams`` (resumable). At the end: ``training_curves.png`` and the
test outputs (``metrics_test.csv``, per-class table, predictions, confusion matrices). Only the main
process writes; other ranks get a recorder whose methods do nothing.
"""
from __future__ import annotations

import os

import util.outputs.checkpoint as ckpt  # through the module: tests replace save_checkpoint there
from util.outputs.plots import save_training_curves_png
from util.outputs.reports import append_per_class_csv, save_thresholds_json, write_test_report


class Recorder:
    def __init__(self, run_dir: str | None, logger, task, class_names: list, identity: dict,
                 savemodel: bool = True):
        self.run_dir, self.logger, self.task = run_dir, logger, task
        self.class_names, self.identity, self.savemodel = list(class_names), identity, savemodel
        self.enabled = bool(logger.enabled and run_dir)

    def path(self, name: str) -> str | None:
        return os.path.join(self.run_dir, name) if self.run_dir else None

    def epoch(self, epoch: int, train_stats: dict, val_stats: dict, n_parameters: int) -> None:
        """The epoch's rows: metrics_val.csv, per_class_val.csv, VisualDL, log.txt."""
        if not self.enabled:
            return
        self.logger.csv_row("metrics_val.csv", self.task.columns, val_stats)
        append_per_class_csv(self.path("per_class_val.csv"), val_stats.get("per_class", []), epoch)
        self.logger.scalars("val", val_stats, epoch)
        self.logger.json_line({"epoch": epoch, "train_lr": train_stats["lr"], "train_loss": train_stats["loss"],
                               **{f"val_{k}": v for k, v in val_stats.items()}, "n_parameters": n_parameters})
        self.logger.flush()

    def checkpoints(self, epoch: int, *, model, optimizer, scaler, schedule, val_stats: dict, val_metric: str,
                    improved: bool, best_score: float, best_epoch: int, best_thresholds) -> None:
        """checkpoint-best (and thresholds.json) when improved, then checkpoint-last; both atomic."""
        if not self.enabled:
            return
        meta = {**self.identity, "best_epoch": best_epoch}
        scalars = {k: v for k, v in val_stats.items() if isinstance(v, (int, float))}
        if improved and self.savemodel:
            ckpt.save_checkpoint(self.path("checkpoint-best.pdparams"), model=model, epoch=epoch, best_score=best_score,
                            meta=meta, extra={"best_epoch": best_epoch, "val_metrics": scalars,
                                              "val_metric": val_metric, "thresholds": best_thresholds})
            if best_thresholds is not None:
                save_thresholds_json(self.path("thresholds.json"), self.task.name, self.class_names,
                                     best_thresholds, f"tuned on the validation split at epoch {epoch}")
        ckpt.save_checkpoint(self.path("checkpoint-last.pdparams"), model=model, optimizer=optimizer, scaler=scaler,
                        epoch=epoch, best_score=best_score, meta=meta,
                        extra={"best_epoch": best_epoch, "best_thresholds": best_thresholds,
                               "schedule": schedule.state_dict()})

    def curves(self, best_epoch: int, metrics) -> None:
        if self.enabled:
            save_training_curves_png(self.path("log.txt"), self.path("training_curves.png"), best_epoch=best_epoch,
                                     metrics=tuple(metrics))

    def test(self, stats: dict, y_true, outputs, dataset, num_classes: int) -> None:
        """metrics_test.csv (one evaluation: never appended), per-class table, predictions, confusion matrices."""
        if not self.enabled:
            return
        self.logger.csv_row("metrics_test.csv", self.task.columns, stats, fresh=True)
        write_test_report(self.run_dir, self.task, stats, y_true, outputs, dataset, num_classes)
