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
