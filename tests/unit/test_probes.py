"""Probe and selection logic of the plugins whose hardware is absent here, driven by
patching exactly what each probe queries (torch build info, device counts, packages)."""
import types

import pytest
import torch

from kt_backends.ascend import probe as ascend_mod
from kt_backends.ascend import AscendBackend
from kt_backends.cpu import CpuBackend
from kt_backends.cuda import CudaBackend
from kt_backends.rocm import RocmBackend
from kt_backends.xpu import XpuBackend


@pytest.fixture
def build(monkeypatch):
    def set_build(cuda=None, hip=None, count=0):
        monkeypatch.setattr(torch.version, "cuda", cuda, raising=False)
        monkeypatch.setattr(torch.version, "hip", hip, raising=False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return set_build


def test_cuda_probe(build, monkeypatch):
    build(cuda=None)
    p = CudaBackend.probe()
    assert not p.available and "CPU-only build" in p.reason and "install a CUDA build" in p.reason
    build(cuda="12.8", count=0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    p = CudaBackend.probe()
    assert not p.available and "no NVIDIA GPU visible (CUDA_VISIBLE_DEVICES=)" in p.reason
    build(cuda="12.8", count=2)
    p = CudaBackend.probe()
    assert p.available and p.device_count == 2 and "CUDA 12.8" in p.reason
    build(hip="6.2", count=1)
    assert "use device=rocm" in CudaBackend.probe().reason


def test_rocm_reuses_cuda_plugin(build, monkeypatch):
    assert issubclass(RocmBackend, CudaBackend) and RocmBackend.device_type == "cuda"
    assert RocmBackend.visible_devices_env == "HIP_VISIBLE_DEVICES" and RocmBackend.dist_backend == "nccl"
    build(cuda="12.8", count=1)
    assert "not a ROCm build" in RocmBackend.probe().reason
    build(hip="6.2", count=0)
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "7")
    p = RocmBackend.probe()
    assert not p.available and "no AMD GPU visible (HIP_VISIBLE_DEVICES=7)" in p.reason and "rocm-smi" in p.reason
    build(hip="6.2", count=4)
    p = RocmBackend.probe()
    assert p.available and p.device_count == 4 and "HIP 6.2" in p.reason


def test_xpu_probe(monkeypatch):
    fake = types.SimpleNamespace(_is_compiled=lambda: False, device_count=lambda: 0)
    monkeypatch.setattr(torch, "xpu", fake)
    assert "built without XPU support" in XpuBackend.probe().reason
    fake._is_compiled = lambda: True
    p = XpuBackend.probe()
    assert not p.available and "no Intel GPU visible" in p.reason and "ZE_AFFINITY_MASK" in p.reason
    fake.device_count = lambda: 1
    p = XpuBackend.probe()
    assert p.available and p.device_count == 1
    assert XpuBackend.dist_backend == "xccl" and XpuBackend.device_type == "xpu"


def test_ascend_never_imports_a_mismatched_torch_npu(monkeypatch):
    imported = []
    monkeypatch.setattr(ascend_mod, "import_torch_npu", lambda: imported.append("torch_npu"))
    monkeypatch.setattr(ascend_mod, "torch_npu_installed", lambda: False)
    p = AscendBackend.probe()
    assert not p.available and "torch_npu is not installed" in p.reason
    monkeypatch.setattr(ascend_mod, "torch_npu_installed", lambda: True)
    monkeypatch.setattr(ascend_mod, "torch_npu_version", lambda: "2.1.0.post3")
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    p = AscendBackend.probe()
    assert not p.available and "does not match torch 2.13.0" in p.reason and "torch-npu==2.13.*" in p.reason
    assert imported == [], "a mismatched torch_npu must not be imported"
    monkeypatch.setattr(ascend_mod, "torch_npu_version", lambda: "2.13.0")
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(device_count=lambda: 8), raising=False)
    p = AscendBackend.probe()
    assert imported == ["torch_npu"] and p.available and p.device_count == 8
    assert AscendBackend.device_type == "npu" and AscendBackend.dist_backend == "hccl"


def test_cpu_probe_and_score_follow_isa(monkeypatch):
    from kt_core.backend import cpuinfo

    p = CpuBackend.probe()
    assert p.available and "ISA" in p.reason
    for flags, variant in ((("avx2", "fma"), "avx2"),
                           (("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"), "avx512_bf16"),
                           (("avx512f", "avx512bw", "amx_tile", "amx_int8", "amx_bf16"), "amx")):
        info = cpuinfo.CpuInfo("x", "x86_64", 2, 2, frozenset(flags), "test")
        monkeypatch.setattr("kt_backends.cpu.probe.cpu_info", lambda info=info: info)
        assert info.variant == variant
        assert CpuBackend.score() == cpuinfo.VARIANT_SCORE[variant]
