"""Registered models. Importing this package registers every model family."""
from models.registry import (MODEL_ALIASES, create_model, default_img_size, list_models,  # noqa: F401
                             register_model, resolve_model_name)
from models import vit  # noqa: F401,E402  (retfound_mae, vit_base_patch16, vit_small_patch16, vit_test)
from models import resnet  # noqa: F401,E402  (resnet18, resnet50, resnet_test, resnet50_test)
from models import efficientnet  # noqa: F401,E402  (efficientnet_b0..b4, efficientnet_v2_m, *_test)
from models import convnext  # noqa: F401,E402  (convnext_tiny, convnext_small, convnext_test)
from models import dual  # noqa: F401,E402  (dual_convnext_small, dual_resnet50, dual_retfound, *_test)
