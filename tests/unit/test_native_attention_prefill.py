"""A bf16 model's prefill attention on the native bf16 GEMMs (backends/cpu/native_attention.py) against
the torch reference in float32 on the same bf16 inputs: causal, a cached prefix, GQA, sliding windows,
chunks, several sequences, and the cases it leaves to torch."""
import pytest
import torch

from kt_backends.cpu import native, native_attention
from kt_core.backend.torch_ops.attention import attention_prefill

pytestmark = pytest.mark.skipif(not native.available(), reason="native CPU kernels not built")

BS = 16  # KV block size


def _case(lens, news, Hq=8, Hkv=2, D=64, seed=0):
    """Paged K/V for sequences of context lengths ``lens`` whose last ``news`` tokens are new queries."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // BS) for n in lens]
    k = torch.randn(sum(blocks) + 1, BS, Hkv, D, generator=g).bfloat16()
    v = torch.randn(sum(blocks) + 1, BS, Hkv, D, generator=g).bfloat16()
    perm = torch.randperm(sum(blocks), generator=g) + 1  # scattered blocks; block 0 unused
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    at = 0
    for b, nb in enumerate(blocks):
        table[b, :nb] = perm[at:at + nb]
        at += nb
    q = torch.randn(sum(news), Hq, D, generator=g).bfloat16()
    qsl = torch.tensor([0, *torch.tensor(news).cumsum(0).tolist()])
    return q, k, v, table, torch.tensor(lens), qsl


@pytest.mark.parametrize("lens,news,kw", [
    ([200], [200], {}),  # a fresh prompt (context not a multiple of the padding)
    ([300], [45], {}),  # new tokens after a cached prefix
    ([96, 130], [96, 17], {}),  # two sequences
    ([150], [150], {"sliding_window": 40}),
    ([150], [60], {"chunk": 64}),
    ([64], [64], {"causal": False}),
])
def test_matches_the_float32_reference(lens, news, kw):
    q, k, v, table, sl, qsl = _case(lens, news)
    scale = q.shape[-1] ** -0.5
    got = native_attention.try_attention_prefill(q, k, v, table, sl, qsl, scale, any_variant=True, **kw)
    ref = attention_prefill(q.float(), k.float(), v.float(), table, sl, qsl, scale, **kw)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == q.shape
    err = float((got.float() - ref).abs().max() / ref.abs().max())
    assert err < 1e-2, err


def test_query_rows_are_chunked_to_bound_the_scores(monkeypatch):
    # 124 rows in chunks of 8: the last chunk ragged (4 rows), and every chunk's products at least 16
    # rows (4 query heads a KV head), which the vector kernels need to be chunk-invariant: AVX512-BF16
    # rounds activations to bf16 from 2 rows (dp_min_rows), the float FMA path below does not (AMX tiles take
    # every row count alike; only AMX CPUs run this path outside tests)
    q, k, v, table, sl, qsl = _case([124], [124], seed=3)
    scale = q.shape[-1] ** -0.5
    whole = native_attention.try_attention_prefill(q, k, v, table, sl, qsl, scale, any_variant=True)
    monkeypatch.setattr(native_attention, "SCORE_BYTES", 4 * 4 * 128 * 8)  # 8 query rows at a time
    assert torch.equal(native_attention.try_attention_prefill(q, k, v, table, sl, qsl, scale, any_variant=True), whole)


def test_leaves_sinks_and_float32_to_torch():
    q, k, v, table, sl, qsl = _case([40], [40])
    scale = q.shape[-1] ** -0.5
    sinks = torch.zeros(q.shape[1])
    assert native_attention.try_attention_prefill(q, k, v, table, sl, qsl, scale, sinks=sinks, any_variant=True) is None
    assert native_attention.try_attention_prefill(q.float(), k.float(), v.float(), table, sl, qsl, scale,
                                                  any_variant=True) is None


def test_every_kernel_variant_gives_the_reference():
    q, k, v, table, sl, qsl = _case([100], [70], seed=5)
    scale = q.shape[-1] ** -0.5
    ref = attention_prefill(q.float(), k.float(), v.float(), table, sl, qsl, scale)
    try:
        for variant in native.supported_variants():
            native.set_variant(variant)
            got = native_attention.try_attention_prefill(q, k, v, table, sl, qsl, scale, any_variant=True)
            assert float((got.float() - ref).abs().max() / ref.abs().max()) < 1e-2, variant
    finally:
        native.set_variant(native.supported_variants()[-1])


def test_the_switch_leaves_it_to_torch(monkeypatch):
    q, k, v, table, sl, qsl = _case([40], [40])
    monkeypatch.setenv("KT_NATIVE_PREFILL_ATTENTION", "0")
    assert native_attention.try_attention_prefill(q, k, v, table, sl, qsl, 0.125, any_variant=True) is None


def test_a_cache_in_another_dtype_is_left_to_torch():
    q, k, v, table, sl, qsl = _case([40], [40])
    assert native_attention.try_attention_prefill(q, k.float(), v.float(), table, sl, qsl, 0.125,
                                                  any_variant=True) is None


@pytest.mark.parametrize("lens,news", [([200], [200]), ([300], [45]), ([96, 130], [96, 17])])
def test_the_chunked_causal_forward_matches_the_float32_reference(lens, news, monkeypatch, restore_native_variant):
    """The chunked forward (backends/cpu/chunked_attention.py, fine-tuning's too), which plain causal prefill
    takes where the kernels multiply bf16 pairs without AMX: a fresh prompt, a cached prefix, two
    sequences, in several query chunks, in every variant (its softmax is native)."""
    from kt_backends.cpu import chunked_attention as chunked

    if not chunked._precision_switch():
        pytest.skip("this torch has no torch.backends.mkldnn.matmul.fp32_precision")
    monkeypatch.setattr(chunked, "CHUNK", 32)
    q, k, v, table, sl, qsl = _case(lens, news, seed=7)
    scale = q.shape[-1] ** -0.5
    ref = attention_prefill(q.float(), k.float(), v.float(), table, sl, qsl, scale)
    for variant in native.supported_variants():
        native.set_variant(variant)
        got = native_attention.try_attention_prefill(q, k, v, table, sl, qsl, scale, chunked=True)
        assert got is not None and got.dtype == torch.bfloat16 and got.shape == q.shape
        err = float((got.float() - ref).abs().max() / ref.abs().max())
        assert err < 1e-2, (variant, err)
    for kw in ({"sliding_window": 40}, {"chunk": 64}, {"causal": False}):  # masks it does not take: the panels
        assert native_attention._chunked(q, kw.get("causal", True), kw.get("sliding_window"), None, kw.get("chunk"),
                                         False, True) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_float32_chunks_match_the_float32_reference(dtype, monkeypatch, restore_native_variant):
    """The float32 chunked forward (backends/cpu/chunked_attention_f32.py), which plain causal prefill takes
    where torch's bf16 products are its scalar loop: a fresh prompt, a cached prefix, two sequences, in
    several query chunks, in every variant; forced here, and chosen when oneDNN has no bf16."""
    from kt_backends.cpu import chunked_attention, chunked_attention_f32
    from kt_core.backend.torch_ops import wide_mm

    monkeypatch.setattr(chunked_attention_f32, "CHUNK", 16)
    q, k, v, table, sl, qsl = _case([96, 130], [96, 17], seed=11)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = q.shape[-1] ** -0.5
    ref = attention_prefill(q.double(), k.double(), v.double(), table, sl, qsl, scale)
    for variant in native.supported_variants():
        native.set_variant(variant)
        got = native_attention.try_attention_prefill(q, k, v, table, sl, qsl, scale, chunked="float32")
        assert got is not None and got.dtype == dtype and got.shape == q.shape
        err = float((got.double() - ref).abs().max() / ref.abs().max())
        assert err < (1e-5 if dtype == torch.float32 else 8e-3), (variant, err)
    monkeypatch.setattr(wide_mm, "onednn_bf16", lambda: False)
    monkeypatch.setattr(chunked_attention, "takes_forward", lambda: False)  # no bf16 pair products either
    assert native_attention._chunked(q, True, None, None, None, False, None) == "float32"
    assert native_attention._chunked(q, True, 40, None, None, False, None) is None  # a sliding window: not these
