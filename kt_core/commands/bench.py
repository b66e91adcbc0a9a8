"""kt bench: measure this machine's devices (memory bandwidth, matmul throughput) for kt plan."""
from __future__ import annotations

import time

HELP = "measure memory bandwidth and matmul TFLOPS of the available devices (feeds kt plan's estimate)"
USAGE = """kt bench [--save]

Measures every available device: streaming-read bandwidth (the native multi-threaded loop on the
CPU, a device-to-device copy on accelerators) and bf16 matmul throughput, then prints the
overrides kt plan uses (device.<name>.bandwidth_gbps / tflops).
--save writes them to machine/local.yaml in the user config folder when that file does not exist."""
FLAGS = ("--save",)


def _matmul_tflops(device, dtype, n: int = 2048, iters: int = 5) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()
    t = time.perf_counter()
    for _ in range(iters):
        c = a @ b
    c.sum().item()  # waits for the device
    return 2 * n ** 3 * iters / (time.perf_counter() - t) / 1e12


def _copy_gbps(device, megabytes: int = 1024, iters: int = 5) -> float:
    import torch

    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.get_device_module(device.type).synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.get_device_module(device.type).synchronize()
    return 2 * src.numel() * iters / (time.perf_counter() - t) / 1e9  # read + write


def measure() -> dict[str, tuple[float, float]]:
    import torch

    from kt_backends.cpu import native
    from kt_core.backend.registry import registry

    out = {}
    for name in registry().available():
        be = registry().get(name)
        dev = be.torch_device(0)
        if name == "cpu":
            bw = native.memory_bandwidth_gbps(megabytes=512, iters=5) if native.available() else \
                _copy_gbps(dev, 512) / 2
            out[name] = (bw, _matmul_tflops(dev, torch.float32, 1024, 3))
        else:
            out[name] = (_copy_gbps(dev), _matmul_tflops(dev, torch.bfloat16, 8192, 10))
    return out


def run(overrides, flags) -> int:
    from kt_core.config.compose import user_config_dir
    from kt_core.errors import KtError

    if overrides:
        raise KtError(f"kt bench takes no overrides (got {' '.join(overrides)})")
    results = measure()
    lines = []
    for name, (bw, tf) in results.items():
        print(f"{name:<8} memory {bw:8.1f} GB/s   matmul {tf:8.2f} TFLOPS")
        lines.append(f"device.{name}.bandwidth_gbps={bw:.1f} device.{name}.tflops={tf:.2f}")
    print("\nkt plan overrides:\n  " + " ".join(lines))
    if "--save" in flags:
        path = user_config_dir() / "machine" / "local.yaml"
        if path.exists():
            print(f"\n{path} exists: add these values to it yourself (it is never overwritten)")
            return 0
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"  {n}:\n    bandwidth_gbps: {bw:.1f}\n    tflops: {tf:.2f}\n"
                       for n, (bw, tf) in results.items())
        path.write_text("# @package _global_\n# measured by kt bench\ndevice:\n" + body, encoding="utf-8")
        print(f"\nwrote {path}")
    return 0
