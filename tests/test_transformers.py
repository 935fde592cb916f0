"""fusedloss.transformers on tiny models built from configurations (no downloads): the patched loss
and every parameter's gradient against the model's own, no (N, V) logits in causal-LM training, the Trainer
with gradient accumulation, generate(), and CRFTagger against pytorch-crf on the compacted word sequences."""

import copy
import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it (pip install 'transformers[torch]')

import fusedloss  # noqa: E402
import fusedloss.transformers as ft  # noqa: E402
from fusedloss.bench.harness import _quiet_stderr  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
VOCAB = 97
BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared with the rest of the suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def bert_config(**overrides):
    options = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=64, num_labels=len(BIO), hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    options.update(overrides)
    return transformers.BertConfig(**options)


def causal_lm(family: str, vocab_size: int = VOCAB, hidden: int = 32):
    """A 1-layer causal LM of ``family`` without dropout (so train-mode forwards are deterministic)."""
    llama_like = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_like))
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**llama_like))
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama_like))
    if family == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **llama_like))
    assert family == "gpt2"
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab_size, n_embd=hidden, n_layer=1, n_head=2, n_positions=256, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2))


def assert_same_gradients(patched, reference, atol=1e-5, rtol=1e-4):
    named = dict(reference.named_parameters())
    checked = 0
    for name, parameter in patched.named_parameters():
        expected = named[name].grad
        if expected is None:
            assert parameter.grad is None or not parameter.grad.any(), name
            continue
        torch.testing.assert_close(parameter.grad, expected, atol=atol, rtol=rtol, msg=name)
        checked += 1
    assert checked > 0


def token_batch(batch=3, seq_len=9, num_labels=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq_len), generator=generator)
    labels = torch.randint(0, num_labels, (batch, seq_len), generator=generator)
    labels[:, 0] = -100  # [CLS]
    labels[0, 4:6] = -100  # sub-words
    labels[1, -2:] = -100
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[1, -2:] = 0
    return input_ids, attention_mask, labels


# ----------------------------------------------------------------------------------------------
# Token and sequence classification
# ----------------------------------------------------------------------------------------------


def token_classifier(kind: str):
    torch.manual_seed(0)
    if kind == "bert":  # computes its loss inline with CrossEntropyLoss
        return transformers.BertForTokenClassification(bert_config())
    # Llama's token classification calls model.loss_function
    return transformers.LlamaForTokenClassification(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=len(BIO), pad_token_id=0, classifier_dropout=0.0))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_token_classification_loss_and_gradients_equal_the_models_own(kind):
    reference = token_classifier(kind)
    patched = ft.apply(copy.deepcopy(reference))
    input_ids, attention_mask, labels = token_batch()
    expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    # Positional arguments reach the patched forward as well.
    output = patched(input_ids, attention_mask, labels=labels)
    torch.testing.assert_close(output.loss, expected.loss)
    torch.testing.assert_close(output.logits, expected.logits)
    output.loss.backward()
    expected.loss.backward()
    assert_same_gradients(patched, reference)
    assert type(patched).forward is type(reference).forward  # nothing global changed
    assert patched(input_ids=input_ids).loss is None
    clone = copy.deepcopy(patched)  # the patch follows a copy (the Trainer and the example copy models)
    assert clone.forward.__self__ is clone
    del patched.forward  # undoes the patch
    assert patched.forward.__func__ is type(patched).forward


def test_token_classification_options_equal_torch_on_the_logits():
    model = ft.apply(token_classifier("bert"), label_smoothing=0.1)
    input_ids, attention_mask, labels = token_batch()
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    logits = output.logits.detach()
    expected = F.cross_entropy(logits.reshape(-1, len(BIO)), labels.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(output.loss.detach(), expected)

    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 1.0])
    ft.apply(model, weight=weight)
    expected = F.cross_entropy(logits.reshape(-1, len(BIO)), labels.reshape(-1), weight=weight)
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss, expected)

    # Focal loss: -(1 - p_y)^γ log p_y, mean over labelled tokens.
    ft.apply(model, loss="focal", gamma=2.0)
    log_p = logits.log_softmax(-1)[labels != -100].gather(-1, labels[labels != -100][:, None]).squeeze(-1)
    expected = -((1 - log_p.exp()) ** 2 * log_p).mean()
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss, expected)


def test_num_items_in_batch_divides_the_sum():
    model = ft.apply(token_classifier("bert"))
    input_ids, attention_mask, labels = token_batch()
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                   num_items_in_batch=torch.tensor(40))
    logits = output.logits.detach()
    expected = F.cross_entropy(logits.reshape(-1, len(BIO)), labels.reshape(-1), reduction="sum") / 40
    torch.testing.assert_close(output.loss.detach(), expected)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_sequence_classification(kind):
    torch.manual_seed(0)
    if kind == "bert":
        reference = transformers.BertForSequenceClassification(bert_config(num_labels=3))
    else:  # pools the last non-padding token and calls model.loss_function
        reference = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, num_labels=3, pad_token_id=0))
    patched = ft.apply(copy.deepcopy(reference), z_loss=0.0)
    input_ids, attention_mask, _ = token_batch(batch=4)
    labels = torch.tensor([0, 2, 1, 2])
    output = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(output.loss, expected.loss)
    output.loss.backward()
    expected.loss.backward()
    assert_same_gradients(patched, reference)
    # return_dict=False gives transformers' tuple (loss first).
    as_tuple = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], expected.loss)

    # Regression runs the model's own forward (MSE).
    regression = transformers.BertForSequenceClassification(bert_config(num_labels=1))
    targets = torch.randn(4)
    expected = regression(input_ids=input_ids, labels=targets).loss
    ft.apply(regression)
    torch.testing.assert_close(regression(input_ids=input_ids, labels=targets).loss, expected)


# ----------------------------------------------------------------------------------------------
# Causal LMs
# ----------------------------------------------------------------------------------------------


def lm_batch(batch=2, seq_len=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    labels[1, -3:] = -100  # padding
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_causal_lm_loss_and_gradients_equal_the_models_own(family):
    torch.manual_seed(0)
    reference = causal_lm(family).train()
    patched = ft.apply(copy.deepcopy(reference))
    input_ids, attention_mask, labels = lm_batch()
    output = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert output.logits is None
    torch.testing.assert_close(output.loss, expected.loss)
    output.loss.backward()
    expected.loss.backward()
    assert_same_gradients(patched, reference)
    if family == "gpt2":  # tied: one parameter gets the gradient of the embedding and of the head
        assert patched.lm_head.weight is patched.transformer.wte.weight

    # num_items_in_batch: the sum over shifted labels divided by it, as transformers.
    count = torch.tensor(13)
    output = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=count)
    expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=count)
    torch.testing.assert_close(output.loss, expected.loss)

    # ignore_index reaches the loss, as transformers' ForCausalLMLoss takes it.
    relabelled = labels.masked_fill(labels == -100, -1)
    output = patched(input_ids=input_ids, attention_mask=attention_mask, labels=relabelled, ignore_index=-1)
    expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(output.loss, expected.loss)

    # Hidden states are the base model's; eval mode with labels keeps the logits.
    output = patched(input_ids=input_ids, labels=labels, output_hidden_states=True)
    assert output.logits is None and len(output.hidden_states) == 2
    patched.eval()
    reference.eval()
    output = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(output.logits, expected.logits)
    torch.testing.assert_close(output.loss, expected.loss)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_is_unchanged(family):
    torch.manual_seed(0)
    reference = causal_lm(family).eval()
    patched = ft.apply(copy.deepcopy(reference))
    prompt = torch.tensor([[5, 17, 42, 8, 60]])
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = reference.generate(prompt, **options)
    torch.testing.assert_close(patched.generate(prompt, **options), expected, rtol=0, atol=0)
    assert patched._supports_logits_to_keep()  # the signature generate() inspects survived


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation torch makes during ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def test_causal_lm_training_never_materializes_the_logits():
    vocab_size, batch, seq_len = 32768, 2, 128
    torch.manual_seed(0)
    reference = causal_lm("llama", vocab_size=vocab_size, hidden=32).train()
    patched = ft.apply(copy.deepcopy(reference))
    input_ids = torch.randint(3, vocab_size, (batch, seq_len))
    logits_bytes = batch * seq_len * vocab_size * 4

    def step(model):
        def run():
            output = model(input_ids=input_ids, labels=input_ids)
            output.loss.backward()
            assert (output.logits is None) == (model is patched)
        return run

    assert _largest_allocation(step(reference)) >= logits_bytes
    assert _largest_allocation(step(patched)) < logits_bytes / 4


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


class _Batches(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def _train(model, dataset, tmp_path, name):
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=dataset)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_causal_lm_matches_the_unpatched_run(tmp_path):
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(12):
        input_ids = torch.randint(3, VOCAB, (10,), generator=generator)
        labels = input_ids.clone()
        labels[: index % 5] = -100  # different label counts per sample: num_items_in_batch matters
        rows.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    torch.manual_seed(0)
    reference = causal_lm("llama")
    patched = ft.apply(copy.deepcopy(reference))
    expected = _train(reference, _Batches(rows), tmp_path, "reference")
    losses = _train(patched, _Batches(rows), tmp_path, "patched")
    assert len(losses) == 3
    assert losses == pytest.approx(expected, rel=1e-4)
    for (name, parameter), expected_parameter in zip(patched.named_parameters(), reference.parameters()):
        torch.testing.assert_close(parameter, expected_parameter, atol=1e-5, rtol=1e-4, msg=name)


def test_trainer_crf_tagger(tmp_path):
    input_ids, attention_mask, labels = token_batch(batch=8)
    labels = torch.where(labels == -100, labels, labels % 2)  # O and B-PER only: always valid BIO
    rows = [{"input_ids": i, "attention_mask": a, "labels": t} for i, a, t in zip(input_ids, attention_mask, labels)]
    torch.manual_seed(0)
    tagger = ft.CRFTagger(transformers.BertForTokenClassification(bert_config()), BIO)
    losses = _train(tagger, _Batches(rows), tmp_path, "crf")
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------------------
# CRFTagger
# ----------------------------------------------------------------------------------------------


class _FixedEmissions(torch.nn.Module):
    """A stand-in token classifier whose logits are given: isolates the CRF head and the word compaction."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids=None, attention_mask=None, return_dict=True, **kwargs):
        from transformers.modeling_outputs import TokenClassifierOutput

        return TokenClassifierOutput(logits=self.logits * 1.0)


def _compact_by_hand(emissions, labels):
    """Per sentence, the emissions and tags at positions whose label is not -100, padded into a batch."""
    rows = [(emissions[b][labels[b] != -100], labels[b][labels[b] != -100]) for b in range(labels.shape[0])]
    width = max(len(tags) for _, tags in rows)
    padded = torch.stack([F.pad(e, (0, 0, 0, width - len(e))) for e, _ in rows])
    tags = torch.stack([F.pad(t, (0, width - len(t))) for _, t in rows])
    mask = torch.stack([torch.arange(width) < len(t) for _, t in rows])
    return padded, tags, mask


def test_crf_tagger_loss_equals_pytorch_crf_on_compacted_words():
    torchcrf = pytest.importorskip("torchcrf")
    torch.manual_seed(0)
    tagger = ft.CRFTagger(transformers.BertForTokenClassification(bert_config()), BIO)
    with torch.no_grad():
        tagger.crf.transitions.normal_()
    reference_model = copy.deepcopy(tagger.model)
    input_ids, attention_mask, _ = token_batch(batch=4, seq_len=9)
    labels = torch.tensor([
        [-100, 1, 2, -100, 0, 3, -100, 4, -100],   # B-PER I-PER (sub-word) O B-LOC (sub-word) I-LOC
        [-100, 0, 0, 1, -100, 0, 3, -100, -100],
        [-100, 3, -100, -100, -100, -100, -100, -100, -100],  # one word
        [-100] * 9,  # no word (truncated away): left out of the mean
    ])
    output = tagger(input_ids, attention_mask, labels)
    assert output.logits.shape == (4, 9, len(BIO))

    crf = torchcrf.CRF(len(BIO), batch_first=True)
    transitions, start, end = tagger.crf._scores()  # forbidden transitions at the constraint score
    with torch.no_grad():
        crf.transitions.copy_(transitions)
        crf.start_transitions.copy_(start)
        crf.end_transitions.copy_(end)
    logits = reference_model(input_ids=input_ids, attention_mask=attention_mask).logits
    emissions, tags, mask = _compact_by_hand(logits[:3], labels[:3])
    expected = -crf(emissions, tags, mask, reduction="mean")
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    expected.backward()
    assert_same_gradients(tagger.model, reference_model)


def test_crf_tagger_decodes_words_without_forbidden_transitions():
    torch.manual_seed(0)
    batch, seq_len = 16, 12
    first = torch.rand(batch, seq_len) < 0.6
    first[:, 0] = False  # [CLS]
    first[3] = False  # a sentence without words
    logits = torch.randn(batch, seq_len, len(BIO)) * 5
    tagger = ft.CRFTagger(_FixedEmissions(logits), BIO)
    with torch.no_grad():
        tagger.crf.transitions.normal_(0, 3)
    labels = torch.where(first, 0, -100)
    by_labels = tagger.decode(labels=labels)
    # A tokenizer's word_ids: the word id changes at each first sub-word.
    word_ids = []
    for row in first.tolist():
        ids, word = [], -1
        for is_first in row:
            word += int(is_first)
            ids.append(word if word >= 0 else None)
        word_ids.append(ids)
    assert tagger.decode(word_mask=first) == by_labels
    assert tagger.decode(word_ids=word_ids) == by_labels
    allowed, allowed_start, allowed_end = fusedloss.allowed_transitions("BIO", BIO)
    for row, path in enumerate(by_labels):
        assert len(path) == int(first[row].sum())
        if not path:
            continue
        assert allowed_start[path[0]] and allowed_end[path[-1]]
        assert all(allowed[a, b] for a, b in zip(path, path[1:]))
    # Unconstrained decoding of these emissions would break BIO: the constraints did the work.
    emissions, _, mask = _compact_by_hand(logits, labels)
    free = fusedloss.CRF(len(BIO), batch_first=True)
    with torch.no_grad():
        free.transitions.copy_(tagger.crf.transitions)
        free.start_transitions.copy_(tagger.crf.start_transitions)
        free.end_transitions.copy_(tagger.crf.end_transitions)
    keep = mask[:, 0]
    unconstrained = free.decode(emissions[keep], mask[keep])
    assert any(not allowed[a, b] for path in unconstrained for a, b in zip(path, path[1:]))
    with pytest.raises(ValueError, match="exactly one"):
        tagger.decode()


def test_crf_tagger_maps_words_to_their_first_subword():
    # Sentence: [CLS] Ang ##ela Merkel visited Ber ##lin [SEP]; words Angela Merkel visited Berlin.
    first = torch.tensor([[False, True, False, True, True, True, False, False]])
    gold = [1, 2, 0, 3]  # B-PER I-PER O B-LOC
    logits = torch.zeros(1, 8, len(BIO))
    positions = first[0].nonzero().flatten().tolist()
    for position, tag in zip(positions, gold):
        logits[0, position, tag] = 10.0
    logits[0, 2, 4] = 50.0  # sub-words score other tags: they must not count
    logits[0, 6, 0] = 50.0
    tagger = ft.CRFTagger(_FixedEmissions(logits), BIO)
    assert tagger.decode(word_mask=first) == [gold]
    assert tagger.decode(word_ids=[[None, 0, 0, 1, 2, 3, 3, None]]) == [gold]
    labels = torch.tensor([[-100, 1, -100, 2, 0, 3, -100, -100]])
    output = tagger(labels=labels)
    assert output.loss < 0.01  # the gold path dominates


def test_crf_tagger_rejects_a_model_with_other_labels():
    with pytest.raises(ValueError, match="num_labels"):
        ft.CRFTagger(transformers.BertForTokenClassification(bert_config(num_labels=3)), BIO)


# ----------------------------------------------------------------------------------------------
# Errors and the optional dependency
# ----------------------------------------------------------------------------------------------


def test_unsupported_model_names_its_class():
    with pytest.raises(ValueError, match="BertForMaskedLM.*LlamaForCausalLM"):
        ft.apply(transformers.BertForMaskedLM(bert_config()))


def test_bad_options():
    model = token_classifier("bert")
    with pytest.raises(ValueError, match="loss"):
        ft.apply(model, loss="dice")
    with pytest.raises(ValueError, match="smoothing"):
        ft.apply(model, label_smoothing=2.0)
    with pytest.raises(ValueError, match="unknown_option"):
        ft.apply(model, unknown_option=1)
    with pytest.raises(ValueError, match="weight"):
        ft.apply(model, weight=torch.ones(3))
    with pytest.raises(ValueError, match="gamma"):
        ft.apply(model, loss="focal", focal_gamma=2.0)
    lm = causal_lm("llama")
    with pytest.raises(ValueError, match="focal"):
        ft.apply(lm, loss="focal")
    with pytest.raises(ValueError, match="chunk_size"):
        ft.apply(lm, chunk_size=0)
    assert "forward" not in vars(model) and "forward" not in vars(lm)  # a failed apply patches nothing


def test_importable_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    monkeypatch.delitem(sys.modules, "fusedloss.transformers")
    monkeypatch.setattr(fusedloss, "transformers", ft, raising=False)
    module = importlib.import_module("fusedloss.transformers")
    with pytest.raises(ImportError, match="pip install"):
        module.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ImportError, match="pip install"):
        module.CRFTagger(torch.nn.Linear(2, 2), BIO)


# ----------------------------------------------------------------------------------------------
# The example
# ----------------------------------------------------------------------------------------------


def test_train_bert_crf_example_smoke():
    sys.path.insert(0, EXAMPLES)
    import train_bert_crf

    args = train_bert_crf.build_parser().parse_args([
        "--train-sentences", "48", "--eval-sentences", "16", "--max-steps", "3", "--batch-size", "8",
        "--hidden", "32", "--layers", "1", "--vocab-size", "150", "--warmup-steps", "0", "--timing-rounds", "2"])
    lines = []
    report = train_bert_crf.run(args, log=lines.append)
    results = {r["model"]: r for r in report["results"]}
    assert set(results) == set(train_bert_crf.MODELS)
    assert report["subword_fraction"] > 0  # the tokenizer split words: -100 positions exist
    for result in results.values():
        assert result["steps"] == 3 and result["step_seconds"] > 0 and result["peak_mib"] > 0
        assert 0 <= result["test"]["f1"] <= 1
    # apply() changes how the loss is computed, not what it is.
    assert results["bert+apply"]["training_loss"] == pytest.approx(results["bert"]["training_loss"], rel=1e-5)
    assert "bert-crf" in lines[-1] and "F1" in lines[-1]
