"""A LoRA step's adapter gradients on the tiny llama checkpoint with fine-tuning's attention paths
(kt_core/train/native_attention.py) and without them (``KT_NATIVE_ATTENTION_GRAD=0``: torch's), for the
tests of each path (test_native_attention_grad.py, test_chunked_attention_f32.py)."""
import torch


def adapter_grads_with_and_without(path: str, dtype: torch.dtype, monkeypatch) -> tuple[list, list]:
    """(ours, torch's): q_proj / v_proj adapters' gradients of one SFT loss on the checkpoint at ``path``."""
    from kt_core.models.model import CausalLM
    from kt_core.models.spec import parse_config
    from kt_core.train.lora_model import AutogradBackend, LoraModel
    from kt_core.train.sft import Example, loss_of
    from kt_core.weights.checkpoint import Checkpoint

    ck = Checkpoint(path)
    model = CausalLM.load(ck, parse_config(ck.config), AutogradBackend(), dtype)
    lora = LoraModel(model, ["q_proj", "v_proj"], r=4, alpha=8)
    for p in lora.parameters():  # B is zero at the start: give the gradients of A something to carry
        torch.nn.init.normal_(p, std=0.05)
    example = Example([(i * 37) % 90 + 3 for i in range(40)], 10)

    def grads():
        for p in lora.parameters():
            p.grad = None
        loss, n = loss_of(model, example)
        loss.backward()
        return [p.grad.clone() for p in lora.parameters()]

    ours = grads()
    monkeypatch.setenv("KT_NATIVE_ATTENTION_GRAD", "0")
    return ours, grads()
