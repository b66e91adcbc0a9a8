"""The native kernels' boundary: what Python checks before the C++ dereferences anything (the
calls, the packed experts, the dense GEMV) and calls racing thread-pool resizes and variant switches.
The library's own argument checks and error codes are in test_native_abi.py.

Every check here guards a read the kernels would otherwise make out of bounds (or a crash):
the C ABI trusts raw pointers and sizes, so a wrong shape must be refused, never computed on."""
import threading

import pytest
import torch

from kt_backends.cpu import native
from tests.unit.native_experts import H, I, call, experts, packed  # noqa: F401 (packed: the fixture)

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native CPU kernels: {native.status()}")


def fresh(packed):
    """A copy of a PackedExperts whose checks have not run yet (they are cached per object)."""
    return native.PackedExperts(packed.expert_ids, packed.fmt, packed.group, packed.hidden, packed.inter,
                                packed.gate, packed.up, packed.down)


# ---------------------------------------------------------------- Python-side checks of a call
def test_a_valid_call_still_works(packed):
    x, ids, w = call()
    out = native.moe_forward(packed, x, ids, w)
    assert out.shape == (3, H) and torch.isfinite(out).all()


@pytest.mark.parametrize("width", [H - 16, H + 16])
def test_hidden_width_must_match_the_packed_experts(packed, width):
    x, ids, w = call()
    with pytest.raises(ValueError, match=f"packed for hidden size {H}"):
        native.moe_forward(packed, torch.randn(3, width), ids, w)


def test_route_tensors_must_agree(packed):
    x, ids, w = call()
    with pytest.raises(ValueError, match="topk_ids must be 2-D"):
        native.moe_forward(packed, x, ids.flatten(), w)
    with pytest.raises(ValueError, match="topk_weights has shape .* must agree"):
        native.moe_forward(packed, x, ids, w[:, :1])
    with pytest.raises(ValueError, match="routes 2 tokens, hidden holds 3"):
        native.moe_forward(packed, x, ids[:2], w[:2])
    with pytest.raises(ValueError, match="integer expert ids"):
        native.moe_forward(packed, x, ids.float(), w)
    with pytest.raises(ValueError, match="topk_weights must be one of"):
        native.moe_forward(packed, x, ids, (w * 100).long())
    with pytest.raises(ValueError, match="hidden must be one of"):
        native.moe_forward(packed, x.long(), ids, w)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        native.moe_forward(packed, x.tolist(), ids, w)


def test_tensors_on_another_device_are_refused(packed):
    x, ids, w = call()
    with pytest.raises(ValueError, match="hidden is on meta.*cpu()"):
        native.moe_forward(packed, x.to("meta"), ids, w)


def test_non_contiguous_inputs_are_read_correctly(packed):
    x, ids, w = call()
    wide = torch.zeros(3, 2 * H)
    wide[:, ::2] = x
    assert torch.equal(native.moe_forward(packed, wide[:, ::2], ids.t().contiguous().t(), w),
                       native.moe_forward(packed, x, ids, w))


def test_activation_and_pool_are_checked(packed):
    x, ids, w = call()
    with pytest.raises(ValueError, match="unknown MoE activation 'relu'"):
        native.moe_forward(packed, x, ids, w, "relu")
    with pytest.raises(ValueError, match="unknown MoE activation"):
        native.moe_forward(packed, x, ids, w, ["silu"])
    for pool in (-1, 64, 1000, "0", 1.0, True):
        with pytest.raises(ValueError, match=r"pool .* 0\.\.63"):
            native.moe_forward(packed, x, ids, w, pool=pool)
        with pytest.raises(ValueError, match=r"pool .* 0\.\.63"):
            native.set_pool_threads(pool, 1)
        with pytest.raises(ValueError, match=r"pool .* 0\.\.63"):
            native.pool_threads(pool)
        with pytest.raises(ValueError, match=r"pool .* 0\.\.63"):
            native.submit(packed, x, ids, w, pool=pool)


def test_thread_counts_are_checked():
    for n in (0, -3, native.MAX_THREADS + 1, "2", 2.5):
        with pytest.raises(ValueError, match="threads"):
            native.set_threads(n)
        with pytest.raises(ValueError, match="threads"):
            native.set_pool_threads(1, n)
    with pytest.raises(ValueError, match="megabytes"):
        native.memory_bandwidth_gbps(megabytes=0)


def test_expert_ids_past_the_local_map_are_other_devices(packed):
    """Ids beyond the largest packed id (local_of's end) belong to experts held elsewhere: they
    add nothing and are never looked up; a negative id is an error."""
    x, ids, w = call()
    base = native.moe_forward(packed, x, ids, w)
    far = torch.tensor([[3, 0, 8], [7, 5, 2**40], [0, 7, 6]])  # 8, 6: past / inside the map, not held
    out = native.moe_forward(packed, x, far, torch.cat([w, torch.rand(3, 1)], dim=1))
    assert torch.equal(out, base)
    for dtype in (torch.int64, torch.int32):
        with pytest.raises(ValueError, match="negative expert id"):
            native.moe_forward(packed, x, torch.tensor([[3, -1]] * 3, dtype=dtype), w)


def test_no_routes_and_no_tokens(packed):
    x, ids, w = call()
    assert torch.equal(native.moe_forward(packed, x, ids[:, :0], w[:, :0]), torch.zeros(3, H))
    assert native.moe_forward(packed, x[:0], ids[:0], w[:0]).shape == (0, H)


# ---------------------------------------------------------------- packed experts checked once
def test_tampered_packed_experts_are_refused(packed):
    x, ids, w = call()
    bad = fresh(packed)
    bad.hidden = H * 2  # the panels hold H inputs: the kernel would read twice as far
    with pytest.raises(ValueError, match=r"gate\.data .* shape"):
        native.moe_forward(bad, torch.randn(3, 2 * H), ids, w)
    bad = fresh(packed)
    bad.gate = native.PackedProj(packed.gate.data[:2].clone(), packed.gate.scale, None, None)  # 2 of 4 experts
    with pytest.raises(ValueError, match=r"gate\.data .* shape"):
        native.moe_forward(bad, x, ids, w)
    bad = fresh(packed)
    bad.down = native.PackedProj(packed.down.data, packed.down.scale[:, :1].contiguous(), None, None)
    with pytest.raises(ValueError, match=r"down\.scale .* shape"):
        native.moe_forward(bad, x, ids, w)
    bad = fresh(packed)
    bad.up = native.PackedProj(packed.up.data.transpose(2, 3), packed.up.scale, None, None)
    with pytest.raises(ValueError, match=r"non-contiguous|up\.data"):
        native.moe_forward(bad, x, ids, w)
    bad = fresh(packed)
    bad.fmt = "int3"
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        native.moe_forward(bad, x, ids, w)
    bad = fresh(packed)
    bad.group = 6
    with pytest.raises(ValueError, match="multiple of 4"):
        native.moe_forward(bad, x, ids, w)
    bad = fresh(packed)
    bad.expert_ids = torch.tensor([3, 0, 7, 3])
    with pytest.raises(ValueError, match="duplicates"):
        native.moe_forward(bad, x, ids, w)


def test_checks_run_once_and_pin_what_the_pointers_point_to(packed):
    """A PackedExperts is checked on first use; later edits of its fields cannot turn the cached
    raw pointers into dangling ones (the tensors stay referenced) or change the sizes used."""
    p = native.pack(experts(seed=3))
    x, ids, w = call()
    before = native.moe_forward(p, x, ids, w)
    p.gate = p.up = p.down = None
    p.hidden = 7
    import gc
    gc.collect()
    assert torch.equal(native.moe_forward(p, x, ids, w), before)


def test_pack_refuses_weights_that_disagree_with_their_sizes():
    ex = experts("int8")
    ex.down.in_features = 2 * I  # the codes hold I inputs per row; the kernel would read 2*I
    with pytest.raises(ValueError, match=r"down weights have shape \(4, 64, 64\), expected \(4, 64, 32\)"):
        native.pack(ex)
    ex = experts("int8")
    ex.gate.qdata = ex.gate.qdata[..., :-2]  # in_features still says H
    with pytest.raises(ValueError, match="int8 codes have shape .* in_features=64 needs"):
        native.pack(ex)
    ex = experts("int4")
    ex.gate.scales = ex.gate.scales[..., :1]
    with pytest.raises(ValueError, match="scales have shape"):
        native.pack(ex)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "w8a8", "fp8", "int4"])
def test_every_format_passes_its_own_checks(fmt):
    p = native.pack(experts(fmt, bias=True))
    x, ids, w = call()
    assert torch.isfinite(native.moe_forward(p, x, ids, w, "swiglu_oai")).all()


# ---------------------------------------------------------------- the dense GEMV
def test_linear_checks_its_operands():
    g = torch.Generator().manual_seed(5)
    wt = torch.randn(24, 40, generator=g).bfloat16()
    x = torch.randn(3, 40, generator=g)
    ref = torch.nn.functional.linear(x, wt.float())
    assert torch.allclose(native.linear(x, wt), ref, atol=1e-4)
    with pytest.raises(ValueError, match=r"x has 39 features .* takes 40"):
        native.linear(torch.randn(3, 39), wt)
    with pytest.raises(ValueError, match="bias must be .* of 24 values"):
        native.linear(x, wt, torch.zeros(23))
    with pytest.raises(ValueError, match="contiguous 2-D bfloat16"):
        native.linear(x[:, :24], wt.t())
    with pytest.raises(ValueError, match="contiguous 2-D bfloat16"):
        native.linear(x, wt.float())
    with pytest.raises(ValueError, match="floating point CPU tensor"):
        native.linear(x.long(), wt)
    assert native.linear(x[:0], wt).shape == (0, 24)


# ---------------------------------------------------------------- races
def test_resizing_the_pool_while_calls_run_keeps_results_right():
    """set_threads from two threads while a third runs moe_forward in a loop: resizes wait for
    the job in flight (they used to stop workers under it and race on the worker list)."""
    p = native.pack(experts("bf16", seed=4))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(24, H, generator=g)
    ids = torch.tensor([3, 0, 7, 5]).repeat(24, 1)[:, torch.randperm(4, generator=g)[:2]]
    w = torch.rand(24, 2, generator=g)
    before = native.threads()
    ref = native.moe_forward(p, x, ids, w)
    stop, errors, calls = threading.Event(), [], [0]

    def resize(sizes):
        try:
            while not stop.is_set():
                for n in sizes:
                    native.set_threads(n)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    resizers = [threading.Thread(target=resize, args=(s,)) for s in ((1, 3, 2), (4, 2))]
    for t in resizers:
        t.start()
    try:
        for _ in range(150):
            out = native.moe_forward(p, x, ids, w)
            calls[0] += 1
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    finally:
        stop.set()
        for t in resizers:
            t.join(60)
        native.set_threads(before)
    assert not errors, errors
    assert native.threads() == before


def test_switching_variants_while_calls_run_keeps_results_right():
    variants = native.supported_variants()
    if len(variants) < 2:
        pytest.skip("one kernel variant on this CPU")
    p = native.pack(experts("int4", seed=5))
    x, ids, w = call()
    ref = native.moe_forward(p, x, ids, w)
    best, stop = native.variant(), threading.Event()

    def flip():
        while not stop.is_set():
            for v in variants:
                native.set_variant(v)

    t = threading.Thread(target=flip)
    t.start()
    try:
        for _ in range(200):
            out = native.moe_forward(p, x, ids, w)
            assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    finally:
        stop.set()
        t.join(60)
        native.set_variant(best)
