"""Local training loops (no Flower, no Opacus inside)."""

from medseg_core.training.loop import OPTIMIZERS, TrainResult, make_optimizer, train_epochs

__all__ = ["OPTIMIZERS", "TrainResult", "make_optimizer", "train_epochs"]
