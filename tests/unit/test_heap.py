"""kt_core.runtime.heap: glibc's malloc set to keep freed memory where it can be, nothing elsewhere."""
import platform
import sys

from kt_core.runtime import heap


def test_keep_freed_memory_sets_glibc_and_only_glibc():
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert heap.keep_freed_memory() is glibc  # mallopt refused a value: False on glibc
    assert heap.keep_freed_memory() is glibc  # once a process, the same answer after
