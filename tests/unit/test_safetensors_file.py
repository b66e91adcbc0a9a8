"""kt-core's own safetensors reader (plain reads, no memory map) against the safetensors package."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kt_core.errors import KtError
from kt_core.weights.checkpoint import check_safetensors_header
from kt_core.weights.safetensors_file import SafetensorsFile


def test_every_dtype_reads_as_the_safetensors_package_does(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(3, 5, generator=g).bfloat16(), "f16": torch.randn(7, generator=g).half(),
               "f32": torch.randn(2, 3, 4, generator=g), "i8": torch.randint(-128, 127, (9,), dtype=torch.int8),
               "u8": torch.randint(0, 255, (4, 4), dtype=torch.uint8), "i64": torch.arange(5),
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "bool": torch.tensor([True, False])}
    if hasattr(torch, "float8_e4m3fn"):
        tensors["f8"] = torch.randn(6, generator=g).to(torch.float8_e4m3fn)
    f = tmp_path / "m.safetensors"
    save_file(tensors, str(f))
    ours = SafetensorsFile(f, *check_safetensors_header(f))
    with safe_open(str(f), "pt") as ref:
        assert sorted(ours.keys()) == sorted(ref.keys())
        for name in ref.keys():
            a, b = ours.get_tensor(name), ref.get_tensor(name)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name  # bitwise
    ours.close()
    assert torch.equal(ours.get_tensor("f32"), tensors["f32"])  # reopens after close


def test_a_file_cut_after_its_header_was_checked_is_a_clear_error(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(64), "b": torch.ones(64)}, str(f))
    reader = SafetensorsFile(f, *check_safetensors_header(f))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(KtError, match=r"m.safetensors.*truncated: download it again"):
        [reader.get_tensor(n) for n in ("a", "b")]


def test_loading_maps_nothing(tmp_path):
    # the point of reading instead of mapping: no page of a weight file stays in the process
    import kt_core
    from kt_core.models.synthetic import synthesize

    path = synthesize(tmp_path / "m", preset="tiny-qwen3-moe", layers=1, sample_tokens=8).path
    from pathlib import Path

    proc = Path("/proc/self/maps")
    if not proc.is_file():
        pytest.skip("no /proc/self/maps on this OS")
    engine = kt_core.Engine.from_pretrained(path)
    assert not [line for line in proc.read_text().splitlines() if ".safetensors" in line]
    assert engine.generate([5, 6], max_new_tokens=1, ignore_eos=True).token_ids


def test_rows_read_alone_are_the_tensors_rows(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 6, generator=g).bfloat16()
    f = tmp_path / "m.safetensors"
    save_file({"w": w, "v": torch.randn(4, 2, 3, generator=g)}, str(f))
    ours = SafetensorsFile(f, *check_safetensors_header(f))
    for r0, r1 in [(0, 37), (0, 1), (5, 17), (36, 37), (20, 20)]:
        assert torch.equal(ours.get_rows("w", r0, r1), w[r0:r1])
    assert torch.equal(ours.get_rows("v", 1, 3), ours.get_tensor("v")[1:3])
    for r0, r1 in [(-1, 3), (5, 4), (0, 38)]:
        with pytest.raises(KtError, match="cannot be read"):
            ours.get_rows("w", r0, r1)


@pytest.mark.slow  # two loads of a tiny model: ~5 s on 2 cores
def test_a_large_weight_quantized_a_block_of_rows_at_a_time_loads_the_same_model(tmp_path, monkeypatch):
    """A quantized dense weight over reader.STREAM_BYTES is read and quantized a block of rows at a time
    (Checkpoint.read_rows); the model it loads is bit for bit the one whole-tensor quantization gives."""
    import kt_core
    from kt_core.models import reader
    from kt_core.models.synthetic import synthesize

    shape = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=256,
                 tie_word_embeddings=False)
    path = tmp_path / "m"
    synthesize(path, preset="tiny-qwen3-moe", layers=2, shape=shape, sample_tokens=16, tokenizer="deepseek")
    ov = ["model.dtype=bfloat16", "quant.dense=int8"]  # (int4's panels in place: test_native_linear.py)
    ids = list(range(5, 40))
    whole = kt_core.Engine.from_pretrained(path, overrides=ov).logits(ids)
    reads = []
    monkeypatch.setattr(reader, "STREAM_BYTES", 0)  # every quantized dense weight streamed ...
    monkeypatch.setattr(reader, "STREAM_BLOCK_BYTES", 64 * 2 * 5)  # ... 5 rows of 64 inputs at a time
    from kt_core.weights.checkpoint import Checkpoint

    read_rows = Checkpoint.read_rows
    monkeypatch.setattr(Checkpoint, "read_rows", lambda self, *a: reads.append(a[0]) or read_rows(self, *a))
    streamed = kt_core.Engine.from_pretrained(path, overrides=ov).logits(ids)
    assert any("lm_head" in n for n in reads) and any("q_proj" in n for n in reads)
    assert torch.equal(streamed, whole)
