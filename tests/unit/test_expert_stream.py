"""kt_core/models/expert_stream.py: experts read a chunk at a time into reused buffers by a reader
thread while the previous chunk quantizes give exactly what quantizing the whole stacked projection
gives, for every chunk size (one expert, a partial last chunk, all at once), an expert stored in
another dtype, and a checkpoint wrapped by a LoRA adapter (whose merged weights must not be read
from the file); errors in either thread surface."""
import json

import pytest
import torch
from safetensors.torch import save_file

from kt_core.errors import KtError
from kt_core.models import expert_stream
from kt_core.models.expert_stream import Stacked
from kt_core.weights.checkpoint import Checkpoint
from kt_core.weights.quant import quantize

E, I, H = 11, 48, 64


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"],
                                                      "model_type": "qwen3_moe"}))
    g = torch.Generator().manual_seed(0)
    tensors = {f"e.{j}.w": (torch.randn(I, H, generator=g) * 0.02).bfloat16() for j in range(E)}
    tensors["e.3.w"] = tensors["e.3.w"].float()  # one expert stored in another dtype
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return Checkpoint(tmp_path)


NAMES = [f"e.{j}.w" for j in range(E)]


@pytest.mark.parametrize("fmt,symmetric", [("int4", True), ("int4", False), ("int8", True), ("fp8", True)])
@pytest.mark.parametrize("experts_a_chunk", [1, 3, 4, E])
def test_chunks_quantize_as_the_whole_projection(checkpoint, fmt, symmetric, experts_a_chunk, monkeypatch):
    monkeypatch.setattr(expert_stream, "CHUNK_BYTES", experts_a_chunk * I * H * 2)
    whole = torch.stack([checkpoint.get(n, (I, H)).bfloat16() for n in NAMES])
    stacked = Stacked(checkpoint, NAMES, (I, H))
    assert torch.equal(stacked().bfloat16(), whole)
    q = stacked.quantized(torch.bfloat16, lambda w: quantize(w, fmt, 32, symmetric))
    ref = quantize(whole, fmt, 32, symmetric)
    assert torch.equal(q.qdata, ref.qdata) and torch.equal(q.scales, ref.scales)
    assert (q.zeros is None) == (ref.zeros is None) and (q.zeros is None or torch.equal(q.zeros, ref.zeros))


def test_read_into_reads_the_file_into_the_destination(checkpoint):
    out = torch.empty(2, I, H, dtype=torch.bfloat16)
    checkpoint.read_into("e.1.w", out[1], (I, H))
    assert torch.equal(out[1], checkpoint.get("e.1.w", (I, H)))
    checkpoint.read_into("e.3.w", out[0], (I, H))  # stored float32: converted
    assert torch.equal(out[0], checkpoint.get("e.3.w", (I, H)).bfloat16())


def test_an_adapted_checkpoint_streams_its_merged_weights(checkpoint, monkeypatch):
    from kt_core.weights.lora import Adapted

    monkeypatch.setattr(expert_stream, "CHUNK_BYTES", 2 * I * H * 2)
    a, b = torch.randn(4, H) * 0.1, torch.randn(I, 4) * 0.1

    class _Adapter:  # what Adapted reads of an adapter: its pairs and scaling
        pairs, expert_lora, scaling, path, base_model = {"e.5.w": (a, b)}, None, 2.0, None, None

    ck = Adapted(checkpoint, _Adapter())
    merged = checkpoint.get("e.5.w", (I, H)).float() + 2.0 * b @ a
    q = Stacked(ck, NAMES, (I, H)).quantized(torch.bfloat16, lambda w: quantize(w, "int8", 32))
    ref = quantize(torch.stack([ck.get(n, (I, H)).bfloat16() for n in NAMES]), "int8", 32)
    assert torch.equal(q.qdata, ref.qdata) and torch.equal(q.scales, ref.scales)
    assert torch.equal(ref.qdata[5], quantize(merged.bfloat16()[None], "int8", 32).qdata[0])


def test_errors_of_the_reader_and_the_quantizer_surface(checkpoint, monkeypatch):
    monkeypatch.setattr(expert_stream, "CHUNK_BYTES", 2 * I * H * 2)
    with pytest.raises(KtError, match="missing"):
        Stacked(checkpoint, NAMES[:5] + ["missing"] + NAMES[6:], (I, H)).quantized(
            torch.bfloat16, lambda w: quantize(w, "int4", 32))
    calls = []

    def fails_second(w):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("quantize failed")
        return quantize(w, "int4", 32)

    with pytest.raises(RuntimeError, match="quantize failed"):
        Stacked(checkpoint, NAMES, (I, H)).quantized(torch.bfloat16, fails_second)
