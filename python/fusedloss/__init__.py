"""fusedloss: fused loss kernels for token-level and large-vocabulary classification.

Softmax losses, the fused linear + cross entropy head, sigmoid and multi-label losses and the
linear-chain CRF, each with a pure-PyTorch reference and fused backends chosen per call; vocabulary-parallel
losses over torch.distributed and the Hugging Face transformers integration. The documentation (docs/, built
with ``make docs``) has one page per family.
"""

from fusedloss import _floor  # noqa: F401  (first: an ImportError naming the floor on an older torch)
from fusedloss._dispatch import BackendUnavailable, available_backends
from fusedloss.softmax import cross_entropy, focal_loss
from fusedloss.linear import linear_cross_entropy
from fusedloss.distillation import distillation_loss, linear_distillation_loss
from fusedloss.sigmoid import (
    GHMCLoss,
    bi_tempered_logistic_loss,
    binary_cross_entropy_with_logits,
    ghmc_loss,
    multilabel_categorical_crossentropy,
    multilabel_soft_margin_loss,
    sigmoid_focal_loss,
)
from fusedloss.crf import (
    CRF,
    allowed_transitions,
    crf_log_likelihood,
    crf_log_partition,
    crf_marginals,
    crf_viterbi,
)
from fusedloss import nn  # noqa: E402  (modules re-exported under fusedloss.nn)
# Vocabulary-parallel losses and the Hugging Face integration (which imports without transformers installed).
from fusedloss import distributed, transformers  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "available_backends",
    "cross_entropy",
    "focal_loss",
    "linear_cross_entropy",
    "distillation_loss",
    "linear_distillation_loss",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "multilabel_soft_margin_loss",
    "multilabel_categorical_crossentropy",
    "ghmc_loss",
    "GHMCLoss",
    "bi_tempered_logistic_loss",
    "CRF",
    "crf_log_likelihood",
    "crf_viterbi",
    "crf_marginals",
    "crf_log_partition",
    "allowed_transitions",
    "nn",
    "distributed",
    "transformers",
]
