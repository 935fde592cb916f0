"""Distill a small causal language model from a larger one with ``fusedloss.linear_distillation_loss``, and compare
it with TRL's generalized JSD on materialized logits.

Both models are built from ``transformers`` configs (``LlamaConfig`` + ``LlamaForCausalLM``; nothing is
downloaded): by default a teacher of hidden size 256 with 4 layers and a student of hidden size 128 with 2 layers,
both over a 32000-token vocabulary. The data is synthetic: token sequences from a fixed random sparse Markov chain
(each token has a few likely successors), on which the teacher is first trained briefly with
``fusedloss.linear_cross_entropy`` so that it has something to teach.

Then two copies of the student, with the same initial weights and the same batches, are distilled from the
teacher:

- ``fusedloss``: ``linear_distillation_loss(student_hidden, student.lm_head.weight, teacher_hidden,
  teacher.lm_head.weight, beta=..., temperature=...)`` from both models' last hidden states; neither model's
  ``(tokens, vocabulary)`` logits are ever held whole.
- ``eager``: TRL's ``GKDTrainer.generalized_jsd_loss`` written out here: both models' full logits, ``log_softmax`` of
  each, the mixture through ``logsumexp``, ``F.kl_div``.

Reported: time per step (median), the peak extra memory of one step (``fusedloss.bench.harness.peak_memory``:
the CPU allocator's trace under torch.profiler, ``max_memory_allocated`` on CUDA) and the student's loss curve for
both (they agree to float32 rounding).

    python examples/distill_causal_lm.py --quick      # a short run, about a minute on a 2-core CPU
    python examples/distill_causal_lm.py --steps 200 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.bench.harness import peak_memory, synchronize


def build(hidden: int, layers: int, vocab: int, heads: int, seq_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(seq_len, 16), tie_word_embeddings=False)
    return LlamaForCausalLM(config)


class MarkovData:
    """Token sequences from a fixed random chain: each token has ``fanout`` successors, the first much likelier."""

    def __init__(self, vocab: int, fanout: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.successors = torch.randint(0, vocab, (vocab, fanout), generator=g)
        self.probs = torch.tensor([0.7] + [0.3 / (fanout - 1)] * (fanout - 1))
        self.generator = torch.Generator().manual_seed(seed + 1)

    def batch(self, batch: int, seq_len: int) -> torch.Tensor:
        tokens = torch.empty(batch, seq_len, dtype=torch.int64)
        tokens[:, 0] = torch.randint(0, self.vocab, (batch,), generator=self.generator)
        for t in range(1, seq_len):
            pick = torch.multinomial(self.probs.expand(batch, -1), 1, generator=self.generator)[:, 0]
            tokens[:, t] = self.successors[tokens[:, t - 1], pick]
        return tokens


def trl_generalized_jsd(student_logits, teacher_logits, beta: float, temperature: float) -> torch.Tensor:
    """TRL's GKDTrainer.generalized_jsd_loss (batchmean over the rows), eagerly on materialized logits."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    return jsd.sum() / (jsd.numel() / jsd.shape[-1])


def train_teacher(teacher, data: MarkovData, steps: int, batch: int, seq_len: int, lr: float, device) -> None:
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr)
    for _ in range(steps):
        tokens = data.batch(batch, seq_len).to(device)
        hidden = teacher.model(input_ids=tokens).last_hidden_state
        loss = fusedloss.linear_cross_entropy(hidden[:, :-1], teacher.lm_head.weight, tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def make_step(student, teacher, optimizer, how: str, beta: float, temperature: float):
    def step(tokens: torch.Tensor) -> float:
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids=tokens).last_hidden_state
        student_hidden = student.model(input_ids=tokens).last_hidden_state
        if how == "fusedloss":
            loss = fusedloss.linear_distillation_loss(student_hidden, student.lm_head.weight, teacher_hidden,
                                                      teacher.lm_head.weight, beta=beta, temperature=temperature)
        else:
            with torch.no_grad():
                teacher_logits = teacher.lm_head(teacher_hidden)
            loss = trl_generalized_jsd(student.lm_head(student_hidden), teacher_logits, beta, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())
    return step


def run(args: argparse.Namespace) -> Dict[str, Dict]:
    device = torch.device(args.device)
    data = MarkovData(args.vocab, seed=args.seed)
    teacher = build(args.teacher_hidden, args.teacher_layers, args.vocab, args.teacher_heads, args.seq_len,
                    args.seed).to(device)
    train_teacher(teacher, data, args.teacher_steps, args.batch, args.seq_len, args.lr, device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student0 = build(args.student_hidden, args.student_layers, args.vocab, args.student_heads, args.seq_len,
                     args.seed + 1).to(device)
    batches = [data.batch(args.batch, args.seq_len).to(device) for _ in range(args.steps)]
    results: Dict[str, Dict] = {}
    for how in ("fusedloss", "eager"):
        student = copy.deepcopy(student0)
        optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
        step = make_step(student, teacher, optimizer, how, args.beta, args.temperature)
        losses: List[float] = []
        times: List[float] = []
        for tokens in batches:
            synchronize(device)
            start = time.perf_counter()
            losses.append(step(tokens))
            synchronize(device)
            times.append(time.perf_counter() - start)
        # one more step on the first batch, with the memory trace (parameters and optimizer state exist already)
        mib = peak_memory(lambda step=step: step(batches[0]), lambda: None, device)
        results[how] = {"losses": losses, "ms": 1e3 * statistics.median(times[1:] or times), "mib": mib}
    return results


def report(results: Dict[str, Dict], args: argparse.Namespace) -> str:
    rows = args.batch * args.seq_len
    lines = [f"distilling {args.student_layers}x{args.student_hidden} from {args.teacher_layers}x"
             f"{args.teacher_hidden}, vocab {args.vocab}, {rows} tokens a step, beta {args.beta}, "
             f"temperature {args.temperature}, {args.device}",
             "", "| loss computed by | ms / step (median) | peak extra MiB of a step |", "|---|---:|---:|"]
    for how, r in results.items():
        lines.append(f"| {how} | {r['ms']:.0f} | {r['mib']:.1f} |")
    lines += ["", "student's loss (fusedloss / eager):"]
    fused, eager = results["fusedloss"]["losses"], results["eager"]["losses"]
    every = max(1, len(fused) // 10)
    for i in range(0, len(fused), every):
        lines.append(f"  step {i + 1:4d}: {fused[i]:.5f} / {eager[i]:.5f}")
    if (len(fused) - 1) % every:
        lines.append(f"  step {len(fused):4d}: {fused[-1]:.5f} / {eager[-1]:.5f}")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run: fewer steps, shorter sequences")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--teacher-steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-heads", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-heads", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 8)
        args.teacher_steps = min(args.teacher_steps, 5)
        args.seq_len = min(args.seq_len, 64)
        args.batch = min(args.batch, 4)
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict]:
    args = parse_args(argv)
    results = run(args)
    print(report(results, args))
    return results


if __name__ == "__main__":
    main()
