"""``torch.nn.Module`` wrappers of every loss. Each takes ``backend=``."""

from fusedloss.softmax import CrossEntropyLoss, FocalLoss
from fusedloss.linear import LinearCrossEntropyLoss
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
    "SigmoidFocalLoss",
    "MultilabelCategoricalCrossEntropy",
    "BiTemperedLogisticLoss",
    "GHMCLoss",
    "CRF",
]
