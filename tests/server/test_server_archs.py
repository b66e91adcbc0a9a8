"""The newest architectures served: a synthetic GLM-4.5 / MiniMax-M2 / Llama 4 / Qwen3-Next / DeepSeek-V4 checkpoint
(real tokenizer and chat template) behind the live server with int8 experts split over two devices, answering as the
engine does and reusing its prefix cache."""
import pytest

import kt_core
from kt_core.models.synthetic import synthesize
from tests.server.live import CONTEXT, Live
from tests.unit.test_synthetic import SMALL

openai = pytest.importorskip("openai")
OV = ["quant=int8", "topology=hybrid_cpu", "device.cpu.threads=2", "topology.expert_policy.fraction=0.5"]


# two in the default run (Qwen3-Next: a recurrent state resumed from the prefix cache; DeepSeek-V4: hc residual
# streams and its own cache), the rest in the marked set .ci/run also runs (~4.5 s each)
DEFAULT = ("qwen3_next", "deepseek_v4")


@pytest.mark.parametrize("arch", [a if a in DEFAULT else pytest.param(a, marks=pytest.mark.slow)
                                  for a in ("glm4_moe", "minimax_m2", "llama4", "qwen3_next", "qwen3_5_moe",
                                            "deepseek_v32", "glm_moe_dsa", "deepseek_v4")])
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
        # Qwen3-Next too: the second request resumes from the recurrent state kept at a block boundary
        assert srv.metrics()['kt_prefix_cache_hits_total{tier="device"}'] >= 1, "the second request reuses the first"
        chat = srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=4, temperature=0)
        assert chat.usage.completion_tokens >= 1 and chat.choices[0].message.role == "assistant"
    finally:
        srv.stop()


def test_linear_attention_state_under_concurrent_clients(tmp_path):
    """Qwen3-Next served to concurrent clients: each sequence's recurrent state stays its own while
    requests of different lengths join and leave the running batch."""
    import concurrent.futures

    path = synthesize(tmp_path / "qn", arch="qwen3_next", layers=2, shape=SMALL["qwen3_next"], sample_tokens=48).path
    prompts = [f"Request {i}: " + "lorem ipsum dolor sit amet " * (1 + 3 * i) for i in range(6)]
    engine = kt_core.Engine.from_pretrained(path, overrides=["model.dtype=float32", f"model.max_seq_len={CONTEXT}"])
    want = [engine.generate(p, max_new_tokens=6 + i, ignore_eos=True).text for i, p in enumerate(prompts)]
    srv = Live(path, tmp_path / "prefix", "server.max_batch=3")
    try:
        def ask(i):
            return srv.client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6 + i, temperature=0,
                                                 extra_body={"ignore_eos": True}).choices[0].text
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(ask, range(6)))
        assert got == want
        assert srv.state.engine.cache.states.of == {}, "every finished request returned its state slot"
    finally:
        srv.stop()
