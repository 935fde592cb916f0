"""examples/train_ner.py: entity F1 against hand-computed cases and seqeval's documented outputs, the
generated corpus and the CoNLL reader, and a few training steps with both backends."""

import math
import os
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import ner_corpus  # noqa: E402
import train_ner  # noqa: E402
from ner_metrics import entity_scores, get_entities  # noqa: E402

# seqeval's docstring and README example (seqeval 1.2.2): f1/precision/recall 0.50, MISC 0.00, PER 1.00.
SEQEVAL_TRUE = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
SEQEVAL_PRED = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches run fastest on one thread, and the machine is shared with the rest of the suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_seqeval_documented_examples():
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert get_entities(["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O", "B-PER", "I-PER"]) == [
        ("MISC", 3, 5), ("PER", 7, 8)]
    scores = entity_scores(SEQEVAL_TRUE, SEQEVAL_PRED)
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.5, 0.5, 0.5)
    assert scores["per_type"]["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}


def test_ill_formed_sequences_follow_conlleval():
    # An I- after O (or at the start) opens an entity; a type change closes one and opens another.
    assert get_entities(["O", "I-PER", "I-PER", "O"]) == [("PER", 1, 2)]
    assert get_entities(["I-ORG"]) == [("ORG", 0, 0)]
    assert get_entities(["B-PER", "I-LOC", "O"]) == [("PER", 0, 0), ("LOC", 1, 1)]
    assert get_entities(["B-LOC", "B-LOC", "I-LOC"]) == [("LOC", 0, 0), ("LOC", 1, 2)]
    assert get_entities(["B-PER", "I-PER", "I-ORG", "I-ORG"]) == [("PER", 0, 1), ("ORG", 2, 3)]


def test_hand_computed_scores():
    # Gold: PER(0,1), LOC(3,3), MISC(0,1) of sentence 2. Predicted: PER(0,0) and LOC(1,1) from the
    # type mismatch, LOC(3,3) correct; MISC(0,1) correct from the ill-formed I- start.
    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-MISC", "I-MISC", "O"]]
    y_pred = [["B-PER", "I-LOC", "O", "B-LOC"], ["I-MISC", "I-MISC", "O"]]
    scores = entity_scores(y_true, y_pred)
    assert (scores["correct"], scores["predicted"], scores["gold"]) == (2, 4, 3)
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert scores["per_type"]["PER"]["f1"] == 0.0
    assert scores["per_type"]["LOC"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    # An entity at the end of one sentence and one at the start of the next are not merged.
    assert entity_scores([["O", "B-PER"], ["I-PER"]], [["O", "B-PER"], ["I-PER"]])["gold"] == 2
    assert entity_scores([["O"]], [["O"]])["f1"] == 0.0
    with pytest.raises(ValueError):
        entity_scores([["O", "O"]], [["O"]])


def test_iob1_files_become_iob2():
    assert ner_corpus.iob1_to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == [
        "B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]
    assert ner_corpus.iob1_to_iob2(iob2) == iob2


def test_generated_corpus_is_deterministic_bio_and_round_trips(tmp_path):
    sentences = ner_corpus.generate(300, seed=3, unseen_names=False)
    assert sentences == ner_corpus.generate(300, seed=3, unseen_names=False)
    tags = [t for _, ts in sentences for t in ts]
    assert {t[2:] for t in tags if t != "O"} == {"PER", "ORG", "LOC", "MISC"}
    for _, ts in sentences:
        for previous, tag in zip(["O"] + ts, ts):  # valid IOB2: I-X only after B-X or I-X
            assert not tag.startswith("I-") or previous[2:] == tag[2:]
    assert any(len(span) > 1 for s in sentences for span in [e for e in get_entities(s[1]) if e[2] > e[1]])
    ner_corpus.write_corpus(str(tmp_path), 40, 20, seed=3)
    splits = ner_corpus.read_corpus(str(tmp_path))
    assert [len(splits[k]) for k in ("train", "dev", "test")] == [40, 20, 20]
    assert splits["train"] == ner_corpus.generate(40, seed=3, unseen_names=False)
    # Names held out of training appear in the evaluation data only.
    def names(sentences):
        return {" ".join(words[a: b + 1]) for words, tags in sentences for _, a, b in get_entities(tags)}

    train_names = names(ner_corpus.generate(2000, 0, unseen_names=False))
    eval_names = names(ner_corpus.generate(2000, 0, unseen_names=True))
    held_out = {n for t in ner_corpus.GAZETTEERS for n in ner_corpus._shuffled_split(t)[1]}
    assert not train_names & held_out and eval_names & held_out


def test_majority_baseline_hand_computed():
    train = [(["Paris", "is", "nice"], ["B-LOC", "O", "O"]), (["Paris", "Hilton"], ["B-PER", "I-PER"]),
             (["Paris"], ["B-LOC"])]
    test = [(["Paris", "Hilton", "Rome"], ["B-LOC", "B-PER", "B-LOC"])]
    # Predicted B-LOC I-PER O: LOC(0,0) correct, PER(1,1) from the ill-formed I-PER is correct too.
    scores = train_ner.majority_baseline(train, test)
    assert (scores["correct"], scores["predicted"], scores["gold"]) == (2, 2, 3)


def _args(tmp_path, *extra):
    return train_ner.build_parser().parse_args(
        ["--train-sentences", "24", "--eval-sentences", "8", "--batch-size", "8", "--corpus-dir", str(tmp_path),
         *extra])


def test_a_few_training_steps_with_both_backends(tmp_path):
    result = train_ner.run(_args(tmp_path, "--epochs", "2", "--max-steps", "2"), log=lambda *a: None)
    assert result["labels"] == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    runs = {(r["model"], r["backend"]): r for r in result["results"]}
    assert set(runs) == {(m, b) for m in ("crf", "softmax") for b in ("fusedloss", "eager")}
    for r in runs.values():
        assert len(r["losses"]) == 4 and all(math.isfinite(v) and v > 0 for v in r["losses"])
        assert len(r["epoch_seconds"]) == 2 and min(r["epoch_seconds"]) > 0
        assert 0.0 <= r["test"]["f1"] <= 1.0
    # Same model, seed and batches: fusedloss and eager + pytorch-crf give the same losses.
    for model in ("crf", "softmax"):
        assert runs[(model, "fusedloss")]["losses"] == pytest.approx(runs[(model, "eager")]["losses"], rel=1e-4)
    assert "majority tag per word" in train_ner.format_summary(result["baselines"], result["results"])


def test_data_directory_and_constrained_decoding(tmp_path):
    ner_corpus.write_corpus(str(tmp_path), 24, 8, seed=5)
    args = _args(tmp_path, "--data", str(tmp_path), "--epochs", "1", "--max-steps", "1", "--models", "crf",
                 "--backends", "fusedloss")
    assert train_ner.run(args, log=lambda *a: None)["results"][0]["model"] == "crf"
    # Decoding never produces a BIO-invalid sequence, even from an untrained model.
    splits = ner_corpus.read_corpus(str(tmp_path))
    labels = train_ner.bio_labels(splits["train"])
    vocab = train_ner.build_vocab(splits["train"])
    data = train_ner.Encoded(splits["test"], vocab, labels)
    for kind in ("crf", "softmax"):
        model = train_ner.Tagger(kind, "fusedloss", len(vocab) + 2, labels, seed=0)
        with torch.no_grad():  # large random emissions make unconstrained paths invalid
            model.encoder.emissions.weight.mul_(50)
        words, shapes, _, mask, lengths = data.batch(torch.arange(len(data.sentences)), torch.device("cpu"))
        for path in model.predict(words, shapes, mask, lengths):
            tags = [labels[i] for i in path]
            for previous, tag in zip(["O"] + tags, tags):
                assert not tag.startswith("I-") or previous[2:] == tag[2:], tags


def test_partial_annotation_experiment(tmp_path):
    """--hide-entities: the fuzzy CRF trains on partial labels (hidden entities unlabeled), the plain CRF on the
    same entities tagged O; the fused and the pure-PyTorch fuzzy CRF train the same model; hiding every entity
    unlabels exactly the entity tokens."""
    args = _args(tmp_path, "--epochs", "1", "--max-steps", "2", "--models", "crf,fuzzy", "--backends",
                 "fusedloss,eager", "--hide-entities", "0.5")
    logged = []
    result = train_ner.run(args, log=logged.append)
    assert any(line.startswith("partial annotation: ") for line in logged)
    runs = {(r["model"], r["backend"]): r for r in result["results"]}
    assert set(runs) == {(m, b) for m in ("crf", "fuzzy") for b in ("fusedloss", "eager")}
    for r in runs.values():
        assert all(math.isfinite(v) and v > 0 for v in r["losses"])
    # The fused fuzzy CRF and its pure-PyTorch reference train the same model.
    assert runs[("fuzzy", "fusedloss")]["losses"] == pytest.approx(runs[("fuzzy", "eager")]["losses"], rel=1e-4)
    splits = ner_corpus.read_corpus(str(tmp_path))
    labels = train_ner.bio_labels(splits["train"])
    data = train_ner.Encoded(splits["train"], train_ner.build_vocab(splits["train"]), labels)
    hidden = data.hide_entities(labels, 1.0, seed=0)
    assert hidden == sum(len(get_entities(tags)) for _, tags in splits["train"])
    assert bool((data.hidden == (data.tags != labels.index("O"))).all())
