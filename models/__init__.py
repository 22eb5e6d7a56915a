"""Registered models. Importing this package registers every model family."""
import warnings

# Paddle warns at import that ccache (a compiler cache for C++ extensions, unused here) is missing.
warnings.filterwarnings("ignore", message="No ccache found")

from models import (  # noqa: E402
                             convnext,  # noqa: F401,E402  (convnext_tiny, convnext_small, convnext_test)
                             dual,  # noqa: F401,E402  (dual_convnext_small, dual_resnet50, dual_retfound, *_test)
                             efficientnet,  # noqa: F401,E402  (efficientnet_b0..b4, efficientnet_v2_m, *_test)
                             resnet,  # noqa: F401,E402  (resnet18, resnet50, resnet_test, resnet50_test)
                             vit,  # noqa: F401,E402  (retfound_mae, vit_*, retfound_dinov2, dinov2_*, retfound_green*, visionfm*)
)
from models.registry import (  # noqa: F401
                             MODEL_ALIASES,
                             create_model,
                             default_input_size,
                             list_models,
                             register_model,
                             resolve_model_name,
)
