"""Training masked diffusion LMs: objectives, data, the resumable (distributed) loop."""

from .objective import Batch, Bound, mdm_bound, pretrain_loss, sft_loss
from .trainer import TrainConfig, TrainResult, train

__all__ = ["Batch", "Bound", "mdm_bound", "pretrain_loss", "sft_loss", "TrainConfig", "TrainResult", "train"]
