"""Every random choice comes from a generator derived from the run's seed and a stream name,
so that streams are independent of each other and of how many draws other parts make.
A resumed run re-derives the same generators, which is what makes resume exact."""

from __future__ import annotations

import contextlib
import zlib
from typing import Iterator

import numpy as np
import torch


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for (seed, *keys); strings are hashed stably (crc32)."""
    words = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def torch_generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


@contextlib.contextmanager
def seeded_init(seed: int, *keys: int | str) -> Iterator[None]:
    """Module construction uses torch's global RNG; fork it so that initialisation is seeded
    without leaking into (or depending on) the caller's global state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *keys))
        yield
