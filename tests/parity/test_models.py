"""Parity with Hugging Face transformers on tiny random checkpoints of every architecture.

fp32: prefill logits within 1e-4 of transformers' (max error relative to the logits'
max magnitude) and greedy 32-token continuations identical.

bf16: the median over positions of our bf16 logits' error against transformers' fp32
logits is within BF16_BOUND. Measured (median / max over positions, ours vs transformers'
own bf16): llama 0.008/0.013 vs 0.007/0.010, qwen3_moe 0.010/0.075 vs 0.009/0.076,
deepseek_v3 0.010/0.39 vs 0.020/0.46. The max is not bounded: where two experts' router
scores nearly tie, bf16 rounding flips the choice in either implementation and that
position's logits jump; the median is what measures the arithmetic.

transformers' own bf16 error differs between CPUs (its bf16 products take other oneDNN paths):
qwen3_next's tiny checkpoint measured 0.029 median on a Zen 4 EPYC (ours 0.028), above BF16_BOUND. So
the bound is BF16_BOUND or 1.25x transformers' own bf16 median on the same CPU, whichever is larger:
still a failure where our arithmetic is worse than bf16 itself is.

In a recurrent model a flipped choice also moves every later position, so the median is no shield:
qwen3_next's seed-0 checkpoint has two of layer 1's router scores 1e-3 apart at position 2 (0.292 vs
0.291), and attention outputs 0.2% apart (bf16 rounding of the same float32 result, or SDPA's bf16
kernel against it) gave medians of either ~0.025 or ~0.088 (six random perturbations: two flipped).
Its bf16 check builds seed 1 (eight perturbations: 0.017-0.022; seeds 2 and 3 alike), BF16_SEEDS."""
import pytest
import torch

import kt_core
from tests.parity.tiny import CONFIGS, build, hf_model

FP32_BOUND = 1e-4
BF16_BOUND = 2.5e-2
BF16_SEEDS = {"qwen3_next": 1}  # checkpoints without a router near-tie on PROMPT (see above)
PROMPT = [5, 17, 33, 2, 90, 41, 41, 7, 12, 64, 3, 88, 19, 27, 50, 61, 1, 9, 30, 77]


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_and_greedy_tokens(name, tiny_checkpoint):
    path = tiny_checkpoint(name)
    engine = kt_core.Engine.from_pretrained(path, overrides=["model.dtype=float32"])
    hf = hf_model(path)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    err = rel(engine.logits(PROMPT), ref)
    assert err <= FP32_BOUND, f"{name}: fp32 logits differ from transformers by {err:.2e}"
    ours = engine.generate(PROMPT, max_new_tokens=32, ignore_eos=True).token_ids
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == theirs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_logits_within_bound(name, tiny_checkpoint, tmp_path):
    path = build(name, tmp_path, seed=BF16_SEEDS[name]) if name in BF16_SEEDS else tiny_checkpoint(name)
    engine = kt_core.Engine.from_pretrained(path, overrides=["model.dtype=bfloat16"])
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([PROMPT])).logits[0].float()
        theirs = hf_model(path, dtype=torch.bfloat16)(torch.tensor([PROMPT])).logits[0].float()

    def median_error(logits):
        return float(((logits - ref).abs().amax(-1) / ref.abs().max()).median())

    err, bound = median_error(engine.logits(PROMPT)), max(BF16_BOUND, 1.25 * median_error(theirs))
    assert err <= bound, f"{name}: bf16 median position error {err:.3f} > {bound:.3f}"


@pytest.mark.parametrize("name", ["qwen2_moe", "glm4_moe", "minimax_m2", "llama4", "qwen3_next", "deepseek_v4"])
def test_batch_of_different_lengths_matches_one_by_one(name, tiny_checkpoint):
    engine = kt_core.Engine.from_pretrained(tiny_checkpoint(name), overrides=["model.dtype=float32"])
    prompts = [PROMPT, PROMPT[:3], PROMPT[5:16]]
    together = engine.generate(prompts, max_new_tokens=12, ignore_eos=True)
    for p, r in zip(prompts, together):
        assert r.token_ids == engine.generate(p, max_new_tokens=12, ignore_eos=True).token_ids
        assert r.prompt_tokens == len(p) and r.finish_reason == "length"
    assert engine.cache.used_blocks == 0, "finished sequences must free their KV blocks"
