"""GGUF files as model.path: kt-core's logits on a GGUF match kt-core's on the safetensors it came
from (F32: to float rounding; quantized: the checkpoint of what the blocks decode to, decoded by
the gguf package), for every architecture the GGUF reader maps; bad files fail with the file."""
from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("gguf")

from kt_core.errors import KtError  # noqa: E402
from kt_core.runtime.engine import Engine  # noqa: E402
from tests.gguf_writer import dequantized_folder, write_gguf  # noqa: E402
from tests.parity.tiny import build  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]
IDS = [3, 17, 42, 5, 88, 61, 9, 30, 77, 12, 50, 2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build(name, tmp_path_factory.mktemp(name) / "hf")
        return cache[name]
    return get


def logits(path, dtype="float32", extra=()):
    return Engine.from_pretrained(str(path), overrides=[f"model.dtype={dtype}", *extra]).logits(IDS)


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_gguf_matches_safetensors(tiny, tmp_path, arch):
    hf = tiny(arch)
    path = write_gguf(hf, tmp_path / f"{arch}.gguf")
    torch.testing.assert_close(logits(path), logits(hf), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,qtype", [("qwen3_moe", "Q4_0"), ("mixtral", "Q4_1"), ("qwen2_moe", "Q8_0"),
                                        ("llama", "Q4_0")])
def test_quantized_gguf_matches_its_decoded_weights(tiny, tmp_path, arch, qtype):
    """Q4_0 / Q4_1 are kept as int4 groups (native kernels on the CPU), Q8_0 is decoded at load;
    either way the model must compute what the gguf package decodes the blocks to."""
    hf = tiny(arch)
    path = write_gguf(hf, tmp_path / f"{arch}-{qtype}.gguf", qtype)
    ref = dequantized_folder(path, hf, tmp_path / "ref")
    got, want = logits(path), logits(ref)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    assert not torch.allclose(want, logits(hf), atol=1e-3), "the quantization should change the logits"


def test_int4_blocks_are_kept_not_decoded(tiny, tmp_path):
    from kt_core.weights.gguf_checkpoint import GGUFCheckpoint
    from kt_core.weights.quant import Quant

    path = write_gguf(tiny("qwen3_moe"), tmp_path / "m.gguf", "Q4_0")
    eng = Engine.from_pretrained(str(path), overrides=["model.dtype=float32"])
    moe = next(layer.ffn for layer in eng.model.layers if hasattr(layer.ffn, "shards"))
    ck = GGUFCheckpoint(path)
    assert ck.gguf_type("model.layers.1.mlp.experts.0.gate_proj.weight") == "Q4_0"
    w = ck.quantized("model.layers.1.mlp.experts.0.gate_proj.weight")
    assert w.format is Quant.INT4 and w.group_size == 32 and w.zeros is None
    assert moe.shards, "the MoE layer holds its experts"
    assert eng.model.weight_bytes() < 0.6 * Engine.from_pretrained(
        str(tiny("qwen3_moe")), overrides=["model.dtype=float32"]).model.weight_bytes()


def test_split_files_load_as_one(tiny, tmp_path):
    hf = tiny("qwen3")
    write_gguf(hf, tmp_path / "m.gguf", split_max_tensors=8)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) > 2
    torch.testing.assert_close(logits(parts[1]), logits(hf), rtol=1e-4, atol=1e-4)
    parts[-1].unlink()
    with pytest.raises(KtError, match=r"split GGUF.*missing"):
        logits(parts[0])


def test_kt_plan_reads_the_header_only(tiny, tmp_path):
    from kt_core.commands.plan import model_spec
    from kt_core.config import compose

    path = write_gguf(tiny("qwen2_moe"), tmp_path / "m.gguf", "Q4_0")
    spec = model_spec(compose([f"model.path={path}"]))
    assert spec.family == "qwen2_moe" and spec.moe.num_experts == 8 and spec.moe.shared_intermediate == 48
    assert spec.moe_layers == frozenset({0, 2})  # layer 1 is dense (mlp_only_layers), as in the file


def test_truncated_file_names_file_and_offset(tiny, tmp_path):
    path = write_gguf(tiny("qwen3"), tmp_path / "m.gguf")
    data = path.read_bytes()
    for cut in (30, 200, len(data) // 2, len(data) - 5):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(KtError, match=rf"cut{cut}\.gguf is truncated or corrupt: .* at offset \d+"):
            logits(bad)


def test_corrupt_files_fail_cleanly(tiny, tmp_path):
    path = write_gguf(tiny("qwen3"), tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(KtError, match="not a GGUF file"):
        logits(not_gguf)
    bad_version = tmp_path / "v.gguf"
    bad_version.write_bytes(bytes(data[:4]) + (99).to_bytes(4, "little") + bytes(data[8:]))
    with pytest.raises(KtError, match="v.gguf is not a GGUF file kt-core can read"):
        logits(bad_version)


def test_unknown_architecture_names_the_supported_ones(tiny, tmp_path):
    import gguf

    path = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(path, "rwkv7")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(KtError, match=r"GGUF architecture 'rwkv7' is not supported; .*qwen3moe"):
        logits(path)


def test_missing_file_and_bad_suffix_folder(tmp_path):
    with pytest.raises(Exception, match="does not exist|not found"):
        logits(tmp_path / "nope.gguf")
    shutil.rmtree(tmp_path, ignore_errors=True)
