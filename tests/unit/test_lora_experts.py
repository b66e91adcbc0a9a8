"""LoRA on the routed experts (PEFT's target_parameters on transformers' fused expert tensors):
kt-core runs such an adapter as peft does, kt merge writes it merged, and an adapter for other
experts is refused."""
import pytest
import torch

import kt_core
from kt_core.errors import KtError
from tests.parity.tiny import hf_model
from tests.unit.test_lora import PROMPT, check_against_peft, make_adapter, random_b

peft = pytest.importorskip("peft")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def expert_adapter(base, out, params, modules=(), seed=0):
    return make_adapter(base, out, list(modules), seed=seed, params=params)


@pytest.mark.parametrize("name,params,modules", [("qwen3_moe", EXPERTS, ()),
                                                 ("qwen3_moe", ["mlp.experts.down_proj"], ["q_proj"]),
                                                 ("deepseek_v3", EXPERTS, ["o_proj"])])
def test_expert_adapter_matches_peft(name, params, modules, tiny_checkpoint, tmp_path):
    base = tiny_checkpoint(name)
    check_against_peft(base, expert_adapter(base, tmp_path / "a", params, modules), tmp_path / "a", f"{name} {params}")


def test_kt_merge_writes_the_experts_merged(tiny_checkpoint, tmp_path):
    from kt_core.cli import main

    base = tiny_checkpoint("qwen3_moe")
    ref_model = expert_adapter(base, tmp_path / "a", EXPERTS)
    assert main(["merge", f"model.path={base}", f"lora.path={tmp_path / 'a'}", f"out={tmp_path / 'm'}"]) == 0
    with torch.no_grad():
        ref = ref_model(torch.tensor([PROMPT])).logits[0]
        merged = hf_model(tmp_path / "m")(torch.tensor([PROMPT])).logits[0]
    assert float((merged - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_adapter_for_other_experts_is_refused(tiny_checkpoint, tmp_path):
    expert_adapter(tiny_checkpoint("qwen3_moe"), tmp_path / "a", EXPERTS)
    with pytest.raises(KtError, match="made for another"):
        kt_core.Engine.from_pretrained(tiny_checkpoint("qwen2_moe"), overrides=["model.dtype=float32",
                                                                                f"lora.path={tmp_path / 'a'}"])


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_training_expert_adapters_matches_peft_and_saves_what_peft_loads(name, tiny_checkpoint, tmp_path):
    """train.lora.targets experts.gate_up_proj / experts.down_proj: the gradients of every expert's A
    and B equal peft's target_parameters adapters', and the adapter kt-core saves loads in peft."""
    from tests.unit.test_train_lora import load

    base = tiny_checkpoint(name)
    ref = expert_adapter(base, tmp_path / "a", EXPERTS, ["q_a_proj" if name == "deepseek_v3" else "q_proj"])
    want = _peft_grads(ref)
    lora = load(base, ["q_a_proj" if name == "deepseek_v3" else "q_proj", "experts.gate_up_proj",
                       "experts.down_proj"], init=tmp_path / "a")
    _check_expert_grads(lora, want, name)
    with torch.no_grad():  # one step, then the saved adapter in peft gives kt-core's logits
        for p in lora.parameters():
            p -= 0.05 * p.grad
    out = lora.save(tmp_path / "trained", str(base))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_model(base), str(out))(torch.tensor([PROMPT])).logits[0]
    ours = kt_core.Engine.from_pretrained(base, overrides=["model.dtype=float32", f"lora.path={out}"]).logits(PROMPT)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-4


def test_init_adapter_on_experts_needs_the_expert_targets(tiny_checkpoint, tmp_path):
    from tests.unit.test_train_lora import load

    base = tiny_checkpoint("qwen3_moe")
    expert_adapter(base, tmp_path / "a", EXPERTS, ["q_proj"])
    with pytest.raises(KtError, match="train.lora.targets does not name: add experts.down_proj"):
        load(base, ["q_proj"], init=tmp_path / "a")


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_expert_adapters_on_native_int8_experts_match_peft(name, tiny_checkpoint, tmp_path):
    """The same adapters on experts packed for the native kernels (int8 codes: each frozen product a
    native call, forward and transposed; the low-rank products in torch between them) against peft on
    transformers with those experts decoded from the codes: every expert's A and B gradient."""
    from kt_backends.cpu import native
    from kt_core.models.model import CausalLM, QuantPlan
    from kt_core.models.spec import parse_config
    from kt_core.train.lora_model import AutogradBackend, LoraModel
    from kt_core.train.native_experts import AdaptedExperts
    from kt_core.weights.checkpoint import Checkpoint
    from kt_core.weights.quant import Quant
    from tests.unit.test_arch_features import _dequantized_reference

    if not native.available():
        pytest.skip("native CPU kernels not built")
    base = tiny_checkpoint(name)
    attn = "q_a_proj" if name == "deepseek_v3" else "q_proj"
    torch.manual_seed(0)  # peft draws lora_A from the global generator: the same adapter whatever ran before
    ref = peft.get_peft_model(_dequantized_reference(base, "int8"),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=[attn], lora_dropout=0.0,
                                              target_parameters=EXPERTS))
    random_b(ref, 3).save_pretrained(tmp_path / "a", safe_serialization=True)
    want = _peft_grads(ref)
    ck = Checkpoint(base)
    model = CausalLM.load(ck, parse_config(ck.config), AutogradBackend(native_experts=True), torch.float32,
                          QuantPlan(experts=Quant.INT8, group_size=32))
    lora = LoraModel(model, [attn, "experts.gate_up_proj", "experts.down_proj"], r=4, alpha=8, init=tmp_path / "a")
    held = [s[2] for layer in model.layers for s in getattr(layer.ffn, "shards", [])]
    assert held and all(isinstance(e, AdaptedExperts) for e in held), "the adapters sit on the packed experts"
    # the native int8 kernels take activations as int16 codes or two int8 codes a token (~3e-5 of a
    # row's largest each product): through two layers the adapters' gradients sit within ~1.2e-4 of
    # peft's float products for some random draws of the tiny checkpoint (it depends on test order)
    _check_expert_grads(lora, want, name, tol=5e-4)


def _peft_grads(ref) -> dict:
    """peft's adapter gradients (by parameter name) of the answer's summed cross-entropy on PROMPT."""
    import torch.nn.functional as F

    from tests.unit.test_train_lora import FIRST_LABEL

    ref.train()
    keep = torch.arange(1, len(PROMPT)) >= FIRST_LABEL
    logits = ref(torch.tensor([PROMPT])).logits[0]
    F.cross_entropy(logits[:-1][keep], torch.tensor(PROMPT[1:])[keep], reduction="sum").backward()
    return {n.split("base_model.model.", 1)[1]: p.grad for n, p in ref.named_parameters() if "lora_" in n}


def _check_expert_grads(lora, want: dict, what: str, tol: float = 1e-4) -> None:
    """kt-core's expert adapter gradients on the same loss, in peft's names and layout, equal ``want``
    (to ``tol`` of the largest)."""
    from kt_core.train.sft import Example, loss_of
    from tests.unit.test_train_lora import FIRST_LABEL

    loss, _ = loss_of(lora.model, Example(PROMPT, FIRST_LABEL))
    loss.backward()
    got = {}
    for (prefix, param), ad in lora.experts.items():
        depth = ".base_layer" if param == "gate_up_proj" else ""
        E, r = ad.a.shape[:2]
        got[f"{prefix}{depth}.lora_A.default.weight"] = ad.a.grad.reshape(E * r, -1)
        got[f"{prefix}{depth}.lora_B.default.weight"] = ad.b.grad.permute(1, 2, 0).reshape(ad.b.shape[1], -1)
    experts = {k: v for k, v in want.items() if ".experts." in k}
    assert experts and set(experts) == set(got)
    for k, g in experts.items():
        err = float((got[k] - g).abs().max() / g.abs().max().clamp_min(1e-12))
        assert err <= tol, f"{what} {k}: {err:.2e}"
