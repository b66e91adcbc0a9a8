"""SamplingParams.validate: every value that passes is one the sampler can take; every refusal names
its field (the server turns it into a 400 with that ``param``)."""
import math

import pytest
import torch

from kt_core.backend.torch_ops.sampling import sample
from kt_core.runtime.sampling import TEMPERATURE_FLOOR, SamplingError, SamplingParams, apply_repetition_penalty

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", -1), ("max_new_tokens", 2.5), ("max_new_tokens", True),
    ("temperature", -0.1), ("temperature", NAN), ("temperature", INF), ("temperature", "hot"),
    ("top_k", -1), ("top_k", 2**31), ("top_k", 2**63), ("top_k", 1.5),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", NAN), ("top_p", -INF),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", NAN),
    ("repetition_penalty", 1.3e-87), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", 1e3), ("repetition_penalty", INF), ("repetition_penalty", NAN),
    ("seed", 2**64), ("seed", 2**70), ("seed", -(2**63) - 1), ("seed", 1.5), ("seed", "7"),
])
def test_out_of_range_values_are_refused_naming_the_field(field, value):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**{field: value}).validate()
    assert info.value.param == field and field in str(info.value)


@pytest.mark.parametrize("kw", [
    {}, {"temperature": 2.0}, {"temperature": 1e-45}, {"temperature": 1e-5}, {"top_k": 2**31 - 1},
    {"top_p": 1e-9}, {"min_p": 1.0}, {"repetition_penalty": 0.01}, {"repetition_penalty": 100.0},
    {"seed": 0}, {"seed": 2**64 - 1}, {"seed": -(2**63)}, {"max_new_tokens": 0},
])
def test_edge_values_pass_and_the_sampler_takes_them(kw):
    p = SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 4), **kw).validate()
    g = torch.Generator().manual_seed(p.seed if p.seed is not None else 0)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)) * 30
    logits = apply_repetition_penalty(logits, [list(range(0, 50, 3))], [p.repetition_penalty])
    assert torch.isfinite(logits).all()
    if not p.greedy:
        one = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt)  # noqa: E731
        tok = int(sample(logits, one(p.temperature), one(p.top_k if p.top_k < 50 else 0, torch.long),
                         one(p.top_p), one(p.min_p), generator=g)[0])
        assert 0 <= tok < 50


def test_temperatures_below_the_floor_are_greedy():
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(temperature=1e-45).greedy
    assert SamplingParams(temperature=TEMPERATURE_FLOOR / 2).greedy
    assert not SamplingParams(temperature=TEMPERATURE_FLOOR).greedy
    # what the floor protects against: logits / a denormal temperature overflow to inf, softmax to NaN
    x = torch.tensor([[30.0, 29.0, -5.0]])
    assert torch.isnan(torch.softmax(x / torch.tensor([1e-45]), -1)).any()
    assert math.isclose(float(torch.softmax(x / TEMPERATURE_FLOOR, -1)[0, 0]), 1.0)


def test_validate_normalises_stop_and_numbers():
    p = SamplingParams(stop="\n", temperature=1, top_p=1).validate()
    assert p.stop == ("\n",) and isinstance(p.temperature, float) and isinstance(p.top_p, float)
