import copy
import itertools
from importlib.metadata import EntryPoint

import pytest
from omegaconf import OmegaConf

from kt_core.backend.registry import GROUP, Registry, registry
from kt_core.config import compose
from kt_core.config.compose import group_options
from kt_core.config.validate import check_generate, check_values, resolve_topology
from kt_core.errors import ConfigError

TOPOLOGIES = group_options("topology")
DEVICES = group_options("device")
ACCEL_TOPOLOGIES = {"single_gpu", "hybrid_1gpu", "hybrid_multi_gpu"}


def test_groups_ship_the_expected_options():
    assert {"cpu_only", "single_gpu", "hybrid_1gpu", "hybrid_multi_gpu"} <= set(TOPOLOGIES)
    assert {"cpu", "cuda", "rocm", "xpu", "ascend"} == set(DEVICES)
    for group in ("model", "quant", "server"):
        assert group_options(group)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_topology_x_device_composes_or_fails_in_one_line(topology, device):
    cfg = compose([f"topology={topology}", f"device={device}"])
    assert cfg.topology.name == topology and "cpu" in cfg.device
    if device == "cpu" and topology in ACCEL_TOPOLOGIES:
        with pytest.raises(ConfigError, match="selects none") as err:
            resolve_topology(cfg, check_devices=False)
        assert "\n" not in str(err.value)
        return
    planned = resolve_topology(cfg, check_devices=False)  # plan for the described machine
    assert planned.roles["experts"]
    if topology in ACCEL_TOPOLOGIES:
        assert planned.roles["attention"][0].backend == device
    st = registry().status(device)
    used_absent = [s for s in planned.used if not registry().status(s.backend).available]
    if used_absent:
        with pytest.raises(ConfigError) as err:
            resolve_topology(cfg, check_devices=True)
        msg = str(err.value)
        assert "\n" not in msg and st.reason in msg and "topology=cpu_only" in msg
    else:
        resolve_topology(cfg, check_devices=True)


def test_hybrid_topology_layout():
    cfg = compose(["topology=hybrid_1gpu", "device.cuda.memory_gb=24"])
    t = resolve_topology(cfg, check_devices=False)
    assert [s.label for s in t.roles["attention"]] == ["cuda:0"]
    assert [s.label for s in t.roles["experts"]] == ["cuda:0", "cpu:0"]
    assert cfg.device.cuda.memory_gb == 24.0
    multi = resolve_topology(compose(["topology=hybrid_multi_gpu", "device=rocm"]), check_devices=False)
    assert [s.label for s in multi.roles["dense"]] == ["rocm:0", "rocm:1"]
    with pytest.raises(ConfigError, match="device.rocm.count=2"):
        resolve_topology(compose(["topology=hybrid_multi_gpu", "device=rocm", "device.rocm.count=1"]),
                         check_devices=False)


@pytest.mark.parametrize("override,message", [
    ("device.cpu.memroy_gb=3", "unknown config key 'device.cpu.memroy_gb': did you mean 'device.cpu.memory_gb'?"),
    ("topologyy=hybrid_1gpu", "unknown config key 'topologyy': did you mean 'topology'?"),
    ("topology.expert_policy.stratgy=auto", "did you mean 'topology.expert_policy.strategy'?"),
    ("topology=hybrid_2gpu", "no topology option 'hybrid_2gpu'; did you mean topology=hybrid_1gpu?"),
    ("quant.experts=int5", "bad value for 'quant.experts': Invalid value 'int5'"),
    ("device.cpu.memory_gb=lots", "bad value for 'device.cpu.memory_gb'"),
    ("server.port=eighty", "bad value for 'server.port'"),
    ("device.cuda.memory_gb=24", "device 'cuda' is not selected"),
    ("a=b=c", "cannot parse override 'a=b=c'"),
])
def test_mistakes_fail_at_compose_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["device.cpu.memory_gb=100000"], "is more than the"),
    (["device.cpu.memory_gb=2", "device.cpu.reserve_gb=4"], "leaves nothing after reserve_gb"),
    (["topology.expert_policy.strategy=frequency"], "needs topology.expert_policy.stats_file"),
    (["topology.attention=[gpu]"], "topology.attention names device 'gpu', which is not configured"),
    (["topology.dense=[cpu:3]"], "needs 4 cpu device(s)"),
    (["topology.experts=[]"], "topology.experts is empty"),
    (["topology.deferred_experts=-1"], "must be >= 0"),
])
def test_topology_validation(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_topology(compose(overrides), check_devices=True)
    assert message in str(err.value)


def test_unsupported_quant_on_a_device_fails_before_loading(tmp_path, monkeypatch):
    # a vendor's device option can live in the user config folder beside machine/
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "narrow.yaml").write_text("narrow:\n  backend: narrow\n")
    monkeypatch.setenv("KT_CONFIG_DIR", str(tmp_path))
    reg = Registry([EntryPoint("cpu", "kt_backends.cpu:Backend", GROUP),
                    EntryPoint("narrow", "tests.unit.plugins_for_tests:Narrow", GROUP)])
    cfg = compose(["device=narrow", "topology.experts=[narrow,cpu]", "quant=int4"])
    with pytest.raises(ConfigError, match="device 'narrow' cannot run moe_experts with int4 weights"):
        resolve_topology(cfg, reg=reg)
    resolve_topology(compose(["device=narrow", "topology.experts=[narrow,cpu]", "quant=int8"]), reg=reg)
    several = compose(["device=[cuda,narrow]"])
    assert set(several.device) == {"cpu", "cuda", "narrow"}


def test_machine_local_file_from_user_config_dir(tmp_path, monkeypatch):
    (tmp_path / "machine").mkdir()
    (tmp_path / "machine" / "local.yaml").write_text(
        "# @package _global_\ndevice:\n  cpu:\n    threads: 7\nserver:\n  port: 9999\n")
    monkeypatch.setenv("KT_CONFIG_DIR", str(tmp_path))
    cfg = compose([])
    assert cfg.device.cpu.threads == 7 and cfg.server.port == 9999
    assert compose(["server.port=1234"]).server.port == 1234  # command line still wins
    monkeypatch.setenv("KT_CONFIG_DIR", str(tmp_path / "nowhere"))
    assert compose([]).server.port == 8000


def test_no_secret_or_machine_path_in_shipped_configs():
    from kt_core.config import config_dir

    for path in config_dir().rglob("*.yaml"):
        text = path.read_text()
        assert "/home/" not in text and "/root/" not in text and "C:\\Users" not in text, path  # no machine paths
        assert "api_key:" not in text and "secret" not in text.lower(), path


# ---- every group crossed: device x topology x model x quant x server ---------------------------
GROUPS = ("device", "topology", "model", "quant", "server")
OPTIONS = {group: group_options(group) for group in GROUPS}
CROSS = [dict(zip(GROUPS, combo)) for combo in itertools.product(*(OPTIONS[g] for g in GROUPS))]


@pytest.fixture(scope="module")
def composed_halves(tmp_path_factory):
    """Hydra composes device x topology (they interact: a topology selects its device) and
    model x quant x server (plain subtrees) once each; a full combination is the one with the
    other's model / quant / server. test_stitched_combinations_equal_hydra_composition checks that
    this is what Hydra composes; Hydra composing all of them would take minutes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KT_CONFIG_DIR", str(tmp_path_factory.mktemp("no-machine-file")))
        dt = {(d, t): compose([f"device={d}", f"topology={t}"]) for d in OPTIONS["device"] for t in OPTIONS["topology"]}
        mqs = {(m, q, s): compose([f"model={m}", f"quant={q}", f"server={s}"])
               for m in OPTIONS["model"] for q in OPTIONS["quant"] for s in OPTIONS["server"]}
    return dt, mqs


def stitched(halves, combo):
    dt, mqs = halves
    cfg = copy.deepcopy(dt[combo["device"], combo["topology"]])
    other = mqs[combo["model"], combo["quant"], combo["server"]]
    for group in ("model", "quant", "server"):
        cfg[group] = copy.deepcopy(other[group])
    return cfg


def test_model_quant_server_options_are_plain_subtrees():
    # what makes stitching exact: no defaults list, no package directive that could reach other groups
    from kt_core.config import config_dir

    for group in ("model", "quant", "server"):
        for path in (config_dir() / group).glob("*.yaml"):
            text = path.read_text()
            assert "@package" not in text and not any(line.startswith("defaults:") for line in text.splitlines()), path


@pytest.mark.slow  # the composed halves take ~10 s to build: these checks run in .ci/run's slow set
def test_stitched_combinations_equal_hydra_composition(composed_halves, monkeypatch, tmp_path):
    monkeypatch.setenv("KT_CONFIG_DIR", str(tmp_path))
    import random

    picks = random.Random(7).sample(CROSS, 6)
    picks.append({"device": "rocm", "topology": "hybrid_multi_gpu", "model": "deepseek_v3", "quant": "int4",
                  "server": "default"})
    for combo in picks:
        real = compose([f"{g}={o}" for g, o in combo.items()])
        assert OmegaConf.to_container(real) == OmegaConf.to_container(stitched(composed_halves, combo)), combo


@pytest.mark.slow  # with the ~10 s fixture, ~4.5 s a device
@pytest.mark.parametrize("device", OPTIONS["device"])
def test_every_group_combination_composes_and_validates(composed_halves, device):
    """All of conf/ crossed, described as kt plan / kt config --no-device-check do: each
    combination validates, or fails in one line with a fix where it means nothing here."""
    failures = []
    for combo in (c for c in CROSS if c["device"] == device):
        cfg = stitched(composed_halves, combo)
        assert cfg.model.name == combo["model"] and cfg.quant.name == combo["quant"]
        assert cfg.topology.name == combo["topology"] and "cpu" in cfg.device
        check_generate(cfg)
        try:
            topo = resolve_topology(cfg, check_devices=False)
        except ConfigError as exc:
            msg = str(exc)
            assert "\n" not in msg and "fix:" in msg, (combo, msg)
            failures.append((combo["topology"], msg))
            continue
        assert topo.roles["attention"] and topo.roles["dense"] and topo.roles["experts"]
        if combo["topology"] in ACCEL_TOPOLOGIES:
            assert topo.roles["attention"][0].backend == device
    for topology, msg in failures:
        if device == "cpu":  # device=cpu selects no accelerator for a topology that needs one
            assert topology in ACCEL_TOPOLOGIES and "selects none" in msg
        else:  # only a machine with fewer of this kind than the topology needs (e.g. one GPU, two wanted)
            st = registry().status(device)
            assert st.available and "needs at least" in msg, msg


def test_builtin_plugins_run_every_op_dtype_and_format():
    # resolve_topology(check_devices=False) skips importing these (and torch) on that promise
    from kt_core.backend.contract import Op
    from kt_core.config.schema import DType, WeightFormat
    from kt_core.config.validate import BUILTIN_PLUGINS, torch_dtype

    declared = registry().declared()
    for name, value in BUILTIN_PLUGINS.items():
        assert value in declared[name]
        cls = registry().status(name).cls
        if cls is None:  # a plugin that cannot import here is asked nothing at all
            continue
        asks = {Op.ATTENTION_PREFILL: ["none"], Op.LINEAR: [f.value for f in WeightFormat],
                Op.MOE_EXPERTS: [f.value for f in WeightFormat]}  # what _check_formats asks
        for op, formats in asks.items():
            for dtype in DType:
                for fmt in formats:
                    assert cls.supports(op, torch_dtype(dtype.value), fmt), (name, op, dtype, fmt)


# ---- values checked before anything loads ------------------------------------------------------
def test_model_path_is_checked_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as err:
        resolve_topology(compose([f"model.path={missing}"]), check_devices=False)
    assert str(missing) in str(err.value) and "model folder not found" in str(err.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_values(compose([f"model.path={tmp_path / 'file'}"]))
    with pytest.raises(ConfigError, match="has no config.json"):
        check_values(compose([f"model.path={tmp_path}"]))
    (tmp_path / "config.json").write_text("{}")
    check_values(compose([f"model.path={tmp_path}"]))


@pytest.mark.parametrize("override,message", [
    ("model.max_seq_len=0", "model.max_seq_len=0 must be at least 1"),
    ("plan.batch=0", "plan.batch=0 must be at least 1"),
    ("plan.kv_tokens=-5", "plan.kv_tokens=-5 must be at least 1"),
    ("quant.group_size=-1", "quant.group_size=-1 must be >= 0"),
    ("server.port=70000", "server.port=70000 must be in 0..65535"),
])
def test_sizes_are_checked(override, message):
    with pytest.raises(ConfigError) as err:
        check_values(compose([override]))
    assert message in str(err.value)
    check_values(compose(["quant=int4", "quant.group_size=0"]))  # one scale (and zero point) per row
    check_values(compose(["quant=fp8", "quant.group_size=0"]))


@pytest.mark.parametrize("override,message", [
    ("generate.temperature=-1", "bad value for 'generate.temperature': temperature must be >= 0"),
    ("generate.top_p=2", "bad value for 'generate.top_p': top_p must be in (0, 1]"),
    ("generate.top_k=-3", "bad value for 'generate.top_k'"),
    ("generate.repetition_penalty=0", "bad value for 'generate.repetition_penalty'"),
    ("generate.max_new_tokens=-1", "bad value for 'generate.max_new_tokens'"),
])
def test_generate_values_are_checked_as_sampling_checks_them(override, message):
    with pytest.raises(ConfigError) as err:
        check_generate(compose([override]))
    assert message in str(err.value) and "\n" not in str(err.value)
    check_generate(compose(["generate.temperature=0.7", "generate.top_p=0.9", "generate.seed=3"]))


def test_generate_defaults_pass_the_sampler():
    # check_generate skips importing the sampler (torch) for the shipped defaults on this promise
    from dataclasses import asdict

    from kt_core.config.schema import GenerateConfig
    from kt_core.runtime.sampling import SamplingParams

    d = asdict(GenerateConfig())
    SamplingParams(**{k: (tuple(v) if k == "stop" else v) for k, v in d.items() if k != "chat"}).validate()
