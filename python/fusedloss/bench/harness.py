"""Timing, peak-memory measurement and the description of the machine a benchmark ran on."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

QUANTILES = (0.2, 0.5, 0.8)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(values: List[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_call(fn: Callable[[], object], reset: Callable[[], None], device: torch.device,
              warmup: int, repeats: int) -> Dict[str, float]:
    """Milliseconds per call of ``fn``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    ``reset`` runs before every call, outside the timed region (it drops the gradients of the
    previous call, so that every backward allocates its gradient as in a training step). On CUDA
    each call is bracketed by CUDA events; on the CPU by ``time.perf_counter``.
    Returns ``median_ms``, ``q20_ms``, ``q80_ms``, ``min_ms``.
    """
    for _ in range(warmup):
        reset()
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        reset()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "q20_ms": quantile(times, QUANTILES[0]),
        "q80_ms": quantile(times, QUANTILES[2]),
        "min_ms": min(times),
    }


# A call shorter than this is timed in a burst of back-to-back calls (at most MAX_BURST) lasting about this long.
BURST_MS = 0.2
MAX_BURST = 64


def interleaved_medians(calls: Dict[str, Callable[[], object]], repeats: int,
                        device: torch.device, warmup: int = 1) -> Dict[str, float]:
    """Median milliseconds per call of each of ``calls``, timed interleaved: every call once per round, for
    ``repeats`` rounds after ``warmup`` warm-up rounds, so that a change in the machine's load (other processes,
    clock changes) reaches every candidate alike and their ratios stay meaningful on a noisy machine. A call shorter
    than ``BURST_MS`` is timed as a burst of back-to-back calls, divided by their number: each candidate then runs
    with its own code and data in the caches, as a loop over batches or sentences does. Timed one call at a time, a
    one-sentence Viterbi decode of about 8 us measured 11.5 us right after a 0.5 ms pytorch-crf call had evicted
    them."""
    bursts: Dict[str, int] = {}
    for name, call in calls.items():
        elapsed = 0.0
        for _ in range(warmup):
            start = time.perf_counter()
            call()
            synchronize(device)
            elapsed = (time.perf_counter() - start) * 1e3
        bursts[name] = max(1, min(MAX_BURST, int(BURST_MS / max(elapsed, 1e-6))))
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            burst = bursts[name]
            start = time.perf_counter()
            for _ in range(burst):
                call()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3 / burst)
    return {name: statistics.median(values) for name, values in times.items()}


def write_results(stem: str, markdown: str, rows: List[Dict], columns: List[str], device: torch.device,
                  config: Dict) -> None:
    """A benchmark's results as ``<stem>.md`` (its Markdown table), ``<stem>.csv`` (``columns``, floats to 6
    significant digits) and ``<stem>.json`` (the environment, the configuration and the rows)."""
    import csv
    import json

    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".md", "w") as out:
        out.write(markdown)
    with open(stem + ".csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with open(stem + ".json", "w") as out:
        json.dump({"environment": environment(device), "config": config, "results": rows}, out, indent=1)


def copy_bandwidth(numel: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int) -> float:
    """GB/s of ``dst.copy_(src)`` over ``numel`` elements of ``dtype`` (read once, written once: 2 x numel x size
    bytes in the fastest of the timed copies): what the memory system of ``device`` sustains for a plain stream of
    those bytes, measured in the same run as the kernels it is compared with. The fastest, not the median: a copy
    has no work that could be slower, so slower copies measure interference (on a shared CPU, a preemption)."""
    src = torch.empty(numel, dtype=dtype, device=device).fill_(1)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), lambda: None, device, warmup, repeats)
    return 2 * numel * src.element_size() / (timing["min_ms"] * 1e6)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's start/stop lines, which it writes straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() minus memory_allocated() before the call",
    "cpu": "peak of the running sum of the CPU allocator's allocations and frees recorded by "
           "torch.profiler(profile_memory=True) during the call",
}


def peak_memory(fn: Callable[[], object], reset: Callable[[], None], device: torch.device) -> float:
    """Peak extra memory of one call of ``fn`` in MiB: the most bytes held at once by tensors
    allocated during the call, above what was allocated before it (inputs and parameters are not
    counted; gradients and saved activations are).

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU (best effort): torch
    keeps no peak statistic for host memory, so the call runs once under
    ``torch.profiler.profile(profile_memory=True)``, whose trace has one ``[memory]`` event per
    allocation (+bytes) and free (-bytes) of torch's CPU allocator; the peak is the maximum of
    their running sum in time order. It sees every tensor torch allocates (also inside the
    ``fusedloss._C`` kernels, which allocate through ATen) but not memory a library takes from
    ``malloc`` directly.
    """
    reset()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _cpu_name() -> str:
    """The CPU's model name, with its family and model numbers (a virtual machine may show only "AMD EPYC", the
    same for several generations) and the vector-ISA variant the cpp kernels run in (``fusedloss._C.cpu_isa()``),
    e.g. ``AMD EPYC family 26 model 2, avx512 kernels``; with ATEN_CPU_CAPABILITY set, ATen's capability after it.
    """
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if ":" not in line:
                    if fields:
                        break  # the first processor's block is enough
                    continue
                key, value = (part.strip() for part in line.split(":", 1))
                fields.setdefault(key, value)
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" family {fields['cpu family']} model {fields['model']}"
    try:
        import fusedloss._C

        name += f", {fusedloss._C.cpu_isa()} kernels"
    except (ImportError, AttributeError):
        pass
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        # ATen's own kernels capped too (eager's side of the comparison), e.g. to stand in for an AVX2-only CPU.
        name += f", ATen {torch.backends.cpu.get_cpu_capability().lower()}"
    return name


def device_name(device: torch.device) -> str:
    """What the numbers were measured on, e.g. ``NVIDIA H100 80GB HBM3`` or
    ``AMD EPYC family 26 model 2, avx512 kernels (2 threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """``device_name`` as a file-name part: ``cpu-AMD-EPYC-family-26-model-2-avx512-kernels-2threads``,
    ``cuda-NVIDIA-H100-80GB-HBM3``."""
    name = device_name(device).replace("(R)", "").replace("(TM)", "").replace("CPU @", "")
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{device.type} {name}").strip("-").replace("-threads", "threads")


def environment(device: torch.device) -> Dict[str, Optional[str]]:
    """The versions and the machine that every CSV row and the JSON record."""
    import fusedloss

    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "fusedloss_version": fusedloss.__version__,
        "python_version": platform.python_version(),
        "num_threads": str(torch.get_num_threads()),
        "cuda_version": torch.version.cuda or "",
        "pytorch_crf_version": _version("pytorch-crf"),
        "liger_kernel_version": _version("liger-kernel"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
