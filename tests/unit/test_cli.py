import json
import subprocess
import sys

import pytest

from kt_core.cli import main


def run(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_lists_verbs(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "devices" in out and "config" in out and "doctor" in out


def test_devices_table_and_json(capsys):
    rc, out, _ = run(capsys, "devices")
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert " available " in lines["cpu"] and "ISA" in lines["cpu"]
    assert "CPU ISA: AVX2" in out and "AMX" in out
    rc, out, _ = run(capsys, "devices", "--json")
    data = json.loads(out)
    by = {p["backend"]: p for p in data["plugins"]}
    assert set(by) >= {"cpu", "cuda", "rocm", "xpu", "ascend"}
    assert by["cpu"]["available"] and by["cpu"]["devices"][0]["total_bytes"] > 0
    for name in ("cuda", "rocm", "xpu", "ascend"):
        if not by[name]["available"]:
            assert by[name]["reason"] and not by[name]["devices"]


def test_config_prints_yaml_and_roles(capsys):
    import yaml

    rc, out, _ = run(capsys, "config", "quant=int4", "quant.group_size=64")
    assert rc == 0
    data = yaml.safe_load(out)
    assert data["quant"]["experts"] == "int4" and data["quant"]["group_size"] == 64
    assert "#   experts: cpu:0" in out


def test_config_mistakes_are_one_line_exit_2(capsys):
    rc, out, err = run(capsys, "config", "device.cpu.memroy_gb=3")
    assert rc == 2 and out == ""
    assert err.strip().count("\n") == 0 and "did you mean 'device.cpu.memory_gb'" in err
    rc, _, err = run(capsys, "config", "topology=hybrid_1gpu", "device=cpu")
    assert rc == 2 and "selects none" in err
    rc, _, err = run(capsys, "config", "--bogus")
    assert rc == 2 and "unknown flag" in err
    rc, _, err = run(capsys, "frobnicate")
    assert rc == 2 and "unknown verb" in err


def test_config_checks_model_path_and_generate_values(capsys, tmp_path):
    missing = tmp_path / "nonexistent"
    rc, out, err = run(capsys, "config", f"model.path={missing}")
    assert rc == 2 and out == "" and err.count("\n") == 1 and str(missing) in err and "model folder not found" in err
    rc, out, err = run(capsys, "config", "generate.temperature=-1", "--no-device-check")
    assert rc == 2 and out == "" and "generate.temperature" in err and "must be >= 0" in err


def test_config_without_device_check_describes_absent_machine(capsys):
    rc, out, _ = run(capsys, "config", "topology=hybrid_1gpu", "device.cuda.memory_gb=24", "--no-device-check")
    assert rc == 0 and "memory_gb: 24.0" in out and "#   attention: cuda:0" in out


def test_doctor(capsys):
    rc, out, _ = run(capsys, "doctor")
    assert rc in (0, 1)
    for key in ("torch", "cpu", "compiler", "plugin cpu", "plugin cuda", "hydra", "what to do"):
        assert key in out


def test_console_script_has_no_traceback_on_user_error():
    proc = subprocess.run([sys.executable, "-m", "kt_core", "config", "topology=nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no topology option 'nope'" in proc.stderr


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    import os

    env = dict(os.environ, KT_CACHE_DIR=str(tmp_path_factory.mktemp("ktcache")))
    return env


def kt(env, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "kt_core", *args], capture_output=True, text=True, timeout=600,
                          env=env, input=stdin)


def test_kt_run_builds_the_embedded_default_once_and_generates(cache_env):
    first = kt(cache_env, "run", "generate.max_new_tokens=8")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("The three most useful things")
    notice = first.stderr.splitlines()[0]  # said before anything else, the build included
    assert notice.startswith("kt run: the default model is a synthetic Qwen3-MoE-shaped checkpoint with random "
                             "weights; its text is gibberish") and "kt run model.path=" in notice
    assert "building the embedded default model" in first.stderr
    # without a terminal, long work still says when it starts and how long it took (stderr, not stdout)
    assert "synthesizing tiny-qwen3-moe" in first.stderr and "loading Qwen3MoeForCausalLM" in first.stderr
    assert first.stderr.count(" done in ") == 2 and "done in" not in first.stdout
    assert "8 new tokens" in first.stderr and "decode" in first.stderr and "tok/s" in first.stderr
    again = kt(cache_env, "run", "prompt=Hello there", "generate.max_new_tokens=4", "generate.temperature=0.7",
               "generate.seed=1")
    assert again.returncode == 0 and "building" not in again.stderr and again.stdout.startswith("Hello there")
    assert again.stderr.startswith("kt run: the default model is a synthetic")
    assert "loading Qwen3MoeForCausalLM (4 layers): 4/4 done in" in again.stderr


def test_kt_sft_without_a_model_trains_the_embedded_default_and_kt_run_uses_it(cache_env, tmp_path):
    """kt sft's smoke test needs no model.path, as kt run's: the embedded synthetic model trains (said
    first), and kt run lora.path=OUT, again without model.path, loads the adapter on it."""
    import json

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi there"}) + "\n")
    out = tmp_path / "run"
    proc = kt(cache_env, "sft", f"train.data={data}", f"train.output={out}", "train.max_steps=2", "train.lora.r=2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("kt sft: the default model is a synthetic Qwen3-MoE-shaped checkpoint")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    run = kt(cache_env, "run", f"lora.path={out}", "generate.max_new_tokens=3", "prompt=Hello")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Hello") and "3 new tokens" in run.stderr
    missing = kt(cache_env, "sft", f"train.output={out}")
    assert missing.returncode == 2 and "needs train.data=FILE.jsonl train.output=OUT" in missing.stderr


def test_kt_run_profile_prints_every_part_per_phase(cache_env):
    proc = kt(cache_env, "run", "--profile", "generate.max_new_tokens=5", "prompt=Hello there")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello there") and "ms/step" not in proc.stdout  # the table goes to stderr
    table = proc.stderr[proc.stderr.index("profile (1 prefill, 4 decode steps"):].splitlines()[1:]
    assert table[0].split()[:4] == ["phase", "part", "ms/step", "share"]
    rows = {(cells[0], cells[1]): cells[2:] for cells in (line.split() for line in table[1:])}
    for phase in ("prefill", "decode"):
        for part in ("layers", "attn_proj", "attention", "norm_rope", "router", "moe", "lm_head", "other", "step"):
            assert (phase, part) in rows, (phase, part)
    step = float(rows[("decode", "step")][0])
    parts = sum(float(rows[("decode", p)][0]) for p in ("layers", "attn_proj", "attention", "norm_rope", "router",
                                                         "moe", "dense_mlp", "lm_head", "other"))
    assert step > 0 and abs(parts - step) <= 0.01 * step + 0.01  # the parts add up to the step
    assert float(rows[("decode", "lm_head")][1]) > 0  # MB a decode token reads for the head


def test_kt_chat_streams_replies_from_stdin(cache_env):
    proc = kt(cache_env, "chat", "generate.max_new_tokens=4", stdin="hello\n/reset\nsecond question\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("4 new tokens") + proc.stderr.count("finish: stop") >= 2
    assert "(conversation cleared)" in proc.stderr


def test_kt_run_user_errors(cache_env, tmp_path):
    # each is refused before anything loads: no weights read, no prompt echoed, one line
    for args, message in [([f"model.path={tmp_path / 'nope'}"], "model folder not found"),
                          (["generate.top_p=2"], "top_p must be in (0, 1]"),
                          (["generate.temperature=-1"], "bad value for 'generate.temperature'"),
                          (["topology=hybrid_1gpu", "device=cpu"], "selects none")]:
        bad = kt(cache_env, "run", *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert bad.stdout == "" and "loading" not in bad.stderr and "synthesizing" not in bad.stderr, bad.stderr


@pytest.mark.slow  # builds a checkpoint with the real Qwen tokenizer: ~18 s on 2 cores
def test_kt_synth_prints_experts_reached(cache_env, tmp_path):
    out = tmp_path / "syn"
    proc = kt(cache_env, "synth", "arch=qwen3_moe", "preset=tiny-qwen3-moe", "layers=2", f"out={out}")
    assert proc.returncode == 0, proc.stderr
    assert "layer   0:" in proc.stdout and "/32 experts reached" in proc.stdout
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    started, finished = proc.stderr.splitlines()[-2:]  # not a terminal: a line at start and one at the end
    assert started == "synthesizing tiny-qwen3-moe (tokenizer, embeddings, 2 layers, head) ..."
    assert finished.startswith("synthesizing tiny-qwen3-moe (tokenizer, embeddings, 2 layers, head): 5/5 done in ")
    bad = kt(cache_env, "synth", "arch=qwen3_moe", "foo=1")
    assert bad.returncode == 2 and "kt synth takes" in bad.stderr


def test_kt_bench_measures_and_saves_overrides_for_the_planner(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KT_CONFIG_DIR", str(tmp_path))
    assert main(["bench", "--save"]) == 0
    out = capsys.readouterr().out
    assert "GB/s" in out and "device.cpu.bandwidth_gbps=" in out
    saved = (tmp_path / "machine" / "local.yaml").read_text()
    assert saved.startswith("# @package _global_") and "bandwidth_gbps" in saved
    assert main(["bench", "--save"]) == 0 and "never overwritten" in capsys.readouterr().out
    assert main(["plan", "model=mixtral_8x7b", "device.cpu.memory_gb=128"]) == 0
    assert "(bandwidth assumed" not in capsys.readouterr().out  # the measured value was used


def test_doctor_explains_a_native_variant_below_the_cpu_flags():
    from kt_core.commands.doctor import variant_gap

    assert variant_gap("amx", "amx") is None
    assert variant_gap("avx2", "avx2") is None
    assert variant_gap("avx512", "avx2") is None  # AVX-512 without VNNI: AVX2 is the native best
    assert variant_gap("generic", None) is None  # native kernels off: reported elsewhere
    amx = variant_gap("amx", "avx512")
    assert "AMX" in amx and "tile state" in amx and "5.16" in amx
    zmm = variant_gap("avx512_vnni", "avx2")
    assert "AVX512" in zmm and "XCR0" in zmm
