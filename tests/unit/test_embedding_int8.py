"""quant.embed=int8: the token embedding as int8 rows (groups of 32, as GGUF's Q8_0 token_embd),
each looked-up row dequantized; a tied head keeps the table in the model's dtype."""
import pytest
import torch

import kt_core
from kt_core.errors import KtError
from kt_core.weights.embedding import QuantizedEmbedding
from kt_core.weights.quant import dequantize, quantize

PROMPT = [5, 17, 33, 2, 90, 41, 41, 7, 12, 64]


def test_a_lookup_is_the_dequantized_rows():
    w = quantize(torch.randn(50, 64), "int8", int8_group=32)
    emb = QuantizedEmbedding(w, torch.bfloat16)
    ids = torch.tensor([3, 0, 49, 3])
    assert torch.equal(emb[ids], dequantize(w)[ids].bfloat16())
    assert emb.shape == (50, 64) and emb.nbytes() < 50 * 64 * 2
    with pytest.raises(ValueError, match="int8"):
        QuantizedEmbedding(quantize(torch.randn(8, 64), "int4", group_size=32), torch.bfloat16)


def test_a_table_with_zero_points_looks_up_its_values():
    """A GGUF Q5_K / Q5_1 token_embd kept under quant.embed=int8 carries zero points."""
    from tests.unit.native_experts import int8_with_zeros

    w = int8_with_zeros(torch.randn(50, 64), 32)
    ids = torch.tensor([7, 49, 0])
    torch.testing.assert_close(QuantizedEmbedding(w, torch.float32)[ids], dequantize(w)[ids], rtol=0, atol=0)
    assert not torch.allclose(dequantize(w), w.qdata.float() * w.scales.repeat_interleave(32, -1))


def test_an_engine_with_an_int8_embedding(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")  # untied head
    ref = kt_core.Engine.from_pretrained(path, overrides=["model.dtype=float32"])
    eng = kt_core.Engine.from_pretrained(path, overrides=["model.dtype=float32", "quant.embed=int8"])
    assert isinstance(eng.model.embed, QuantizedEmbedding) and eng.model.embed.group == 32
    assert eng.model.weight_bytes() < ref.model.weight_bytes()
    a, b = eng.logits(PROMPT), ref.logits(PROMPT)
    assert float((a - b).abs().max() / b.abs().max()) < 2e-2  # int8 rows: ~0.4% a value
    assert len(eng.generate(PROMPT, max_new_tokens=4, ignore_eos=True).token_ids) == 4
    tied = kt_core.Engine.from_pretrained(tiny_checkpoint("qwen2_tied_mha"), overrides=["quant.embed=int8"])
    assert isinstance(tied.model.embed, torch.Tensor)  # the head multiplies it: kept as it is
    with pytest.raises(KtError, match="quant.embed=int8"):
        kt_core.Engine.from_pretrained(path, overrides=["quant.embed=fp8"])
