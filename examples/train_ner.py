"""Train a BiLSTM-CRF and a softmax tagger (focal loss) for named-entity recognition, with fusedloss
and with the eager PyTorch + pytorch-crf equivalent of the same model, and compare them.

Data: a CoNLL-2003 directory given with ``--data`` (``train.txt``/``valid.txt``/``test.txt`` or
``eng.train``/``eng.testa``/``eng.testb``; IOB1 or IOB2 tags), or by default a corpus generated
deterministically by ``ner_corpus.py`` (newswire templates, PER/ORG/LOC/MISC gazetteers, half
of the names unseen in training), written as CoNLL files and read back through the same path.

Models (``--models``), each on the same encoder: word embedding (lower-cased word, with word
dropout to UNK so unseen names get a learned vector) + word-shape embedding -> BiLSTM -> linear
emissions ``(B, T, K)`` over the K BIO tags.

- ``crf``: linear-chain CRF, loss ``-log p(tags | x)`` averaged over sentences, Viterbi decoding.
  ``fusedloss.CRF(K, constraints=allowed_transitions("BIO", labels))``: transitions that BIO forbids
  (``O -> I-X``, ``B-X -> I-Y``, start at ``I-X``) score -inf in training and decoding.
- ``softmax``: per-token ``fusedloss.focal_loss(gamma=2)``; decoding takes the best BIO-valid path
  of the per-token log-probabilities (``fusedloss.crf_viterbi`` with zero transitions and the
  constraints).

- ``fuzzy``: the same CRF learning from partial labels (``--hide-entities``): the tokens of hidden
  training entities are unlabeled, their allowed tag set is every tag (``tags`` as a bool ``(B, T, K)``
  tensor), and the loss is the marginal likelihood of every path through the sets.

Partial annotation (``--hide-entities P``): a fraction P of the training entities, drawn from the seed,
lose their tags, as in a corpus whose annotators (or dictionary) missed them. ``crf`` and ``softmax`` then
train on those tokens tagged O, what a tagger without partial labels has to do; ``fuzzy`` treats them as
unlabeled. Dev and test keep every entity. Compare the entity F1 of ``crf`` and ``fuzzy``::

    python examples/train_ner.py --hide-entities 0.5 --models crf,fuzzy --backends fusedloss

Backends (``--backends``): ``fusedloss`` (``backend="auto"``: the C++ kernels on CPU when built,
Triton on CUDA) and ``eager``: pytorch-crf's ``torchcrf.CRF`` with the same constraints (a
``torch.nn.utils.parametrize`` parametrization writes the forbidden score into its parameters) and
the focal loss written in eager PyTorch (for ``fuzzy``, which pytorch-crf cannot train:
fusedloss's pure-PyTorch reference backend). Both start from the same seed and initial weights and
see the same batches, so they train the same model; what differs is the time per epoch.

Reported: entity-level precision/recall/F1 on dev and test (seqeval-compatible, ``ner_metrics.py``),
the all-O baseline and the per-word majority-tag baseline (each word seen in training gets its most
frequent training tag, others O: CoNLL's baseline), and seconds per training epoch per backend.

    python examples/train_ner.py --quick          # about a minute on a 2-core CPU
    python examples/train_ner.py --data path/to/conll2003 --epochs 20 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedloss
from fusedloss.bench.cases import eager_focal_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ner_corpus import Sentence, read_corpus, write_corpus  # noqa: E402
from ner_metrics import entity_scores, get_entities  # noqa: E402

PAD, UNK = 0, 1
SHAPES = ("pad", "lower", "Title", "UPPER", "digits", "punct", "other")
# Score of a forbidden transition, as docs/BACKENDS.md folds constraints into the parameters.
CONSTRAINT_SCORE = -1e4
FOCAL_GAMMA = 2.0


def word_shape(token: str) -> int:
    """Index in SHAPES of the token's orthographic class: what tells a tagger about an unseen name."""
    if token.isdigit():
        return SHAPES.index("digits")
    if not any(ch.isalnum() for ch in token):
        return SHAPES.index("punct")
    if token.islower():
        return SHAPES.index("lower")
    if token.isupper():
        return SHAPES.index("UPPER")
    if token[0].isupper():
        return SHAPES.index("Title")
    return SHAPES.index("other")


def bio_labels(sentences: Sequence[Sentence]) -> List[str]:
    """``O`` then ``B-X, I-X`` for every entity type X of the data, sorted by type."""
    types = sorted({tag[2:] for _, tags in sentences for tag in tags if tag != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def build_vocab(sentences: Sequence[Sentence]) -> Dict[str, int]:
    """Index of every lower-cased training word, after PAD = 0 and UNK = 1."""
    return {word: i + 2 for i, word in enumerate(sorted({t.lower() for tokens, _ in sentences for t in tokens}))}


class Encoded:
    """A split as padded tensors: word ids, shape ids, tag ids ``(S, T_max)`` int64, lengths ``(S,)``."""

    def __init__(self, sentences: Sequence[Sentence], vocab: Dict[str, int], labels: Sequence[str]):
        label_index = {label: i for i, label in enumerate(labels)}
        unknown = sorted({t for _, tags in sentences for t in tags if t not in label_index})
        if unknown:
            raise ValueError(f"tags {unknown} do not occur in the training data (labels: {list(labels)})")
        self.sentences = list(sentences)
        self.lengths = torch.tensor([len(tokens) for tokens, _ in sentences])
        longest = int(self.lengths.max())
        self.words = torch.full((len(sentences), longest), PAD)
        self.shapes = torch.zeros((len(sentences), longest), dtype=torch.long)
        self.tags = torch.zeros((len(sentences), longest), dtype=torch.long)
        for n, (tokens, tags) in enumerate(sentences):
            self.words[n, : len(tokens)] = torch.tensor([vocab.get(t.lower(), UNK) for t in tokens])
            self.shapes[n, : len(tokens)] = torch.tensor([word_shape(t) for t in tokens])
            self.tags[n, : len(tokens)] = torch.tensor([label_index[t] for t in tags])

    def hide_entities(self, labels: Sequence[str], fraction: float, seed: int) -> int:
        """Drop a ``fraction`` of the entities (each with that probability, from ``seed``): their tokens become
        unlabeled (``self.hidden``). Returns how many were hidden."""
        self.hidden = torch.zeros_like(self.tags, dtype=torch.bool)
        generator = torch.Generator().manual_seed(seed + 1)
        count = 0
        for n, (_, tags) in enumerate(self.sentences):
            for _, begin, end in get_entities(tags):
                if float(torch.rand((), generator=generator)) < fraction:
                    self.hidden[n, begin: end + 1] = True
                    count += 1
        self.outside = labels.index("O")
        return count

    def batch(self, index: torch.Tensor, device: torch.device):
        """(words, shapes, tags, mask, lengths) of the sentences in ``index``, trimmed to their longest."""
        lengths = self.lengths[index]
        width = int(lengths.max())
        mask = torch.arange(width)[None, :] < lengths[:, None]
        return (self.words[index, :width].to(device), self.shapes[index, :width].to(device),
                self.tags[index, :width].to(device), mask.to(device), lengths)

    def hidden_batch(self, index: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        """The unlabeled tokens of the sentences in ``index`` (None when nothing was hidden)."""
        hidden = getattr(self, "hidden", None)
        if hidden is None:
            return None
        return hidden[index, : int(self.lengths[index].max())].to(device)


class Encoder(nn.Module):
    """Embeddings of the lower-cased word and of its shape -> BiLSTM -> emissions ``(B, T, K)``."""

    def __init__(self, vocab_size: int, num_tags: int, word_dim: int = 64, shape_dim: int = 8, hidden: int = 64):
        super().__init__()
        self.words = nn.Embedding(vocab_size, word_dim, padding_idx=PAD)
        self.shapes = nn.Embedding(len(SHAPES), shape_dim)
        self.lstm = nn.LSTM(word_dim + shape_dim, hidden, batch_first=True, bidirectional=True)
        self.emissions = nn.Linear(2 * hidden, num_tags)

    def forward(self, words, shapes, lengths):
        features = torch.cat([self.words(words), self.shapes(shapes)], dim=-1)
        packed = pack_padded_sequence(features, lengths.cpu(), batch_first=True, enforce_sorted=False)
        hidden, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=words.shape[1])
        return self.emissions(hidden)


class _Forbid(nn.Module):
    """Parametrization that gives forbidden entries of a transition tensor the constraint score."""

    def __init__(self, allowed: torch.Tensor):
        super().__init__()
        self.register_buffer("allowed", allowed)

    def forward(self, scores):
        return torch.where(self.allowed, scores, torch.full_like(scores, CONSTRAINT_SCORE))


def constrained_torchcrf(num_tags: int, constraints) -> nn.Module:
    """``torchcrf.CRF`` computing what ``fusedloss.CRF(constraints=...)`` computes: pytorch-crf reads
    ``self.transitions`` (and the start and end scores) wherever it scores a path, so a
    parametrization that overwrites the forbidden entries applies the constraints everywhere."""
    import torchcrf

    crf = torchcrf.CRF(num_tags, batch_first=True)
    for name, allowed in zip(("start_transitions", "end_transitions", "transitions"),
                             (constraints[1], constraints[2], constraints[0])):
        parametrize.register_parametrization(crf, name, _Forbid(allowed))
    return crf


class Tagger(nn.Module):
    """Encoder + a CRF (``kind="crf"``; ``"fuzzy"`` learns from partial labels) or per-token focal loss
    (``kind="softmax"``) on one backend."""

    def __init__(self, kind: str, backend: str, vocab_size: int, labels: Sequence[str], seed: int):
        super().__init__()
        self.kind, self.backend = kind, backend
        num_tags = len(labels)
        torch.manual_seed(seed)
        self.encoder = Encoder(vocab_size, num_tags)
        allowed, allowed_start, allowed_end = fusedloss.allowed_transitions("BIO", list(labels))
        self.register_buffer("allowed", allowed)
        self.register_buffer("allowed_start", allowed_start)
        self.register_buffer("allowed_end", allowed_end)
        if kind not in ("crf", "fuzzy"):
            self.crf = None
            return
        if backend == "fusedloss" or kind == "fuzzy":
            self.crf = fusedloss.CRF(num_tags, batch_first=True, constraints=(allowed, allowed_start, allowed_end),
                                     backend="auto" if backend == "fusedloss" else "reference")
            raw = self.crf
        else:
            self.crf = constrained_torchcrf(num_tags, (allowed, allowed_start, allowed_end))
            raw = self.crf.parametrizations
        # The same initial CRF scores for both backends: pytorch-crf's uniform(-0.1, 0.1), from the seed.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name in ("start_transitions", "end_transitions", "transitions"):
                target = getattr(raw, name)
                target = target if isinstance(target, torch.Tensor) else target.original
                target.copy_(torch.empty(target.shape).uniform_(-0.1, 0.1, generator=generator))

    def loss(self, words, shapes, tags, mask, lengths, hidden=None) -> torch.Tensor:
        emissions = self.encoder(words, shapes, lengths)
        if self.kind == "fuzzy" and hidden is not None:
            # Partial labels: a labeled token allows its tag, an unlabeled one every tag.
            allowed = torch.nn.functional.one_hot(tags, emissions.shape[-1]).bool() | hidden.unsqueeze(-1)
            return -self.crf(emissions, allowed, mask, reduction="mean")
        if self.crf is not None:
            # cached(): pytorch-crf reads the transitions at every time step; the constrained ones
            # are computed once per call, as fusedloss does.
            with parametrize.cached():
                return -self.crf(emissions, tags, mask, reduction="mean")
        if self.backend == "fusedloss":
            return fusedloss.focal_loss(emissions[mask], tags[mask], gamma=FOCAL_GAMMA)
        return eager_focal_loss(emissions[mask], tags[mask], gamma=FOCAL_GAMMA)

    @torch.no_grad()
    def predict(self, words, shapes, mask, lengths) -> List[List[int]]:
        emissions = self.encoder(words, shapes, lengths)
        if self.crf is not None:
            with parametrize.cached():
                return self.crf.decode(emissions, mask)
        # Best BIO-valid path of the per-token log-probabilities: Viterbi with zero scores for
        # allowed transitions and the constraint score for forbidden ones.
        def scores(allowed):
            return torch.where(allowed, 0.0, CONSTRAINT_SCORE).to(emissions.dtype)

        paths, _ = fusedloss.crf_viterbi(
            emissions.log_softmax(-1), scores(self.allowed), scores(self.allowed_start), scores(self.allowed_end),
            mask, backend="auto" if self.backend == "fusedloss" else "reference")
        return [row[: int(n)] for row, n in zip(paths.tolist(), mask.sum(-1))]


def evaluate(model: Tagger, data: Encoded, labels: Sequence[str], device: torch.device, batch_size: int = 256):
    model.eval()
    predicted = []
    for start in range(0, len(data.sentences), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data.sentences)))
        words, shapes, _, mask, lengths = data.batch(index, device)
        predicted.extend([labels[i] for i in path] for path in model.predict(words, shapes, mask, lengths))
    model.train()
    return entity_scores([tags for _, tags in data.sentences], predicted)


def majority_baseline(train: Sequence[Sentence], test: Sequence[Sentence]) -> Dict:
    """Entity scores of tagging each word with its most frequent tag in training (O when unseen)."""
    counts: Dict[str, Counter] = defaultdict(Counter)
    for tokens, tags in train:
        for token, tag in zip(tokens, tags):
            counts[token][tag] += 1
    predicted = [[counts[t].most_common(1)[0][0] if t in counts else "O" for t in tokens] for tokens, _ in test]
    return entity_scores([tags for _, tags in test], predicted)


def train_one(kind: str, backend: str, splits: Dict[str, Encoded], vocab_size: int, labels: Sequence[str],
              args, device: torch.device, log=print) -> Dict:
    """Train one (model, backend) pair; returns its epoch times, losses and dev/test scores."""
    model = Tagger(kind, backend, vocab_size, labels, args.seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    train = splits["train"]
    epoch_seconds, losses, dev_f1 = [], [], []
    for epoch in range(args.epochs):
        order = torch.randperm(len(train.sentences), generator=generator)
        batches = [order[i: i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        if args.max_steps:
            batches = batches[: args.max_steps]
        # Word dropout: a fixed fraction of training tokens becomes UNK, drawn from the seed.
        dropped = torch.rand(train.words.shape, generator=generator) < args.word_dropout
        total, start = 0.0, time.perf_counter()
        for index in batches:
            words, shapes, tags, mask, lengths = train.batch(index, device)
            words = torch.where(dropped[index, : words.shape[1]].to(device) & mask, UNK, words)
            hidden = train.hidden_batch(index, device)
            if hidden is not None and kind != "fuzzy":
                tags = torch.where(hidden, train.outside, tags)  # no partial labels: a missing entity is O
            loss = model.loss(words, shapes, tags, mask, lengths, hidden)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            total += losses[-1]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)
        dev_f1.append(evaluate(model, splits["dev"], labels, device)["f1"])
        log(f"  {kind:<7} {backend:<9} epoch {epoch + 1:>2}: loss {total / len(batches):8.4f}  "
            f"{epoch_seconds[-1]:6.2f} s  dev F1 {dev_f1[-1]:.3f}")
    return {"model": kind, "backend": backend, "epoch_seconds": epoch_seconds, "losses": losses,
            "dev_f1": dev_f1, "test": evaluate(model, splits["test"], labels, device)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="CoNLL-2003 directory (default: generate a corpus)")
    parser.add_argument("--corpus-dir", help="where to write the generated corpus (default: a temporary directory)")
    parser.add_argument("--train-sentences", type=int, default=None, help="generated training sentences (default 2000)")
    parser.add_argument("--eval-sentences", type=int, default=None,
                        help="generated dev and test sentences each (default 400)")
    parser.add_argument("--models", default="crf,softmax", help="comma-separated: crf, softmax, fuzzy")
    parser.add_argument("--hide-entities", type=float, default=0.0,
                        help="fraction of training entities left unlabeled (partial annotation; default 0)")
    parser.add_argument("--backends", default="fusedloss,eager", help="comma-separated: fusedloss, eager")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 6, quick 3)")
    parser.add_argument("--quick", action="store_true", help="smaller corpus and fewer epochs (about a minute)")
    parser.add_argument("--max-steps", type=int, default=0, help="at most this many batches per epoch (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--word-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return parser


def run(args, log=print) -> Dict:
    """Everything the command does; returns the baselines and one result per (model, backend)."""
    device = torch.device(args.device)
    quick = bool(args.quick)
    args.epochs = args.epochs if args.epochs is not None else (3 if quick else 6)
    if args.data:
        splits_text = read_corpus(args.data)
    else:
        num_train = args.train_sentences or (800 if quick else 2000)
        num_eval = args.eval_sentences or (200 if quick else 400)
        with tempfile.TemporaryDirectory() as scratch:
            directory = args.corpus_dir or scratch
            write_corpus(directory, num_train, num_eval, seed=args.seed)
            splits_text = read_corpus(directory)
    labels = bio_labels(splits_text["train"])
    vocab = build_vocab(splits_text["train"])
    splits = {name: Encoded(sentences, vocab, labels) for name, sentences in splits_text.items()}
    if args.hide_entities > 0:
        hidden = splits["train"].hide_entities(labels, args.hide_entities, args.seed)
        total = sum(len(get_entities(tags)) for _, tags in splits_text["train"])
        log(f"partial annotation: {hidden} of {total} training entities unlabeled")
    log(f"data: {', '.join(f'{k} {len(v)} sentences' for k, v in splits_text.items())}; "
        f"{len(labels)} tags; vocabulary {len(vocab)}; device {device}; fusedloss backends "
        f"{[k for k, v in fusedloss.available_backends().items() if v is None]}")
    baselines = {"all O": entity_scores([t for _, t in splits_text["test"]],
                                        [["O"] * len(t) for _, t in splits_text["test"]]),
                 "majority tag per word": majority_baseline(splits_text["train"], splits_text["test"])}
    results = []
    for kind in args.models.split(","):
        for backend in args.backends.split(","):
            results.append(train_one(kind, backend, splits, len(vocab) + 2, labels, args, device, log))
    log("\n" + format_summary(baselines, results))
    return {"baselines": baselines, "results": results, "labels": labels}


def format_summary(baselines: Dict, results: Sequence[Dict]) -> str:
    """Test scores and seconds per epoch (median over epochs) with the speed-up over eager."""
    eager_seconds = {r["model"]: statistics.median(r["epoch_seconds"]) for r in results if r["backend"] == "eager"}
    lines = [f"{'test set':<32} {'precision':>9} {'recall':>7} {'F1':>7} {'s/epoch':>8} {'vs eager':>9}"]
    for name, scores in baselines.items():
        lines.append(f"{'baseline: ' + name:<32} {scores['precision']:>9.3f} {scores['recall']:>7.3f} "
                     f"{scores['f1']:>7.3f}")
    for r in results:
        seconds = statistics.median(r["epoch_seconds"])
        ratio: Optional[float] = eager_seconds.get(r["model"])
        speedup = f"{ratio / seconds:.2f}x" if ratio else "-"
        lines.append(f"{r['model'] + ' / ' + r['backend']:<32} {r['test']['precision']:>9.3f} "
                     f"{r['test']['recall']:>7.3f} {r['test']['f1']:>7.3f} {seconds:>8.2f} {speedup:>9}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
