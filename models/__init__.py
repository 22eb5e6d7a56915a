"""Registered models. Importing this package registers every model family."""
from models.registry import MODEL_ALIASES, create_model, list_models, register_model, resolve_model_name  # noqa: F401
