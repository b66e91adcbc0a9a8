"""OpenMP's idle wait, shortened in processes that run kt-core's native kernels between torch's ops.

torch's CPU ops run on OpenMP threads (libgomp in Linux wheels). After each parallel op its workers
spin, waiting for the next, for ``GOMP_SPINCOUNT`` iterations (300,000 when ``OMP_WAIT_POLICY`` is
unset) before they sleep. kt-core's native kernels run on their own pool right after torch's ops (the
experts after the router, attention's native passes after the projections), and on a machine with as
many cores as threads the spinning workers take cores from that pool. With 10,000 a bf16 LoRA step of
the benchmark model (bench/train_lora.py's, Zen 5 EPYC, 2 threads, 5 alternating runs) took 516 ms
where the default took 536 (0.96x; 3,000 and 30,000 within 1% of 10,000), and an 8-layer model's
prefill ran 1.04-1.12x faster (bench/vs_llamacpp.py's kt-core process, 3 alternating pairs); decode
moved within its noise.

libgomp reads the variable when it loads (with torch), so this only works before ``import torch``:
``kt`` sets it first thing; programs that use ``kt_core.Engine`` can set ``GOMP_SPINCOUNT`` themselves.
A value already in the environment (or ``OMP_WAIT_POLICY``) is left as it is. Other OpenMP runtimes
(Intel's ``KMP_BLOCKTIME``, MSVC's) are not touched: untested.
"""
from __future__ import annotations

import os
import sys

SPINCOUNT = "10000"


def shorten_idle_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` for this process (and its children) when torch has not loaded yet and the
    user set neither it nor ``OMP_WAIT_POLICY``; whether it was set."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    return True
