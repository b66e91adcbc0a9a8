"""The newest architectures served: a synthetic GLM-4.5 / MiniMax-M2 / Llama 4 checkpoint (real tokenizer and
chat template) behind the live server with int8 experts split over two devices, answering as the
engine does and reusing its prefix cache."""
import pytest

import kt_core
from kt_core.models.synthetic import synthesize
from tests.server.live import CONTEXT, Live
from tests.unit.test_synthetic import SMALL

openai = pytest.importorskip("openai")
OV = ["quant=int8", "topology=hybrid_cpu", "device.cpu.threads=2", "topology.expert_policy.fraction=0.5"]


@pytest.mark.parametrize("arch", ["glm4_moe", "minimax_m2", "llama4"])
def test_served_greedy_completion_matches_the_engine(arch, tmp_path):
    path = synthesize(tmp_path / arch, arch=arch, layers=2, shape=SMALL[arch], sample_tokens=48).path
    srv = Live(path, tmp_path / "prefix", *OV)
    try:
        prompt = "The quick brown fox jumps over the lazy dog. " * 3
        answers = [srv.client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                                 extra_body={"ignore_eos": True}) for _ in range(2)]
        engine = kt_core.Engine.from_pretrained(path, overrides=["model.dtype=float32",
                                                                 f"model.max_seq_len={CONTEXT}", *OV])
        ref = engine.generate(prompt, max_new_tokens=8, ignore_eos=True)
        assert [a.choices[0].text for a in answers] == [ref.text, ref.text]
        assert srv.metrics()['kt_prefix_cache_hits_total{tier="device"}'] >= 1, "the second request reuses the first"
        chat = srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=4, temperature=0)
        assert chat.usage.completion_tokens >= 1 and chat.choices[0].message.role == "assistant"
    finally:
        srv.stop()
