"""Plugin classes the registry tests load through real entry points.

They exercise discovery and selection only: ``Narrow`` computes on the CPU with
the real torch ops (it is the cpu device with a smaller capability set); the
others never compute anything."""
from kt_core.backend.contract import ProbeResult
from kt_core.backend.torch_backend import TorchBackend
from kt_core.weights.quant import Quant


class Narrow(TorchBackend):
    name = "narrow"
    device_type = "cpu"
    quants = (Quant.NONE, Quant.INT8)

    @classmethod
    def probe(cls):
        return ProbeResult(True, "cpu with int8 only", 1)

    @classmethod
    def score(cls):
        return 5

    def devices(self):
        from kt_backends.cpu import CpuBackend

        return CpuBackend.devices(self)

    def memory_info(self, index=0):
        from kt_backends.cpu import CpuBackend

        return CpuBackend.memory_info(self, index)


class BetterNarrow(Narrow):
    @classmethod
    def score(cls):
        return 9


class Absent(TorchBackend):
    name = "absent"
    device_type = "cpu"

    @classmethod
    def probe(cls):
        return ProbeResult(False, "no such hardware here")


class ProbeRaises(TorchBackend):
    name = "raises"

    @classmethod
    def probe(cls):
        raise RuntimeError("driver exploded")


NOT_A_BACKEND = object()


# torch-free probe modules (the kt_core.probes group): an entry point may name any object with probe()
class QuickHere:
    @staticmethod
    def probe():
        return ProbeResult(True, "quick: two here", 2)

    @staticmethod
    def score():
        return 3

    @staticmethod
    def inventory():
        from kt_core.backend.types import DeviceInfo, MemoryInfo

        return [(DeviceInfo(i, f"q{i}", 8 << 30), MemoryInfo(4 << 30, 8 << 30)) for i in range(2)]


class QuickAbsent:
    @staticmethod
    def probe():
        return ProbeResult(False, "quick: not here")


class QuickDefers:
    @staticmethod
    def probe():
        return None  # only the plugin can tell


class QuickRaises:
    @staticmethod
    def probe():
        raise RuntimeError("quick probe exploded")
