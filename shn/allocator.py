"""glibc's malloc told to keep the memory a training step frees (the default; ``SHN_ALLOCATOR=system``
or ``shn --allocator system`` leaves glibc's defaults).

Why: torch's CPU tensors come from ``malloc``. With glibc's defaults, a block over the dynamic mmap
threshold is an ``mmap`` of its own, and freed memory at the top of the heap is given back to the
system as soon as more than twice that threshold is free. A local training step allocates and frees
activations of several MiB (pFedHN's CIFAR CNN: 16 MiB per cohort chunk), so the next step's
tensors are fresh pages again, and every page costs a fault and a zero-fill. Measured on the 2-core
machine, a round of that CNN took 15–60× fewer page faults and its grouped training ran 1.2–1.4×
faster with the settings below (``tests/benchmarks/cnn_speedup.py``, README "Performance"). The numbers computed are
the same; the cost is memory: a process keeps up to :data:`TRIM_THRESHOLD` of freed heap instead of
returning it, and its peak resident size does not change.

The settings are glibc's own (``mallopt(3)``): ``M_TRIM_THRESHOLD`` = 1 GiB, ``M_MMAP_THRESHOLD`` =
256 MiB. glibc's dynamic threshold stops at 32 MiB, so without them every larger block (a float32
chunk of 10 CIFAR clients' activations is 32.1 MB) is mapped and faulted in afresh at every step. They are also exported as
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` so that processes the command starts (suite
and sweep workers, Flower's processes) read them at their start. Settings a user exported before the
command are left as they are. Elsewhere than glibc (macOS, musl) nothing is changed.

Every :class:`shn.federated.local.LocalTrainer` applies the setting when it is built
(:func:`apply_default`), so experiments get it from the command line, the Python API, suite and
sweep workers and Flower clients alike.
"""

from __future__ import annotations

import ctypes
import os
import platform

TRIM_THRESHOLD = 1 << 30
MMAP_THRESHOLD = 256 << 20
ENV = {"MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
ALLOCATORS = ("keep", "system")


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def apply_default() -> bool:
    """:func:`keep_freed_memory` unless the environment says ``SHN_ALLOCATOR=system``; True when
    freed memory is kept. Cheap to call again."""
    choice = os.environ.get("SHN_ALLOCATOR", "keep")
    if choice not in ALLOCATORS:
        raise ValueError(f"SHN_ALLOCATOR: {choice!r} is not allowed; allowed values: 'keep', 'system'")
    return choice == "keep" and keep_freed_memory()


def keep_freed_memory() -> bool:
    """Apply the settings above to this process and export them to its children; True when they
    are in effect (this call or the user's environment), False where malloc is not glibc's."""
    if not is_glibc():
        return False
    if any(name in os.environ for name in ENV):
        return True  # the user's own settings: glibc read them when this process started
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):  # pragma: no cover - glibc always has it
        return False
    if not (libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)):
        return False  # pragma: no cover - values within glibc's documented limits
    for name, value in ENV.items():
        os.environ[name] = str(value)
    return True


__all__ = ["ALLOCATORS", "ENV", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "apply_default", "is_glibc", "keep_freed_memory"]
