"""Evaluation metrics as total functions, one module per task: ``single_label`` (the RETFound reference's
metric set), ``multi_label`` (with the official ODIR-5K score) and ``regression`` (grading by regression),
over ``common`` (kappa, per-class report, confusion matrix). Nothing here writes files.
"""
from util.metrics.common import MetricWarning, cohen_kappa, confusion_matrix, per_class_report, selection_value
from util.metrics.single_label import METRIC_COLUMNS, compute_metrics

__all__ = ['METRIC_COLUMNS', 'MetricWarning', 'cohen_kappa', 'compute_metrics', 'confusion_matrix', 'per_class_report',
           'selection_value']
