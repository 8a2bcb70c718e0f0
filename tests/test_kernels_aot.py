"""Every Triton kernel variant the launchers of spo_fast.kernels can pick, compiled ahead of time for sm_80 (A100)
and sm_90 (H100/H200) on this CPU machine (spo_fast.kernels.aot: Triton's compiler and the ptxas of the triton
wheel, no GPU or driver needed): the enumeration covers every kernel, dtype, switch and block choice; every
variant compiles; none spills; and
benchmarks/results/kernel_resources.json is what this code compiles to.

The committed JSON is compared exactly (the variant set, registers, spill stores and loads, stack, shared memory,
num_warps per variant and arch) when it was written by the same triton and ptxas versions as the ones here: for
one toolchain the compile is deterministic, so any difference means the kernels or the launchers changed without
the JSON being regenerated. With another toolchain (the GPU image's triton 3.6, say) the comparison is skipped:
ptxas versions legitimately differ in register allocation, and Triton versions in specialisation.

Wall time: the compile dominates (~2000 compiles, every variant for both archs, in a pool of one process per
CPU; see benchmarks/README.md for the measured time). Slow, so compiled once per module (the fixtures).
"""
import importlib
import json
import pkgutil
from pathlib import Path

import pytest

from spo_fast.kernels import aot, ddim_step, pair_select, spo_loss

TOOLCHAIN_ERROR = aot.toolchain_error()
pytestmark = pytest.mark.skipif(TOOLCHAIN_ERROR is not None,
                                reason=f"triton with its NVIDIA backend and bundled ptxas is needed: {TOOLCHAIN_ERROR}")

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "kernel_resources.json"
FLOAT_TYPES = ("*fp32", "*fp16", "*bf16")
# Kernels that spill today (the numbers: benchmarks/README.md). Their spill check is an expected failure, strict:
# once a kernel stops spilling its check passes, which fails the run until the entry is removed here.
def _jitted() -> list[str]:
    """``module.function`` of every function the kernel modules pass to triton.jit (their ``_kernels()``)."""
    if TOOLCHAIN_ERROR is not None:
        return []
    return sorted(f"{m.__name__.rsplit('.', 1)[-1]}.{k.fn.__name__}" for m in aot.KERNEL_MODULES for k in m._kernels())


@pytest.fixture(scope="module")
def variants() -> list[aot.Variant]:
    return aot.enumerate_variants()


@pytest.fixture(scope="module")
def records(variants) -> list[dict]:
    return aot.compile_variants(variants, aot.ARCHS)


def _types(v: aot.Variant) -> dict:
    return {**dict(v.signature), **dict(v.constexprs)}


def _block_sets(variants, kernel: str, axes: tuple[str, ...], blocks: tuple[str, ...]) -> dict[tuple, set]:
    """{axis values: {block constexprs}} over the variants of ``kernel``."""
    out: dict[tuple, set] = {}
    for v in variants:
        if v.kernel == kernel:
            t = _types(v)
            out.setdefault(tuple(t[a] for a in axes), set()).add(tuple(t[b] for b in blocks))
    return out


def test_enumeration_covers_every_jitted_kernel(variants):
    """The variants cover every function the kernel modules pass to triton.jit (their ``_kernels()``), and every
    module of spo_fast.kernels that has kernels is one aot drives."""
    modules = [importlib.import_module(f"spo_fast.kernels.{m.name}")
               for m in pkgutil.iter_modules([str(Path(aot.__file__).parent)])]
    with_kernels = {m for m in modules if hasattr(m, "_kernels")}
    assert with_kernels == set(aot.KERNEL_MODULES)
    assert {v.name for v in variants} == set(_jitted())
    assert len(variants) == len(set(variants))


def test_enumeration_has_every_step_dtype_and_switch(variants):
    """The DDIM step: each input dtype x prediction type x K (k > 1 pooled, k = 1 the plain ddim_step, a constexpr)
    at every block choice of ``_blocks`` (an exhaustive scan: above 2^16 elements it no longer changes); its
    log-density kernel at every BLOCK_P (16..1024)."""
    want_blocks = {ddim_step._blocks(c)[:2] for c in range(1, 2**16 + 1)}
    assert want_blocks == {(128, 1), (256, 1), (512, 1), (512, 4)}
    got = _block_sets(variants, "_pooled_step_kernel", ("x_ptr", "V_PRED", "K"), ("BLOCK", "BLOCKS_PER_PROGRAM"))
    assert set(got) == {(t, vp, k) for t in FLOAT_TYPES for vp in (False, True) for k in ("i32", 1)}
    assert all(blocks == want_blocks for blocks in got.values())
    assert all(_types(v)["MANUAL_RTNE"] is False for v in variants if v.kernel == "_pooled_step_kernel")
    block_p = {_types(v)["BLOCK_P"] for v in variants if v.kernel == "_log_prob_kernel"}
    assert block_p == {ddim_step._BLOCK_P}


def test_enumeration_has_every_loss_dtype_and_layout(variants):
    """The loss: each dtype x shared/separate policy and reference means, forward and backward, at every block
    choice of ``_blocks``."""
    want_blocks = {spo_loss._blocks(c)[:2] for c in range(1, 2**16 + 1)}
    fwd = _block_sets(variants, "_win_lose_fwd_kernel", ("xw_ptr", "SHARED_POL", "SHARED_REF"),
                      ("BLOCK", "BLOCKS_PER_PROGRAM"))
    assert set(fwd) == {(t, p, r) for t in FLOAT_TYPES for p in (False, True) for r in (False, True)}
    bwd = _block_sets(variants, "_win_lose_bwd_kernel", ("xw_ptr", "SHARED_POL"), ("BLOCK", "BLOCKS_PER_PROGRAM"))
    assert set(bwd) == {(t, p) for t in FLOAT_TYPES for p in (False, True)}
    assert all(blocks == want_blocks for blocks in (*fwd.values(), *bwd.values()))


def test_enumeration_has_every_selection_dtype_and_block(variants):
    """The pair selection: each img dtype x u given or drawn, at every (BLOCK_K, BLOCK_D) of ``_blocks`` over every
    k it takes (1..64); txt and u are read as fp32 whatever their dtype (the launcher casts them: small)."""
    want_blocks = {pair_select._blocks(k) for k in range(1, pair_select._MAX_K + 1)}
    assert len(want_blocks) == 6
    got = _block_sets(variants, "_score_select_kernel", ("img_ptr", "txt_ptr", "HAS_U"), ("BLOCK_K", "BLOCK_D"))
    assert set(got) == {(a, "*fp32", u) for a in FLOAT_TYPES for u in (False, True)}
    assert all(blocks == want_blocks for blocks in got.values())
    u_types = {_types(v)["u_ptr"] for v in variants if v.kernel == "_score_select_kernel" and _types(v)["HAS_U"]}
    assert u_types == {"*fp32"}


def test_every_variant_compiles(records, variants):
    assert len(records) == len(variants) * len(aot.ARCHS)
    failed = [f"{r['kernel']} {r['arch']} [{r['variant']}]: {r['error'][:300]}" for r in records if "error" in r]
    assert not failed, f"{len(failed)} variants do not compile:\n" + "\n".join(failed)


@pytest.mark.parametrize("kernel", _jitted())
def test_no_variant_spills(records, kernel):
    spilled = [f"{r['arch']} {r['spill_stores']}/{r['spill_loads']} B stored/loaded, {r['registers']} registers "
               f"[{r['variant']}]" for r in records
               if r["kernel"] == kernel and "error" not in r and r["spill_stores"] + r["spill_loads"] > 0]
    assert not spilled, f"{kernel}: {len(spilled)} variants spill:\n" + "\n".join(spilled)


def test_summary_lists_every_kernel_and_arch(records):
    rows = aot.summarize(records)
    assert {(r["kernel"], r["arch"]) for r in rows} == {(r["kernel"], r["arch"]) for r in records}
    table = aot.format_summary(rows)
    assert all(f"`{r['kernel']}` | {r['arch']} | {r['variants']} |" in table for r in rows)


def test_committed_json_is_current(records):
    """benchmarks/results/kernel_resources.json lists exactly these variants with these resources (see the module
    docstring for when this is skipped); regenerate it with ``python -m spo_fast.kernels.aot``."""
    committed = json.loads(COMMITTED.read_text())
    here = aot.toolchain_versions()
    if (committed["triton"], committed["ptxas"]) != (here["triton"], here["ptxas"]):
        pytest.skip(f"{COMMITTED.name} is from triton {committed['triton']} / ptxas {committed['ptxas']}, this is "
                    f"triton {here['triton']} / ptxas {here['ptxas']}")
    old, new = aot.resources(committed["records"]), aot.resources(records)
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    lines = ([f"only in the JSON: {k}" for k in sorted(old.keys() - new.keys())]
             + [f"not in the JSON: {k}" for k in sorted(new.keys() - old.keys())]
             + [f"changed: {k}: {old[k]} -> {new[k]}" for k in changed])
    assert not lines, (f"{COMMITTED} is stale ({len(lines)} differences); regenerate it with "
                       f"`python -m spo_fast.kernels.aot`:\n" + "\n".join(lines[:50]))
