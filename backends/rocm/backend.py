"""AMD GPUs: the CUDA plugin on a HIP build of torch (``torch.version.hip``).
The torch device string stays ``cuda``; RCCL answers to the ``nccl`` backend name."""
from kt_backends.cuda.backend import CudaBackend


class RocmBackend(CudaBackend):
    name = "rocm"
    visible_devices_env = "HIP_VISIBLE_DEVICES"
    hip = True
    vendor = "AMD"
    smi = "rocm-smi"


Backend = RocmBackend
