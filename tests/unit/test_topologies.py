"""Every shipped topology (conf/topology/*.yaml) runs one forward step on the devices this machine
has and gives the cpu_only topology's logits. A topology whose devices are absent here skips with
the device probe's reason (e.g. "cuda: torch ... is a CPU-only build"), so a CPU-only run says
what it did not test."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kt_core
from kt_core.backend.registry import registry
from kt_core.config import compose
from kt_core.config.compose import group_options
from kt_core.config.validate import resolve_topology
from kt_core.models.synthetic import synthesize

TOPOLOGIES = group_options("topology")
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=512)
PROMPT = list(range(300, 317))
# float32 with unquantized weights: topologies differ only in where each sum runs and in which order
# partial expert sums are added (hybrid), so the logits agree to float32 rounding
COMMON = ["model.dtype=float32", "model.max_seq_len=64", "device.cpu.threads=2"]
RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def no_machine_local_config(tmp_path_factory):
    """Compose from the shipped files only: a developer's machine/local.yaml must not change the test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KT_CONFIG_DIR", str(tmp_path_factory.mktemp("no_user_config") / "absent"))
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory, no_machine_local_config):
    path = tmp_path_factory.mktemp("topologies") / "m"
    # the deepseek tokenizer is a file copy (qwen's is rebuilt from its ranks, seconds); no test here
    # tokenizes, only the checkpoint folder needs one
    synthesize(path, preset="tiny-qwen3-moe", layers=2, shape=SHAPE, sample_tokens=16, tokenizer="deepseek")
    return path


_RUNS: dict = {}


def run(model, topology, *extra):
    """Load the model under ``topology`` (once per module) and run one prefill step: its logits."""
    key = (str(model), topology, *extra)
    if key not in _RUNS:
        engine = kt_core.Engine.from_pretrained(model, overrides=[f"topology={topology}", *COMMON, *extra])
        _RUNS[key] = engine, engine.logits(PROMPT)
    return _RUNS[key]


@pytest.fixture(scope="module")
def reference(model):
    yield run(model, "cpu_only")[1]
    _RUNS.clear()


def accelerator_overrides(topology: str) -> list[str]:
    """The overrides that put ``topology`` on this machine's accelerators, or skip with the reason
    the device probe gives for its absence."""
    cfg = compose([f"topology={topology}"])
    wanted = [name for name, d in cfg.device.items() if d.backend != "cpu"]
    if not wanted:
        return []  # CPU-only topology: runs everywhere
    reg = registry()
    default = cfg.device[wanted[0]].backend
    present = [n for n in reg.available() if n != "cpu"]
    if not present:
        pytest.skip(f"{default}: {reg.status(default).reason}")
    backend = default if default in present else present[0]  # another vendor's accelerator will do
    need = max(int(cfg.topology.min_accelerators), 1)
    st = reg.status(backend)
    visible = st.probe.device_count if st.probe else 0
    if visible < need:
        pytest.skip(f"{backend}: topology {topology} needs {need} devices, {visible} visible ({st.reason})")
    return [] if backend == default else [f"device={backend}"]


def test_every_shipped_topology_is_covered():
    assert {"cpu_only", "hybrid_cpu", "single_gpu", "hybrid_1gpu", "hybrid_multi_gpu"} <= set(TOPOLOGIES)
    repo_conf = Path(__file__).resolve().parents[2] / "conf" / "topology"
    if repo_conf.is_dir():  # a source checkout: the installed config folder is this one
        assert sorted(p.stem for p in repo_conf.glob("*.yaml")) == TOPOLOGIES


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_topology_forward_matches_cpu_only(model, reference, topology):
    extra = accelerator_overrides(topology)
    engine, logits = run(model, topology, *extra)
    used = resolve_topology(engine.cfg, check_devices=False).used
    assert engine.cfg.topology.name == topology and used
    assert logits.shape == reference.shape and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    err = float((logits - reference).abs().max() / reference.abs().max())
    assert err <= RTOL, (f"topology {topology} on {', '.join(s.label for s in used)}: logits differ from "
                         f"cpu_only by {err:.3g} (relative max), more than {RTOL:g}")
