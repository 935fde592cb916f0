"""Entity-level precision, recall and F1, compatible with seqeval's default mode (and so with the
CoNLL-2000/2003 ``conlleval`` script).

An entity is a maximal span ``(type, start, end)`` read from IOB2/IOBES tags with conlleval's rules
for ill-formed sequences: a chunk ends when the tag after it is B, S or O, when the previous tag
was E or S, or when the type changes; a chunk starts at B or S, at I or E after O, E or S, and
wherever the type changes. So ``O I-PER I-PER`` is one PER entity, and ``B-PER I-LOC`` is a
one-token PER followed by a one-token LOC. A predicted entity counts as correct only when its
type, start and end all equal those of a gold entity (exact span match); micro-averaged
``precision = correct / predicted``, ``recall = correct / gold``, ``F1 = 2PR / (P + R)`` (0 when
the denominator is 0).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

Entity = Tuple[str, int, int]


def _split(tag: str) -> Tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "_")`` (seqeval's placeholder type)."""
    return tag[0], (tag[1:].split("-", maxsplit=1)[-1] or "_")


def _ends(prev_prefix: str, prefix: str, prev_type: str, type_: str) -> bool:
    return (prev_prefix in ("E", "S")
            or (prev_prefix in ("B", "I") and prefix in ("B", "S", "O"))
            or (prev_prefix not in ("O", ".") and prev_type != type_))


def _starts(prev_prefix: str, prefix: str, prev_type: str, type_: str) -> bool:
    return (prefix in ("B", "S")
            or (prev_prefix in ("E", "S", "O") and prefix in ("E", "I"))
            or (prefix not in ("O", ".") and prev_type != type_))


def get_entities(tags: Sequence[str]) -> List[Entity]:
    """Entities ``(type, start, end)`` (end inclusive) of one tag sequence, in order."""
    entities = []
    prev_prefix, prev_type, begin = "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, type_ = _split(tag)
        if _ends(prev_prefix, prefix, prev_type, type_):
            entities.append((prev_type, begin, i - 1))
        if _starts(prev_prefix, prefix, prev_type, type_):
            begin = i
        prev_prefix, prev_type = prefix, type_
    return entities


def _entity_set(sentences: Sequence[Sequence[str]]) -> Set[Tuple[int, str, int, int]]:
    return {(n, *entity) for n, tags in enumerate(sentences) for entity in get_entities(tags)}


def _prf(correct: int, predicted: int, gold: int) -> Tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_scores(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> Dict:
    """Micro precision/recall/F1 over sentences, and the same per entity type (with its gold count).

    Returns ``{"precision", "recall", "f1", "correct", "predicted", "gold",
    "per_type": {type: {"precision", "recall", "f1", "support"}}}``.
    """
    if len(y_true) != len(y_pred) or any(len(t) != len(p) for t, p in zip(y_true, y_pred)):
        raise ValueError("y_true and y_pred must have the same number of sentences and of tags per sentence")
    gold, predicted = _entity_set(y_true), _entity_set(y_pred)
    correct = gold & predicted
    precision, recall, f1 = _prf(len(correct), len(predicted), len(gold))
    per_type = {}
    for type_ in sorted({entity[1] for entity in gold}):
        of_type = [{e for e in s if e[1] == type_} for s in (correct, predicted, gold)]
        p, r, f = _prf(*map(len, of_type))
        per_type[type_] = {"precision": p, "recall": r, "f1": f, "support": len(of_type[2])}
    return {"precision": precision, "recall": recall, "f1": f1, "correct": len(correct),
            "predicted": len(predicted), "gold": len(gold), "per_type": per_type}
