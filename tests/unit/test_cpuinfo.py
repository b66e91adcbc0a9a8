from kt_core.backend.cpuinfo import CpuInfo, cpu_info, parse_proc_cpuinfo

SPR = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t: 0
flags\t\t: fpu avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t: 0
flags\t\t: fpu avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 2
physical id\t: 0
core id\t: 1
flags\t\t: fpu
"""


def test_parse_proc_cpuinfo_counts_physical_cores_and_reads_flags():
    model, flags, cores = parse_proc_cpuinfo(SPR)
    assert model.startswith("Intel(R) Xeon") and cores == 2
    info = CpuInfo(model, "x86_64", 3, cores, flags, "test")
    assert info.variant == "amx"
    assert "AMX-INT8" in info.isa_summary() and "AVX-512 BF16" in info.isa_summary()


def test_old_cpu_is_generic():
    info = CpuInfo("old", "x86_64", 1, 1, frozenset({"sse4_2", "avx"}), "test")
    assert info.variant == "generic" and info.isa_summary() == "none of AVX2/AVX-512/AMX"


def test_this_machine():
    info = cpu_info()
    assert info.logical_cores >= 1 and info.physical_cores >= 1 and info.source
