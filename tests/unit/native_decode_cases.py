"""Paged KV caches, queries and the tolerance check the native decode-op tests share."""
import pytest
import torch

from kt_backends.cpu import native

F32, BF16 = torch.float32, torch.bfloat16


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at |x| (2^-7 of its power of two)."""
    x = x.float().abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str, rel32: float = 2e-6):
    """float32: max error within rel32 of the output's magnitude; bf16: each element within one bf16
    ulp of the reference (both round a float32 result that differs only by summation order; near
    zero, cancellation makes that float32 difference count, hence the small absolute term)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, ref.shape, out.dtype, ref.dtype)
    o, r = out.double(), ref.double()
    assert torch.isfinite(o).all(), f"{what}: non-finite output"
    scale = r.abs().max().clamp_min(1e-30)
    if out.dtype == F32:
        err = float((o - r).abs().max() / scale)
        assert err <= rel32, f"{what}: relative error {err:.3g} > {rel32:.3g}"
    else:
        bound = bf16_ulp(r).double() + 1e-5 * scale
        bad = (o - r).abs() > bound
        assert not bad.any(), (f"{what}: {int(bad.sum())} bf16 elements more than one ulp off, e.g. "
                               f"{float(o[bad][0])} vs {float(r[bad][0])}")


# decode attention of a bf16 model on AMX with 16+ query heads a kv head (MLA: all of them) runs on the
# tiles, which round the query and the probabilities to bf16 (attention_tiles.inc): measured ~2e-3 of
# the output's range against the float32 reference; a wrong layout or a lost key is off by O(1)
TILE_TOLERANCE = 1e-2
TILE_HEADS = 16


def takes_tiles(variant: str, q_dtype, kv_dtype, group: int, D: int, Dv: int) -> bool:
    """Whether a decode attention call takes the AMX tiles (attention_tiles.inc's attn_tiles_take)."""
    return (variant == "amx" and q_dtype == BF16 and kv_dtype == BF16 and group >= TILE_HEADS and D % 32 == 0
            and Dv % 16 == 0)


def assert_tile_close(out: torch.Tensor, ref: torch.Tensor, what: str):
    """Within TILE_TOLERANCE of the output's range (the tiles' bf16 operands)."""
    o, r = out.double(), ref.double()
    assert torch.isfinite(o).all(), f"{what}: non-finite output"
    err = float((o - r).abs().max() / r.abs().max().clamp_min(1e-30))
    assert err <= TILE_TOLERANCE, f"{what}: relative error {err:.3g} > {TILE_TOLERANCE}"


def paged(lens, Hkv, D, bs, dtype, seed=0, pad_blocks=3, scale=1.0):
    """Caches [num_blocks, bs, Hkv, D] holding len tokens per sequence in shuffled blocks, and the
    block table (int32, unused entries 0) and seq_lens (int32)."""
    g = torch.Generator().manual_seed(seed)
    per = [(L + bs - 1) // bs for L in lens]
    nb = sum(per) + pad_blocks
    k = (torch.randn(nb, bs, Hkv, D, generator=g) * scale).to(dtype)
    v = torch.randn(nb, bs, Hkv, D, generator=g).to(dtype)
    order = torch.randperm(nb, generator=g)
    table = torch.zeros(len(lens), max(per) + 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(per):
        table[b, :n] = order[used:used + n].to(torch.int32)
        used += n
    return k, v, table, torch.tensor(lens, dtype=torch.int32)


def query(B, Hq, D, dtype, seed=1, scale=1.0):
    return (torch.randn(B, Hq, D, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.fixture(params=list(native.VARIANTS))
def variant(request):
    """Each kernel variant in turn (the ones this CPU lacks skip); the default restored after. A test
    module takes it by importing it."""
    if request.param not in native.supported_variants():
        pytest.skip(f"this CPU (and build) cannot run the {request.param} kernels")
    best = native.variant()
    native.set_variant(request.param)
    yield request.param
    native.set_variant(best)
