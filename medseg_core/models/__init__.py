"""Registry of DP-compatible segmentation networks.

Importing this package does not import :mod:`medseg_core.config`.
"""

from medseg_core.models.registry import (
    MODEL_REGISTRY,
    basicunet_features,
    build_model,
    validate_dp_compatible,
)

__all__ = [
    "MODEL_REGISTRY",
    "basicunet_features",
    "build_model",
    "validate_dp_compatible",
]
