"""What a run writes: checkpoints (``checkpoint``), the run log (``run_log``: CSV, JSON lines, VisualDL), the
run folder's lock and crash repair (``run_folder``), per-class tables and predictions (``reports``) and every
picture (``plots``)."""
