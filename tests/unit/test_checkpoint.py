"""Loading errors are one clear line naming the file or tensor, and nothing is unpickled."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kt_core
from kt_core.errors import KtError
from kt_core.weights.checkpoint import Checkpoint


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("llama"), dst)
    return dst


def load(path, *overrides):
    return kt_core.Engine.from_pretrained(path, overrides=["model.dtype=float32", *overrides])


def test_unsupported_architecture_lists_supported(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KtError, match="unsupported architecture.*FalconForCausalLM.*supported: LlamaForCausalLM"):
        load(ckpt)


def test_missing_and_misshaped_tensors_are_named(ckpt):
    f = ckpt / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(KtError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        load(ckpt)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(KtError, match=r"model.layers.1.mlp.up_proj.weight in \S+.safetensors has shape \(3, 3\) but config.json implies"):
        load(ckpt)


def test_truncated_and_corrupt_files(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(KtError, match="model.safetensors is corrupt or truncated"):
        load(ckpt)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(KtError, match="corrupt or truncated"):
        load(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(KtError, match="config.json .* is not valid JSON"):
        Checkpoint(ckpt)


def test_bin_pickles_refused_unless_allowed(ckpt, tiny_checkpoint):
    state = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(KtError, match="only .bin \\(pickle\\) weights.*model.allow_bin_weights=true"):
        load(ckpt)
    engine = load(ckpt, "model.allow_bin_weights=true")  # weights_only=True: tensors only
    ref = load(tiny_checkpoint("llama"))
    assert torch.equal(engine.logits([1, 2, 3]), ref.logits([1, 2, 3]))


def test_malicious_bin_is_not_executed(ckpt, tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open(r'%s', 'w').write('pwned')" % (tmp_path / "pwned"),))
    (ckpt / "model.safetensors").unlink()
    torch.save({"x": Evil()}, ckpt / "pytorch_model.bin")
    with pytest.raises(KtError, match="could not be loaded safely"):
        load(ckpt, "model.allow_bin_weights=true")
    assert not (tmp_path / "pwned").exists()


def test_sharded_index(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2")
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, dst / fname, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    assert torch.allclose(load(dst).logits([4, 5, 6]), load(src).logits([4, 5, 6]))
    (dst / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(KtError, match="names shards that are missing: model-00002-of-00002"):
        load(dst)




@pytest.mark.parametrize("eos", ['"x"', "[1, null]", "-3", "true"])
def test_bad_generation_config_eos_is_a_one_line_error(tmp_path, eos):
    from kt_core.weights.checkpoint import generation_eos

    (tmp_path / "generation_config.json").write_text('{"eos_token_id": %s}' % eos)
    with pytest.raises(KtError, match="generation_config.json has eos_token_id"):
        generation_eos(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    assert generation_eos(tmp_path) == (2, 7)
