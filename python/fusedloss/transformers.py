"""Hugging Face transformers integration (docs/transformers.rst): :func:`apply` and :class:`CRFTagger`.

``apply(model, loss=..., **options)`` patches one loaded model in place so that its training loss comes from
fusedloss; nothing global is touched (no torch or transformers function, class or loss mapping is replaced):
the instance gets its own ``forward`` (``del model.forward`` undoes it). ``CRFTagger`` puts a constrained
:class:`fusedloss.CRF` on a token-classification model for BERT-CRF style tagging over sub-words.

This module imports without transformers; its functions then raise ``ImportError`` saying what to install.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import fusedloss
from fusedloss.crf import CRF, allowed_transitions

__all__ = ["apply", "CRFTagger", "SUPPORTED_CAUSAL_LMS", "compact_words", "first_subword_mask"]

_INSTALL_HINT = (
    "fusedloss.transformers needs Hugging Face transformers 5.x: pip install 'transformers>=5,<6' "
    "(or pip install 'fusedloss[transformers]')"
)

#: Causal-LM classes whose forward is "base model -> last hidden state -> lm_head -> loss_function", mapped to
#: the attribute holding their base model and the ``transformers.modeling_outputs`` class they return. Only these
#: are patched: another family may scale, cap or mix its logits after the head in ways the fused loss would leave
#: out.
SUPPORTED_CAUSAL_LMS: Dict[str, Tuple[str, str]] = {
    "LlamaForCausalLM": ("model", "CausalLMOutputWithPast"),
    "MistralForCausalLM": ("model", "CausalLMOutputWithPast"),
    "Qwen2ForCausalLM": ("model", "CausalLMOutputWithPast"),
    "Qwen3ForCausalLM": ("model", "CausalLMOutputWithPast"),
    "GPT2LMHeadModel": ("transformer", "CausalLMOutputWithCrossAttentions"),
}
_CLASSIFICATION_SUFFIXES = ("ForTokenClassification", "ForSequenceClassification")

# Options of each loss, passed on to fusedloss.cross_entropy / focal_loss / linear_cross_entropy.
_CROSS_ENTROPY_OPTIONS = ("weight", "label_smoothing", "focal_gamma", "z_loss", "softcap", "backend")
_FOCAL_OPTIONS = ("gamma", "alpha", "label_smoothing", "backend")
_LINEAR_OPTIONS = _CROSS_ENTROPY_OPTIONS + ("chunk_size",)

# Keyword arguments of a transformers forward that belong to the loss, not to the base model.
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
IGNORE_INDEX = -100


def _require_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return transformers


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def _check_options(loss: str, options: Dict[str, Any], allowed: Sequence[str], num_classes: int, kind: str,
                   linear: bool = False) -> None:
    """Unknown option names and bad values raise ``ValueError`` (``TypeError`` for a wrong type) at
    ``apply`` time: one row goes through the loss with the options on the CPU, so the fusedloss checks run once.
    ``backend`` is left to the first call (the model may move to another device after ``apply``)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"loss={loss!r} for a {kind} takes the options {list(allowed)}, got {unknown}")
    probe = _on({k: v for k, v in options.items() if k != "backend"}, torch.device("cpu"))
    target = torch.zeros(1, dtype=torch.long)
    if linear:
        fusedloss.linear_cross_entropy(torch.zeros(1, 1), torch.zeros(num_classes, 1), target, **probe)
    elif loss == "focal":
        fusedloss.focal_loss(torch.zeros(1, num_classes), target, **probe)
    else:
        fusedloss.cross_entropy(torch.zeros(1, num_classes), target, **probe)


def _on(options: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """The options with their tensors (class weights, alpha) on ``device``: they stay where they were given,
    while the model may move."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in options.items()}


def _divide(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """transformers' rule (``fixed_cross_entropy``): a sum divided by the Trainer's count of labelled items."""
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _logits_loss(logits: torch.Tensor, target: torch.Tensor, loss: str, options: Dict[str, Any],
                 num_items_in_batch, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Loss of logits ``(*, C)`` against int64 ``target`` ``(*)`` with ``ignore_index`` ignored: the mean over
    labelled items (Σ w_y for class weights, torch's rule), or the sum / ``num_items_in_batch`` when given."""
    reduction = "mean" if num_items_in_batch is None else "sum"
    target = target.to(logits.device)
    if loss == "focal":
        value = fusedloss.focal_loss(logits, target, ignore_index=ignore_index, reduction=reduction,
                                     **_on(options, logits.device))
    else:
        value = fusedloss.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                                        **_on(options, logits.device))
    return value if num_items_in_batch is None else _divide(value, num_items_in_batch)


# ----------------------------------------------------------------------------------------------
# Patched forwards
# ----------------------------------------------------------------------------------------------


def _keyword_arguments(names: Sequence[str], args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Positional arguments of a forward as keywords (``names``: its parameters after ``self``)."""
    if len(args) > len(names):
        raise TypeError(f"forward() takes at most {len(names)} positional arguments, got {len(args)}")
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"forward() got multiple values for argument {name!r}")
        kwargs[name] = value
    return kwargs


def _wants_dict(model: nn.Module, kwargs: Dict[str, Any]) -> bool:
    """``return_dict`` as transformers' ``can_return_tuple`` resolves it (popped from ``kwargs``)."""
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return bool(return_dict)


def _positional_names(forward: Callable) -> List[str]:
    parameters = list(inspect.signature(forward).parameters.values())[1:]  # after self
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _with_loss(output: Any, loss: torch.Tensor) -> Any:
    """``output`` (a ModelOutput) with ``loss`` set, rebuilt so that ``to_tuple()`` puts the loss first."""
    return type(output)(**{**dict(output.items()), "loss": loss})


def _problem_type(model: nn.Module, labels: torch.Tensor) -> str:
    """transformers' rule for sequence classification, written into the config as transformers does."""
    config = model.config
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif config.num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    return config.problem_type


def _classification_forward(cls_forward: Callable, sequence: bool, loss: str, options: Dict[str, Any]) -> Callable:
    names = _positional_names(cls_forward)

    @functools.wraps(cls_forward)  # keeps the signature the Trainer and generate() inspect
    def forward(self, *args, **kwargs):
        kwargs = _keyword_arguments(names, args, kwargs)
        labels = kwargs.get("labels")
        if labels is None or (sequence and _problem_type(self, labels) != "single_label_classification"):
            return cls_forward(self, **kwargs)  # no loss, regression or multi-label: the model's own forward
        kwargs.pop("labels")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        return_dict = _wants_dict(self, kwargs)
        output = cls_forward(self, return_dict=True, **kwargs)
        logits = output.logits
        output = _with_loss(output, _logits_loss(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), loss,
                                                 options, num_items_in_batch))
        return output if return_dict else output.to_tuple()

    return forward


def _keeps_every_position(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


def _causal_lm_forward(cls_forward: Callable, base_name: str, output_name: str, loss: str,
                       options: Dict[str, Any]) -> Callable:
    names = _positional_names(cls_forward)
    output_class = getattr(_require_transformers().modeling_outputs, output_name)
    fields = {f.name for f in dataclasses.fields(output_class)} - {"loss", "logits"}

    @functools.wraps(cls_forward)  # keeps the signature the Trainer and generate() inspect
    def forward(self, *args, **kwargs):
        kwargs = _keyword_arguments(names, args, kwargs)
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if (labels is None and shift_labels is None) or not _keeps_every_position(kwargs.get("logits_to_keep", 0)):
            # Inference, generate(), or logits of a few positions only: the model's own forward.
            return cls_forward(self, **kwargs)
        num_items_in_batch = kwargs.get("num_items_in_batch")
        ignore_index = kwargs.get("ignore_index", IGNORE_INDEX)  # as transformers' ForCausalLMLoss takes it
        for name in ("labels", "logits_to_keep", *_LOSS_KWARGS):
            kwargs.pop(name, None)
        return_dict = _wants_dict(self, kwargs)
        if shift_labels is None:
            # transformers' ForCausalLMLoss: position t predicts labels[t + 1]; the last position predicts nothing.
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.to(self.lm_head.weight.device)

        if not self.training:
            # Evaluation keeps the logits (metrics read them); the loss still uses the options.
            output = cls_forward(self, return_dict=True, **kwargs)
            output = _with_loss(output, _logits_loss(output.logits, shift_labels, loss, options, num_items_in_batch,
                                                     ignore_index))
            return output if return_dict else output.to_tuple()

        base_output = getattr(self, base_name)(**kwargs)
        hidden_states = base_output[0]
        reduction = "mean" if num_items_in_batch is None else "sum"
        value = fusedloss.linear_cross_entropy(
            hidden_states, self.lm_head.weight, shift_labels, linear_bias=self.lm_head.bias,
            ignore_index=ignore_index, reduction=reduction, **_on(options, hidden_states.device))
        if num_items_in_batch is not None:
            value = _divide(value, num_items_in_batch)
        output = output_class(loss=value, logits=None,
                              **{name: getattr(base_output, name, None) for name in fields})
        return output if return_dict else output.to_tuple()

    return forward


def apply(model: nn.Module, *, loss: str = "cross_entropy", **options: Any) -> nn.Module:
    """Make one transformers model compute its training loss with fusedloss; patches ``model`` in place and
    returns it.

    Only this instance changes: it gets its own ``forward`` (with the signature of its class's forward, which
    the Trainer and ``generate()`` inspect); ``del model.forward`` restores the class's. Applying again
    replaces the earlier options. Labels equal to -100 are ignored, as everywhere in transformers.

    Supported models:

    - ``*ForTokenClassification`` and ``*ForSequenceClassification`` (any family, whether it calls
      ``model.loss_function`` or computes its loss inline as BERT does): the forward runs without labels and
      the loss is computed from its logits. ``loss="cross_entropy"`` (:func:`fusedloss.cross_entropy`) takes
      ``weight`` ((C,) tensor), ``label_smoothing``, ``focal_gamma``, ``z_loss``, ``softcap``, ``backend``;
      ``loss="focal"`` (:func:`fusedloss.focal_loss`) takes ``gamma``, ``alpha``, ``label_smoothing``,
      ``backend``. Without ``num_items_in_batch`` the loss is the mean over labelled tokens (Σ w_y with class
      weights, torch's rule); with it (the Trainer passes it under gradient accumulation) it is the sum
      divided by ``num_items_in_batch``, as transformers' ``fixed_cross_entropy``. (transformers' own BERT
      forward ignores ``num_items_in_batch``.) Sequence classification: single-label classification
      (``problem_type`` ``single_label_classification``, or ``num_labels > 1`` with integer labels) uses
      fusedloss; regression and multi-label classification run the model's own forward unchanged.
    - Causal LMs: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
      ``GPT2LMHeadModel`` (:data:`SUPPORTED_CAUSAL_LMS`); ``loss="cross_entropy"`` only (use ``focal_gamma``
      for a focal factor), with the options above plus ``chunk_size``. In training mode with ``labels`` (or
      ``shift_labels``), the base model's last hidden state ``(B, T, H)`` goes to
      :func:`fusedloss.linear_cross_entropy` with ``lm_head.weight`` (GPT-2's is tied to the token
      embedding, which then gets both gradients) and ``lm_head.bias``, against the shifted labels
      (position t predicts ``labels[t + 1]``; the last position is ignored; ``shift_labels`` and
      ``ignore_index`` keyword arguments are taken as transformers' ``ForCausalLMLoss`` takes them),
      reduced as above (mean over non-ignored positions, or sum / ``num_items_in_batch``). The
      ``(B, T, V)`` logits are never materialized and the output's ``logits`` is None; ``hidden_states``,
      ``attentions`` and ``cache`` are the base model's. In eval mode with labels the logits are computed
      (metrics read them) and the loss is :func:`fusedloss.cross_entropy` of them with the same options.
      Without labels (inference, ``generate()``), or with ``logits_to_keep`` other than 0, the model's own
      forward runs unchanged.

    Unsupported model: ``ValueError`` naming its class and the supported ones. Unknown ``loss`` or option
    names: ``ValueError``; bad option values: fusedloss's ``ValueError`` (``TypeError`` for a wrong type),
    raised here rather than at the first training step.
    """
    _require_transformers()
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if loss not in ("cross_entropy", "focal"):
        raise ValueError(f"loss must be 'cross_entropy' or 'focal', got {loss!r}")
    cls = type(model)
    name = cls.__name__
    if name in SUPPORTED_CAUSAL_LMS:
        if loss != "cross_entropy":
            raise ValueError(f"loss={loss!r} is not available for causal LMs ({name}): use loss='cross_entropy' "
                             "with focal_gamma=...")
        _check_options(loss, options, _LINEAR_OPTIONS, model.config.get_text_config().vocab_size, name, linear=True)
        forward = _causal_lm_forward(cls.forward, *SUPPORTED_CAUSAL_LMS[name], loss, dict(options))
    elif name.endswith(_CLASSIFICATION_SUFFIXES) and "labels" in inspect.signature(cls.forward).parameters:
        allowed = _FOCAL_OPTIONS if loss == "focal" else _CROSS_ENTROPY_OPTIONS
        _check_options(loss, options, allowed, model.config.num_labels, name)
        forward = _classification_forward(cls.forward, name.endswith("ForSequenceClassification"), loss,
                                          dict(options))
    else:
        raise ValueError(
            f"fusedloss.transformers.apply does not support {name}: supported are *ForTokenClassification and "
            f"*ForSequenceClassification models, and the causal LMs {', '.join(SUPPORTED_CAUSAL_LMS)}"
        )
    # A bound method on the instance: copy.deepcopy rebinds it to the copy.
    model.forward = forward.__get__(model, cls)
    return model


# ----------------------------------------------------------------------------------------------
# CRF head over sub-word token classification
# ----------------------------------------------------------------------------------------------


def first_subword_mask(word_ids: Sequence[Sequence[Optional[int]]], seq_len: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, seq_len)`` bool mask of the first sub-word of each word, from a fast tokenizer's
    ``encoding.word_ids(i)`` per sentence (None for special tokens and padding; shorter lists are padded)."""
    mask = torch.zeros(len(word_ids), seq_len, dtype=torch.bool)
    for row, ids in enumerate(word_ids):
        previous = None
        for position, word in enumerate(list(ids)[:seq_len]):
            if word is not None and word != previous:
                mask[row, position] = True
            previous = word
    return mask.to(device)


def compact_words(values: torch.Tensor, first: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather the positions where ``first`` (``(B, T)`` bool) is set into left-aligned rows.

    ``values`` ``(B, T, ...)`` becomes ``(B, W, ...)`` with W the most words of a sentence (at least 1); the
    returned mask ``(B, W)`` marks the words of each sentence. Differentiable w.r.t. ``values`` (a gather);
    entries past each sentence's words are copies of some position and must be masked.
    """
    counts = first.sum(1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    # A stable sort of "not a word" puts each sentence's word positions first, in order.
    order = torch.sort((~first).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    index = order.reshape(*order.shape, *([1] * (values.dim() - 2))).expand(*order.shape, *values.shape[2:])
    word_mask = torch.arange(width, device=first.device)[None, :] < counts[:, None]
    return values.gather(1, index), word_mask


class CRFTagger(nn.Module):
    """A linear-chain CRF over the words of a sub-word token-classification model (BERT-CRF).

    Args:
        model: a ``*ForTokenClassification`` model (or any module whose output has ``logits (B, T, K)``)
            with ``config.num_labels == len(labels)``; its logits are the CRF's emissions.
        labels: the K tag names in index order (``"O"``, ``"B-PER"``, ...).
        scheme: tagging scheme of :func:`fusedloss.allowed_transitions` (``"BIO"``, ``"IOB1"``, ``"BIOES"``,
            ``"BMES"``); the CRF (``self.crf``, a :class:`fusedloss.CRF`) gets its constraints, so neither the
            loss nor decoding gives weight to a forbidden transition.

    Words: the first sub-word of each word carries its tag; the others are -100 in ``labels`` (what the
    transformers token-classification recipe produces). Each sentence's first sub-words are compacted into a
    left-aligned sequence of its words, and the CRF runs over those.

    ``forward(input_ids, attention_mask, labels, ...)`` returns a ``TokenClassifierOutput`` with ``logits``
    the sub-word emissions ``(B, T, K)`` and, when ``labels`` are given, ``loss`` = the CRF negative
    log-likelihood averaged over the sentences that have at least one word (0, with a gradient, when none
    has). Works with the Trainer (``accepts_loss_kwargs = False``: the loss is a per-batch mean, which the
    Trainer divides by the gradient-accumulation steps). ``decode`` gives constrained Viterbi tags per word.
    """

    main_input_name = "input_ids"
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, labels: Sequence[str], *, scheme: str = "BIO") -> None:
        _require_transformers()
        super().__init__()
        labels = list(labels)
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels is not None and num_labels != len(labels):
            raise ValueError(f"model.config.num_labels ({num_labels}) must equal len(labels) ({len(labels)})")
        self.model = model
        self.config = getattr(model, "config", None)
        self.labels = labels
        self.scheme = scheme
        self.crf = CRF(len(labels), batch_first=True, constraints=allowed_transitions(scheme, labels))

    def _emissions(self, input_ids, attention_mask, token_type_ids, kwargs) -> Any:
        for name in ("return_dict", "num_items_in_batch"):
            kwargs.pop(name, None)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)

    @staticmethod
    def word_positions(shape: Tuple[int, int], device: torch.device, labels: Optional[torch.Tensor] = None,
                       word_mask: Optional[torch.Tensor] = None,
                       word_ids: Optional[Sequence[Sequence[Optional[int]]]] = None) -> torch.Tensor:
        """The ``(B, T)`` bool mask of first sub-words, from exactly one of: ``labels`` (not -100),
        ``word_mask`` (bool/int, nonzero at first sub-words), or ``word_ids`` (a fast tokenizer's
        ``encoding.word_ids(i)`` per sentence)."""
        given = [name for name, v in (("labels", labels), ("word_mask", word_mask), ("word_ids", word_ids))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of labels, word_mask or word_ids to locate the words, got {given}")
        if word_ids is not None:
            return first_subword_mask(word_ids, shape[1], device)
        mask = labels != IGNORE_INDEX if labels is not None else word_mask.to(device).bool()
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{given[0]} must have shape (batch, seq_len) = {tuple(shape)}, got {tuple(mask.shape)}")
        return mask.to(device)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """Emissions of the wrapped model and, with ``labels`` ``(B, T)`` (tags at first sub-words, -100
        elsewhere), the CRF negative log-likelihood of the compacted word sequences (mean over sentences)."""
        from transformers.modeling_outputs import TokenClassifierOutput

        output = self._emissions(input_ids, attention_mask, token_type_ids, kwargs)
        emissions = output.logits
        loss = None
        if labels is not None:
            labels = labels.to(emissions.device)
            first = self.word_positions(tuple(labels.shape), emissions.device, labels=labels)
            word_emissions, word_mask = compact_words(emissions, first)
            tags, _ = compact_words(labels, first)
            has_words = word_mask[:, 0]
            if bool(has_words.all()):
                llh = self.crf(word_emissions, tags.masked_fill(~word_mask, 0), word_mask, reduction="none")
            else:
                llh = self.crf(word_emissions[has_words], tags[has_words].masked_fill(~word_mask[has_words], 0),
                               word_mask[has_words], reduction="none")
            loss = -llh.mean() if llh.numel() else emissions.sum() * 0.0
        return TokenClassifierOutput(loss=loss, logits=emissions, hidden_states=output.hidden_states,
                                     attentions=output.attentions)

    @torch.no_grad()
    def decode(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        *,
        labels: Optional[torch.Tensor] = None,
        word_mask: Optional[torch.Tensor] = None,
        word_ids: Optional[Sequence[Sequence[Optional[int]]]] = None,
        **kwargs: Any,
    ) -> List[List[int]]:
        """Constrained Viterbi tag ids per word: a list per sentence with one tag id per word, in word order
        (``[]`` for a sentence without words). The words are located by exactly one of ``labels`` (not -100),
        ``word_mask`` ``(B, T)`` (nonzero at the first sub-word of each word) or ``word_ids`` (a fast
        tokenizer's ``encoding.word_ids(i)`` for each sentence). ``self.labels[i]`` names tag id i."""
        emissions = self._emissions(input_ids, attention_mask, token_type_ids, kwargs).logits
        first = self.word_positions(tuple(emissions.shape[:2]), emissions.device, labels, word_mask, word_ids)
        word_emissions, words = compact_words(emissions, first)
        has_words = words[:, 0]
        paths = [[] for _ in range(emissions.shape[0])]
        if bool(has_words.any()):
            rows = has_words.nonzero().flatten().tolist()
            decoded = self.crf.decode(word_emissions[has_words], words[has_words])
            for row, path in zip(rows, decoded):
                paths[row] = path
        return paths
