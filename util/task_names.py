"""The task types, named once: a dataset declares one, the engine's ``TASKS`` table maps each to its loss,
activation, metrics and decisions, and ``--task_type`` / ``--loss`` accept them."""
TASK_NAMES = ('single_label', 'multi_label', 'regression')
