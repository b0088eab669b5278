"""medseg_core: framework-free ML for federated medical image segmentation.

Data, models, losses, privacy, training. Never imports ``flwr``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
