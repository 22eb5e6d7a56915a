"""Datasets: retinal image data in the formats the toolkit reads, validated when built.

``base`` holds what every format shares (``SPLITS``, ``DataOptions``, the format registry,
``build_dataset``, ``RetinaDataset``); each format is a module registering itself: ``folder`` (class
folders), ``npz`` (MedMNIST arrays), ``csv_formats`` (multi-label and grading tables, over ``tables``,
``splits`` and ``image_paths``) and ``odir`` (paired-eye tables). ``samplers`` and ``loader`` turn a dataset
into batches. Importing this package registers every format; modules inside it import from ``base`` (and
from each other), never from this file, so no import cycle can form.
"""
from util.datasets import csv_formats, folder, npz, odir  # noqa: F401  (register the formats)
from util.datasets.base import (
                                EYE_MODES,
                                SPLITS,
                                TASKS,
                                DataOptions,
                                RetinaDataset,
                                build_dataset,
                                has_table_layout,
                                list_dataset_formats,
                                register_dataset_format,
                                resolve_task,
)
from util.datasets.build import build_splits
from util.datasets.folder import ImageFolderDataset
from util.datasets.npz import NpzDataset

__all__ = ['EYE_MODES', 'SPLITS', 'TASKS', 'DataOptions', 'RetinaDataset', 'build_dataset', 'build_splits',
           'has_table_layout', 'list_dataset_formats', 'register_dataset_format', 'resolve_task', 'ImageFolderDataset', 'NpzDataset']
