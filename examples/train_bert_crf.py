"""Train a tiny BERT-CRF named-entity tagger with the Hugging Face Trainer, and compare it with the unpatched
BertForTokenClassification (its own CrossEntropyLoss) and with the same model after ``fusedloss.transformers.apply``.

Nothing is downloaded. The data is the CoNLL-2003-style corpus that ``ner_corpus.py`` generates (half of the
names in dev/test unseen in training). A WordPiece tokenizer with a small vocabulary is trained on the training
words with the ``tokenizers`` library, so that rare words and unseen names split into sub-words; as in the
transformers token-classification recipe, the first sub-word of each word carries its tag and the others, and
``[CLS]``/``[SEP]``/padding, are -100. The model is a BERT built from a ``BertConfig`` (2 layers, hidden 64 by
default) and trained from scratch.

Models (``--models``), each from the same seed, initial weights and batches:

- ``bert``: ``BertForTokenClassification`` as transformers ships it; predicts the argmax tag at each word's first
  sub-word.
- ``bert+apply``: the same after ``fusedloss.transformers.apply(model)`` (fusedloss cross entropy).
- ``bert-crf``: ``fusedloss.transformers.CRFTagger(model, labels, scheme="BIO")``: a constrained CRF over the
  words; predicts with constrained Viterbi (``decode(word_ids=...)``).

Reported: entity-level precision/recall/F1 on the test split (``ner_metrics.py``, seqeval-compatible); after
training, the time of one training step (forward and backward of one batch, the models taking turns so that a
shared machine's load hits them alike) and its peak extra memory (``fusedloss.bench.harness.peak_memory``:
torch.profiler's allocation trace on the CPU, ``max_memory_allocated`` on CUDA).

    python examples/train_bert_crf.py            # about a minute on a 2-core CPU
    python examples/train_bert_crf.py --train-sentences 200 --eval-sentences 50 --epochs 1   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fusedloss.bench.harness import device_name, peak_memory, time_call
from fusedloss.transformers import CRFTagger, apply, first_subword_mask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ner_corpus import Sentence, read_corpus, write_corpus  # noqa: E402
from ner_metrics import entity_scores  # noqa: E402
from train_ner import bio_labels  # noqa: E402

MODELS = ("bert", "bert+apply", "bert-crf")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def train_tokenizer(sentences: Sequence[Sentence], vocab_size: int):
    """A fast WordPiece tokenizer (``[CLS] words [SEP]``) trained on the training words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator((" ".join(tokens) for tokens, _ in sentences), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


class Split(torch.utils.data.Dataset):
    """Tokenized sentences: ``input_ids``, ``attention_mask`` and ``labels`` (the tag id at each word's first
    sub-word, -100 elsewhere), plus each sentence's ``word_ids`` and gold tags for evaluation."""

    def __init__(self, sentences: Sequence[Sentence], tokenizer, labels: Sequence[str], max_length: int):
        index = {label: i for i, label in enumerate(labels)}
        encoded = tokenizer([tokens for tokens, _ in sentences], is_split_into_words=True, truncation=True,
                            max_length=max_length)
        self.rows, self.word_ids, self.gold = [], [], []
        for n, (_, tags) in enumerate(sentences):
            word_ids = encoded.word_ids(n)
            previous, row_labels = None, []
            for word in word_ids:
                row_labels.append(index[tags[word]] if word is not None and word != previous else -100)
                previous = word
            words = len({w for w in word_ids if w is not None})  # truncation may drop the last words
            self.rows.append({"input_ids": encoded["input_ids"][n], "attention_mask": encoded["attention_mask"][n],
                              "labels": row_labels})
            self.word_ids.append(word_ids)
            self.gold.append(list(tags[:words]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        return self.rows[index]

    def subword_fraction(self) -> float:
        """Share of the (non-special) tokens that are not a word's first sub-word: what -100 hides."""
        tokens = sum(sum(w is not None for w in ids) for ids in self.word_ids)
        first = sum(sum(label != -100 for label in row["labels"]) for row in self.rows)
        return 1 - first / max(tokens, 1)


def build_model(kind: str, labels: Sequence[str], vocab_size: int, args) -> torch.nn.Module:
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=max(args.hidden // 32, 1), intermediate_size=4 * args.hidden,
                        max_position_embeddings=args.max_length, num_labels=len(labels),
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(args.seed)
    model = BertForTokenClassification(config)
    if kind == "bert+apply":
        return apply(model)
    if kind == "bert-crf":
        return CRFTagger(model, labels, scheme="BIO")
    return model


@torch.no_grad()
def predict(kind: str, model: torch.nn.Module, split: Split, collator, labels: Sequence[str], device,
            batch_size: int = 128) -> List[List[str]]:
    """Tags per word: constrained Viterbi for the CRF, the argmax at each first sub-word otherwise."""
    model.eval()
    predicted: List[List[str]] = []
    for start in range(0, len(split), batch_size):
        batch = collator([split[i] for i in range(start, min(start + batch_size, len(split)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        word_ids = split.word_ids[start: start + batch_size]
        if kind == "bert-crf":
            paths = model.decode(batch["input_ids"], batch["attention_mask"], word_ids=word_ids)
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            first = first_subword_mask(word_ids, logits.shape[1], logits.device)
            best = logits.argmax(-1)
            paths = [best[row][first[row]].tolist() for row in range(best.shape[0])]
        predicted.extend([labels[i] for i in path] for path in paths)
    model.train()
    return predicted


def train_one(kind: str, splits: Dict[str, Split], tokenizer, collator, labels: Sequence[str], args, scratch: str,
              log=print) -> Tuple[Dict, torch.nn.Module]:
    """Train one model with the Trainer; returns its result (loss, test scores) and the trained model."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    model = build_model(kind, labels, len(tokenizer), args)
    arguments = TrainingArguments(
        output_dir=os.path.join(scratch, kind), num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=0.01, logging_strategy="no", save_strategy="no", report_to=[], seed=args.seed,
        use_cpu=args.device == "cpu", dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=splits["train"], data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # this script prints its own summary
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    device = next(model.parameters()).device
    test = entity_scores(splits["test"].gold, predict(kind, model, splits["test"], collator, labels, device))
    log(f"  {kind:<11} {result.global_step:>4} steps in {seconds:5.1f} s, train loss {result.training_loss:.4f}, "
        f"test F1 {test['f1']:.3f}")
    return {"model": kind, "steps": result.global_step, "training_loss": result.training_loss,
            "train_seconds": seconds, "test": test}, model


def measure_steps(models: Dict[str, torch.nn.Module], batch: Dict[str, torch.Tensor], device: torch.device,
                  rounds: int) -> Dict[str, Dict[str, float]]:
    """Seconds per training step (forward + backward of ``batch``) and its peak extra memory, per model.

    The models take turns, a few timed steps each per round, and the time is the median of the rounds'
    medians: on a shared machine a burst of load then hits every model alike (timing one model after the
    other, as the Trainer's runtime does, compares the load more than the models)."""
    probes = {kind: copy.deepcopy(model).train() for kind, model in models.items()}

    def step(probe):
        return lambda: probe(**batch).loss.backward()

    def reset(probe):
        return lambda: probe.zero_grad(set_to_none=True)

    medians: Dict[str, List[float]] = {kind: [] for kind in probes}
    for _ in range(rounds):
        for kind, probe in probes.items():
            timing = time_call(step(probe), reset(probe), device, warmup=1, repeats=5)
            medians[kind].append(timing["median_ms"] / 1e3)
    return {kind: {"step_seconds": statistics.median(medians[kind]),
                   "peak_mib": peak_memory(step(probe), reset(probe), device)} for kind, probe in probes.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-sentences", type=int, default=1000)
    parser.add_argument("--eval-sentences", type=int, default=300, help="dev and test sentences each")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the epochs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=800, help="WordPiece vocabulary (small: more sub-words)")
    parser.add_argument("--max-length", type=int, default=64, help="sub-words per sentence, [CLS]/[SEP] included")
    parser.add_argument("--timing-rounds", type=int, default=20,
                        help="rounds of 5 timed training steps per model, the models taking turns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return parser


def run(args, log=print) -> Dict:
    """Everything the command does; returns one result per model and what the data looked like."""
    from transformers import DataCollatorForTokenClassification

    with tempfile.TemporaryDirectory() as scratch:
        write_corpus(scratch, args.train_sentences, args.eval_sentences, seed=args.seed)
        text = read_corpus(scratch)
        labels = bio_labels(text["train"])
        tokenizer = train_tokenizer(text["train"], args.vocab_size)
        splits = {name: Split(sentences, tokenizer, labels, args.max_length) for name, sentences in text.items()}
        log(f"data: {', '.join(f'{k} {len(v)} sentences' for k, v in text.items())}; {len(labels)} tags; "
            f"WordPiece vocabulary {len(tokenizer)}; {splits['train'].subword_fraction():.0%} of training tokens "
            f"are non-first sub-words (-100); device {device_name(torch.device(args.device))}, torch "
            f"{torch.__version__}")
        collator = DataCollatorForTokenClassification(tokenizer)
        results, models = [], {}
        for kind in args.models.split(","):
            result, models[kind] = train_one(kind, splits, tokenizer, collator, labels, args, scratch, log)
            results.append(result)
    device = next(models[results[0]["model"]].parameters()).device
    batch = collator([splits["train"][i] for i in range(min(args.batch_size, len(splits["train"])))])
    measured = measure_steps(models, {k: v.to(device) for k, v in batch.items()}, device, args.timing_rounds)
    for result in results:
        result.update(measured[result["model"]])
    log("\n" + format_summary(results))
    return {"labels": labels, "results": results, "subword_fraction": splits["train"].subword_fraction()}


def format_summary(results: Sequence[Dict]) -> str:
    """Test scores, ms per step and peak memory, with ratios against the unpatched model when it ran."""
    baseline = next((r for r in results if r["model"] == "bert"), None)
    lines = [f"{'model':<12} {'precision':>9} {'recall':>7} {'F1':>7} {'ms/step':>8} {'vs bert':>8} "
             f"{'peak MiB':>9} {'vs bert':>8}"]
    for r in results:
        time_ratio = f"{r['step_seconds'] / baseline['step_seconds']:.2f}x" if baseline else "-"
        memory_ratio = f"{r['peak_mib'] / baseline['peak_mib']:.2f}x" if baseline and baseline["peak_mib"] else "-"
        lines.append(f"{r['model']:<12} {r['test']['precision']:>9.3f} {r['test']['recall']:>7.3f} "
                     f"{r['test']['f1']:>7.3f} {r['step_seconds'] * 1e3:>8.1f} {time_ratio:>8} "
                     f"{r['peak_mib']:>9.2f} {memory_ratio:>8}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
