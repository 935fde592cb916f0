"""``torch.nn.Module`` wrappers of every loss (SPEC 6). Each takes ``backend=``."""

from fusedloss.softmax import CrossEntropyLoss, FocalLoss
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
    "SigmoidFocalLoss",
    "MultilabelCategoricalCrossEntropy",
    "BiTemperedLogisticLoss",
    "GHMCLoss",
    "CRF",
]
