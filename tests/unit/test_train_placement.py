"""kt sft in a topology (train/placement.py): attention, dense layers and their adapters on the
attention device, the frozen experts in host RAM on the native CPU kernels; the gradients equal
transformers + peft autograd's on the same model (experts decoded from the same int8 codes)."""
import pytest
import torch

from tests.unit.test_arch_features import _dequantized_reference
from tests.unit.test_lora import random_b
from tests.unit.test_train_lora import check_grads, peft_grads

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"]


def _grads_in(topology, base, tmp_path, want, extra=()):
    from kt_core.config import compose
    from kt_core.models.model import CausalLM, QuantPlan
    from kt_core.models.spec import parse_config
    from kt_core.train.lora_model import LoraModel
    from kt_core.train.placement import place
    from kt_core.weights.checkpoint import Checkpoint
    from kt_core.weights.quant import Quant

    cfg = compose([f"topology={topology}", *extra])
    ck = Checkpoint(base)
    spec = parse_config(ck.config)
    at = place(cfg, spec, native_experts=True)
    model = CausalLM.load(ck, spec, at.backend, torch.float32, QuantPlan(experts=Quant.INT8, group_size=32),
                          placer=at.placer, homes=at.homes)
    check_grads(LoraModel(model, TARGETS, r=4, alpha=8, init=tmp_path / "a"), want, topology)
    return model, at


@pytest.fixture()
def reference(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("qwen2_moe")
    torch.manual_seed(0)  # peft draws lora_A from the global generator: the same adapter whatever ran before
    ref = peft.get_peft_model(_dequantized_reference(base, "int8"),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    random_b(ref, 2)
    ref.save_pretrained(tmp_path / "a", safe_serialization=True)
    return base, peft_grads(ref)


def test_hybrid_cpu_topology_trains_with_the_experts_on_the_host_device(reference, tmp_path):
    from kt_backends.cpu import native

    if not native.available():
        pytest.skip("native CPU kernels not built")
    base, want = reference
    try:
        model, at = _grads_in("hybrid_cpu", base, tmp_path, want, ["device.cpu.threads=2"])  # whatever the cores
    finally:
        from kt_core.config import compose
        from kt_core.runtime.engine import configure_cpu_threads

        configure_cpu_threads(compose([]))  # one logical CPU device again for the tests after
    assert "cpu:1" in at.where
    held = [s for layer in model.layers for s in getattr(layer.ffn, "shards", [])]
    assert held and all(type(e).__name__ == "PackedExperts" and e.pool == 1 for _, _, e in held), \
        "the experts are packed for the native kernels on cpu:1's workers"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: hybrid_1gpu puts attention on cuda:0")
def test_hybrid_1gpu_topology_trains_attention_on_the_accelerator(reference, tmp_path):
    base, want = reference
    model, at = _grads_in("hybrid_1gpu", base, tmp_path, want)
    assert model.layers[0].device.type == "cuda" and "cuda:0" in at.where


def test_a_topology_that_splits_attention_is_refused(tmp_path):
    from kt_core.config import compose
    from kt_core.errors import KtError
    from kt_core.models.spec import parse_config
    from kt_core.train.placement import place

    cfg = compose(["topology=hybrid_cpu", "topology.dense=[cpu:1]"])
    with pytest.raises(KtError, match="one device"):
        place(cfg, parse_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 128,
                                 "intermediate_size": 96}), native_experts=True)


def test_checkpointing_auto_follows_memory_and_device():
    """train.checkpoint_layers unset: on for an accelerator's attention or activations past a quarter of
    the free RAM, off otherwise; a set value wins either way."""
    from types import SimpleNamespace

    from kt_core.train.placement import activation_bytes, checkpointing

    moe = SimpleNamespace(top_k=8, intermediate=768, num_experts=128)
    spec = SimpleNamespace(hidden_size=2048, num_heads=32, num_kv_heads=4, head_dim=128, num_layers=48, moe=moe,
                           intermediate_size=6144)
    need = activation_bytes(spec, 4096)
    assert need == 4 * 4096 * 48 * (8 * 2048 + 3 * 40 * 128 + 3 * (8 * 768 + 128))
    assert activation_bytes(spec, 2048) * 2 == need  # linear in the tokens
    assert checkpointing(None, spec, 4096, False, 4 * need + 4)[0] is False
    on, why = checkpointing(None, spec, 4096, False, 4 * need - 4)
    assert on and why.startswith("auto: on") and "GB of activations" in why
    assert checkpointing(None, spec, 16, True, 1 << 50)[0] is True  # attention on an accelerator
    assert checkpointing(False, spec, 4096, True, 0) == (False, "train.checkpoint_layers=false")
    assert checkpointing(True, spec, 16, False, 1 << 50) == (True, "train.checkpoint_layers=true")
