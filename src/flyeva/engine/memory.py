"""CPU allocator tuning for training loops (`train.cpu_malloc_tuning`, docs/performance.md)."""

from __future__ import annotations


def keep_freed_memory() -> bool:
    """Let glibc keep freed tensors for reuse instead of returning them to the kernel (CPU training).

    By default glibc maps every block over its mmap threshold afresh and trims the heap top on free,
    so each step page-faults its activations in again (docs/performance.md). Here every block comes
    from the heap, which is never trimmed: the process keeps its peak memory. False where not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt takes a C int: a larger Python int wraps silently (2**34 became 0, i.e. trim on every free).
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_max = -1, -4
    # man mallopt: a trim threshold of -1 disables trimming; an mmap maximum of 0 disables per-block mmap.
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))
