"""``torch.nn.Module`` wrappers of every loss. Each takes ``backend=``."""

from fusedloss.softmax import CrossEntropyLoss, FocalLoss
from fusedloss.linear import LinearCrossEntropyLoss
from fusedloss.distillation import DistillationLoss, LinearDistillationLoss
from fusedloss.sigmoid import (
    BiTemperedLogisticLoss,
    GHMCLoss,
    MultilabelCategoricalCrossEntropy,
    SigmoidFocalLoss,
)
from fusedloss.crf import CRF

__all__ = [
    "CrossEntropyLoss",
    "FocalLoss",
    "LinearCrossEntropyLoss",
    "DistillationLoss",
    "LinearDistillationLoss",
    "SigmoidFocalLoss",
    "MultilabelCategoricalCrossEntropy",
    "BiTemperedLogisticLoss",
    "GHMCLoss",
    "CRF",
]
