"""Registered models. Importing this package registers every model family."""
from models.registry import MODEL_ALIASES, create_model, list_models, register_model, resolve_model_name  # noqa: F401
from models import vit  # noqa: F401,E402  (registers retfound_mae, vit_base_patch16, vit_small_patch16, vit_test)
from models import resnet  # noqa: F401,E402  (registers resnet18, resnet_test)
