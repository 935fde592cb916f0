"""Opt-in GPU compile check of every Triton kernel (``make triton-build-check``; FUSEDLOSS_GPU_COMPILE_CHECK=1).

The interpreter that runs the Triton tests on CPU accepts code the GPU compiler rejects (globals that are not
constexpr, loop-carried type changes) and says nothing about registers. This builds every kernel of every
module in ``fusedloss.triton_kernels`` for an H100/H200 (sm_90 cubin through Triton's bundled ptxas; no GPU
needed) at every launch configuration its launchers can choose: each module lists them in
``launch_configurations()``, and a module with kernels but without that list fails the check. It prints the
registers and spill stack of each build and fails on any spill (STACK > 0) or build error.
FUSEDLOSS_COMPILE_ONLY=text1,text2 builds only the entries whose "module name" contains one of the texts.

PTX inspection of the vocabulary builds of the softmax losses: the bfloat16 builds that a launch on ``(8192, V)``
logits takes for V = 32000 and 128256 (found by their properties: a ``*bf16`` first pointer, the ``BLOCK_C`` and
``ROWS`` that ``softmax_loss._layout`` gives for V, the multi-block sweep) are built a second time with the
16-byte divisibility that Triton's launcher gives aligned pointers and integer arguments that are multiples of 16
(a contiguous ``(N, V)`` tensor with N and V multiples of 16), and their PTX (``kernel.asm["ptx"]``) must hold
16-byte vector global loads (``ld.global[.nc][...].v4.b32`` and the like: 8 bf16 per access) and no local memory
(no ``ld.local``/``st.local``, stack 0). The table prints, per build, the global loads by access size and the local
memory instructions. No such build is a failure that says so (the kernel or its layouts changed: update the
selection here).
"""

import os
import subprocess
import sys

import pytest

_BUILD = r"""
import importlib, inspect, json, os, pkgutil, re, subprocess, sys, tempfile
from concurrent.futures import ProcessPoolExecutor
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fusedloss.triton_kernels as package

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# The vocabularies whose softmax-loss launch configurations get the PTX inspection, and the row count of the launch.
PTX_VOCABULARIES = (32000, 128256)
PTX_ROWS = 8192
# Reads of global memory and their bytes per access: ld.global with any qualifiers (.nc, cache and eviction hints), an
# optional vector width and the element type; cp.async copies into shared memory (software-pipelined loads) with
# their copy size; cp.async.bulk (TMA) copies, counted apart.
GLOBAL_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+?)*?(?:\.v(\d))?\.[bfsu](\d+)\b")
ASYNC_COPY = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
BULK_COPY = re.compile(r"\bcp\.async\.bulk\S*global")
LOCAL = re.compile(r"\b(?:ld|st)\.local\b")


def ptx_stats(ptx):
    # Reads of global memory by kind and bytes per access ({"ld16": count, "cp16": count, "bulk": count, ...}) and
    # the number of local-memory instructions.
    loads = {}
    for line in ptx.splitlines():
        line = line.split("//", 1)[0]
        for vector, bits in GLOBAL_LOAD.findall(line):
            key = f"ld{int(vector or 1) * int(bits) // 8}"
            loads[key] = loads.get(key, 0) + 1
        for size in ASYNC_COPY.findall(line):
            key = f"cp{int(size, 0)}"
            loads[key] = loads.get(key, 0) + 1
        if BULK_COPY.search(line):
            loads["bulk"] = loads.get("bulk", 0) + 1
    return dict(sorted(loads.items())), len(LOCAL.findall(ptx))


def softmax_vocabulary_builds(module_name, module):
    # {index: [vocabularies]}: the bf16 entries of the softmax-loss module that a launch on (8192, V) logits takes,
    # for V in PTX_VOCABULARIES, selected by properties (never by name). An empty dict when none match.
    if "softmax" not in module_name or not hasattr(module, "_layout"):
        return {}
    selected = {}
    for vocab in PTX_VOCABULARIES:
        rows, block, _ = module._layout(PTX_ROWS, vocab, None, None)
        for index, entry in enumerate(module.launch_configurations()):
            pointers = [t for t in entry["signature"].values() if t.startswith("*")]
            constexprs = entry["constexprs"]
            if (pointers and pointers[0] == "*bf16" and constexprs.get("BLOCK_C") == block
                    and constexprs.get("ROWS", rows) == rows
                    and constexprs.get("SINGLE_BLOCK", vocab <= block) == (vocab <= block)):
                selected.setdefault(index, []).append(vocab)
    return selected


def aligned_attrs(fn, signature):
    # The divisibility Triton's launcher gives a launch on contiguous (N, V) tensors with N and V multiples of 16:
    # 16 for every pointer and every integer argument but an ignore index.
    divisible = [["tt.divisibility", 16]]
    return {(fn.arg_names.index(name),): divisible for name, kind in signature.items()
            if kind != "constexpr" and (kind.startswith("*") or (kind[0] in "iu" and "index" not in name))}


def modules():
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        kernels = [name for name, obj in vars(module).items() if isinstance(obj, triton.runtime.jit.JITFunction)]
        if kernels:
            yield info.name, module


def build(job):
    module_name, index, vocabularies = job
    module = importlib.import_module(f"{package.__name__}.{module_name}")
    entry = module.launch_configurations()[index]
    fn = entry["kernel"]
    signature = {name: entry["signature"].get(name, "constexpr") for name in fn.arg_names}
    constexprs = {(fn.arg_names.index(k),): v for k, v in entry["constexprs"].items()}
    # The PTX-inspected builds take the launcher's alignment specialization (without it no access is vectorized).
    attrs = aligned_attrs(fn, signature) if vocabularies else None
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    name = entry["name"] + (f" [aligned, V={'/'.join(map(str, vocabularies))}]" if vocabularies else "")
    try:
        # The launch options the launcher uses: num_warps, and num_stages where it sets one (the CRF's tl.dot path).
        options = {"num_warps": entry["num_warps"]}
        if entry.get("num_stages") is not None:
            options["num_stages"] = entry["num_stages"]
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as exc:  # noqa: BLE001 (any compiler error is the result)
        return dict(module=module_name, name=name, error=f"{type(exc).__name__}: {exc}"[-2000:])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    loads, local = ptx_stats(kernel.asm["ptx"])
    return dict(module=module_name, name=name, num_warps=entry["num_warps"], registers=int(found.group(1)),
                stack=int(found.group(2)), loads=loads, local=local, ptx_check=bool(vocabularies),
                vocabularies=vocabularies)


if __name__ == "__main__":
    jobs, missing = [], []
    for name, module in modules():
        if not hasattr(module, "launch_configurations"):
            missing.append(name)
            continue
        entries = module.launch_configurations()
        seen = set()
        only = os.environ.get("FUSEDLOSS_COMPILE_ONLY", "")
        inspected = softmax_vocabulary_builds(name, module)
        if "softmax" in name and not inspected:
            print(json.dumps(dict(module=name, name="PTX inspection", ptx_selection_error=(
                f"no bf16 build of {name} matches the launch on ({PTX_ROWS}, V) logits for V in {PTX_VOCABULARIES} "
                "(a *bf16 first pointer, the BLOCK_C/ROWS of _layout, the multi-block sweep): the kernel or its "
                "launch configurations changed; update softmax_vocabulary_builds in tests/test_triton_build.py"))))
        for index, entry in enumerate(entries):
            if only and not any(part in f"{name} {entry['name']}" for part in only.split(",")):
                continue
            key = (entry["kernel"].__name__, repr(sorted(entry["signature"].items())),
                   repr(sorted(entry["constexprs"].items())), entry["num_warps"], entry.get("num_stages"))
            if key not in seen:
                seen.add(key)
                jobs.append((name, index, None))
            if index in inspected and (key, "aligned") not in seen:
                seen.add((key, "aligned"))
                jobs.append((name, index, inspected[index]))
    for name in missing:
        print(json.dumps(dict(module=name, name="launch_configurations", error="module has Triton kernels but no "
                                                                               "launch_configurations()")))
    with ProcessPoolExecutor(max_workers=int(os.environ.get("FUSEDLOSS_COMPILE_JOBS", os.cpu_count() or 1))) as pool:
        for result in pool.map(build, jobs):
            print(json.dumps(result), flush=True)
"""


pytestmark = pytest.mark.skipif(
    os.environ.get("FUSEDLOSS_GPU_COMPILE_CHECK") != "1",
    reason="opt-in (minutes): set FUSEDLOSS_GPU_COMPILE_CHECK=1 or run make triton-build-check")


def _loads_cell(loads):
    return " ".join(f"{kind}:{count}" for kind, count in loads.items()) or "-"


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every build's result (one subprocess for the module's tests), printed as a table."""
    import json

    tmp_path = tmp_path_factory.mktemp("triton_build")
    env = dict(os.environ, TRITON_INTERPRET="0")
    script = tmp_path / "build.py"
    script.write_text(_BUILD)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=3600)
    assert result.returncode == 0, result.stderr[-4000:]
    builds = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    print(f"\n{'module':<14} {'build':<92} {'warps':>5} {'REG':>4} {'STACK':>5}  {'global loads (bytes:count)':<28} "
          f"{'local':>5}")
    for b in builds:
        if "ptx_selection_error" in b:
            print(f"{b['module']:<14} {b['name']:<92} ERROR {b['ptx_selection_error']}")
        elif "error" in b:
            print(f"{b['module']:<14} {b['name']:<92} ERROR {b['error']}")
        else:
            print(f"{b['module']:<14} {b['name']:<92} {b['num_warps']:>5} {b['registers']:>4} {b['stack']:>5}  "
                  f"{_loads_cell(b['loads']):<32} {b['local']:>5}")
    return builds


def test_every_triton_kernel_compiles_for_sm90_without_spills(builds):
    import json

    failed = [b for b in builds if "error" in b or ("stack" in b and b["stack"] > 0)]
    assert [b for b in builds if "stack" in b] and not failed, "\n".join(json.dumps(b) for b in failed)


def _inspected(builds):
    """The PTX-inspected softmax builds; fails naming the reason when the selection found none."""
    import json

    selection_errors = [b["ptx_selection_error"] for b in builds if "ptx_selection_error" in b]
    assert not selection_errors, "\n".join(selection_errors)
    inspected = [b for b in builds if b.get("ptx_check")]
    only = os.environ.get("FUSEDLOSS_COMPILE_ONLY", "")
    if not inspected and only and "softmax" not in only:
        pytest.skip(f"FUSEDLOSS_COMPILE_ONLY={only} builds no softmax kernel")
    assert inspected, "no softmax-loss build was selected for the PTX inspection"
    failed = [b for b in inspected if "error" in b]
    assert not failed, "\n".join(json.dumps(b) for b in failed)
    covered = {v for b in inspected for v in b["vocabularies"]}
    assert covered == {32000, 128256}, f"PTX inspection covers vocabularies {sorted(covered)} only"
    return inspected


def test_softmax_vocabulary_builds_use_no_local_memory(builds):
    """The bf16 builds of the softmax losses at the vocabulary layouts keep everything in registers."""
    bad = [(b["name"], b["stack"], b["local"]) for b in _inspected(builds) if b["stack"] > 0 or b["local"] > 0]
    assert not bad, f"local memory (build, stack bytes, ld/st.local count): {bad}"


def _vector_reads(loads):
    """16-byte reads of global memory: ld.global.v4.b32 and the like, cp.async of 16 bytes, TMA bulk copies."""
    return loads.get("ld16", 0) + loads.get("cp16", 0) + loads.get("bulk", 0)


def test_softmax_vocabulary_builds_use_16_byte_vector_loads(builds):
    """The bf16 builds of the softmax losses at the vocabulary layouts read the logits 16 bytes (8 bf16) per access,
    directly (ld.global.v4) or through software-pipelined copies (cp.async 16, TMA), when Triton's launcher knows
    the rows are 16-byte aligned."""
    bad = [(b["name"], b["loads"]) for b in _inspected(builds) if _vector_reads(b["loads"]) == 0]
    assert not bad, f"no 16-byte read of global memory (build, reads by kind and bytes): {bad}"
