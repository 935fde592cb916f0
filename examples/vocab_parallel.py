"""Vocabulary-parallel cross entropy: an LM head whose rows (the vocabulary) are split across processes.

    torchrun --nproc_per_node 2 examples/vocab_parallel.py

Uses NCCL and one GPU per process when CUDA is there, else gloo on the CPU. Every rank builds the same full
head from a shared seed only to keep its own slice and to check the result against one device.
"""

import os

import torch
import torch.distributed as dist

import fusedloss
from fusedloss.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy


def main() -> None:
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")

    tokens, hidden, vocab = 64, 32, 1003  # 1003 classes: the shards differ in size
    generator = torch.Generator().manual_seed(0)  # the same data on every rank
    hidden_states = torch.randn(tokens, hidden, generator=generator).to(device)
    head = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).to(device)
    target = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    target[::7] = -100  # padding, ignored

    # This rank's contiguous slice of the vocabulary, in rank order.
    rows = torch.tensor_split(torch.arange(vocab), world)[rank]
    head_shard = head[rows[0] : rows[-1] + 1].clone().requires_grad_()
    x = hidden_states.clone().requires_grad_()

    # Linear form: the (tokens, vocab) logits never exist anywhere, not even a rank's slice of all rows at once.
    loss = vocab_parallel_linear_cross_entropy(x, head_shard, target, label_smoothing=0.1, z_loss=1e-4)
    loss.backward()  # head_shard.grad: this rank's rows; x.grad: the full input gradient, on every rank

    # Plain form, from logits a tensor-parallel head already produced for this rank's classes.
    logits_shard = (hidden_states @ head_shard.detach().T).requires_grad_()
    focal = vocab_parallel_cross_entropy(logits_shard, target, focal_gamma=2.0, label_smoothing=0.1)
    focal.backward()  # logits_shard.grad: the slice of the full gradient; no communication in backward

    # What one device computes on the whole head: the same value on every rank.
    full_head = head.clone().requires_grad_()
    expected = fusedloss.linear_cross_entropy(hidden_states, full_head, target, label_smoothing=0.1, z_loss=1e-4)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(head_shard.grad, full_head.grad[rows[0] : rows[-1] + 1])
    print(f"rank {rank}/{world}: classes [{int(rows[0])}, {int(rows[-1]) + 1}), loss {loss.item():.6f} "
          f"(one device: {expected.item():.6f}), focal {focal.item():.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
