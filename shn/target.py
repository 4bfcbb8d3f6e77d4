"""Target models as templates: a parameter spec derived from ``named_parameters()`` and
functional execution with given (per-client, batched) weights.

The template module is never trained in place; its weights only serve as an initialisation
for methods that start from a common model (FedAvg, Local, personal layers).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

Params = dict[str, Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a target model's tensors, in ``named_parameters()`` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_module(cls, module: nn.Module) -> "ParamSpec":
        items = [(n, tuple(p.shape)) for n, p in module.named_parameters()]
        if not items:
            raise ValueError(f"{type(module).__name__} has no parameters to generate")
        names, shapes = zip(*items)
        return cls(tuple(names), tuple(shapes))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def total(self) -> int:
        return sum(self.numels)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.shapes[self.names.index(name)]

    def subset(self, names: Iterable[str]) -> "ParamSpec":
        keep = set(names)
        unknown = keep - set(self.names)
        if unknown:
            raise KeyError(f"unknown parameter names {sorted(unknown)}; the model has {list(self.names)}")
        pairs = [(n, s) for n, s in zip(self.names, self.shapes) if n in keep]
        return ParamSpec(tuple(n for n, _ in pairs), tuple(s for _, s in pairs))

    def flatten(self, params: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
        """``{name: [*B, *shape]}`` → ``[*B, total]`` (concatenated in spec order)."""
        return torch.cat([params[n].flatten(start_dim=batch_dims) for n in self.names], dim=-1)

    def unflatten(self, flat: Tensor) -> Params:
        """``[*B, total]`` → ``{name: [*B, *shape]}``."""
        batch = flat.shape[:-1]
        chunks = flat.split(list(self.numels), dim=-1)
        return {n: c.reshape(*batch, *s) for n, c, s in zip(self.names, chunks, self.shapes)}


# A block of a wider tensor, per dimension: an int n (its first n entries) or a LongTensor of
# positions (e.g. the first units of each of a GRU's three stacked gates).
BlockIndex = tuple["int | Tensor", ...]


def take_block(t: Tensor, index: BlockIndex, batch_dims: int = 0) -> Tensor:
    """The block ``index`` of ``t [*B, *full]`` (a narrower architecture's tensor inside the
    widest one's: by default its first channels / units along every dimension, HeteroFL's nesting)."""
    full = t.shape[batch_dims:]
    if not fits(index, full):
        raise ValueError(f"block {block_shape(index)} does not fit inside {tuple(full)}")
    for d, ix in enumerate(index):
        if isinstance(ix, int):
            if ix != full[d]:
                t = t.narrow(batch_dims + d, 0, ix)
        else:
            t = t.index_select(batch_dims + d, ix.to(t.device))
    return t


def put_block(t: Tensor, index: BlockIndex, full: Sequence[int], batch_dims: int = 0) -> Tensor:
    """``t [*B, *block]`` placed at ``index`` in zeros ``[*B, *full]``: the adjoint of
    :func:`take_block`, so a narrow client's delta is the widest tensors' exact gradient input."""
    for d in reversed(range(len(index))):
        ix, dim = index[d], batch_dims + d
        if t.shape[dim] == full[d] and isinstance(ix, int):
            continue
        shape = list(t.shape)
        shape[dim] = int(full[d])
        out = t.new_zeros(shape)
        if isinstance(ix, int):
            out.narrow(dim, 0, ix).copy_(t)
        else:
            out.index_copy_(dim, ix.to(t.device), t)
        t = out
    return t


def leading_index(shape: Sequence[int]) -> BlockIndex:
    """The block of the first ``shape`` entries."""
    return tuple(int(s) for s in shape)


def block_shape(index: BlockIndex) -> tuple[int, ...]:
    """The shape of the block ``index`` names."""
    return tuple(ix if isinstance(ix, int) else int(ix.numel()) for ix in index)


def block_index(narrow: nn.Module, wide: nn.Module) -> dict[str, BlockIndex]:
    """Where each tensor of ``narrow`` sits in ``wide``'s: the model's own ``block_index(wide)``
    when it has one (a GRU's gates are stacked in one tensor), else leading blocks."""
    own = getattr(narrow, "block_index", None)
    if callable(own):
        return dict(own(wide))
    return {n: leading_index(p.shape) for n, p in narrow.named_parameters()}


def fits(index: BlockIndex, full: Sequence[int]) -> bool:
    """Whether ``index`` names a block of a tensor of shape ``full``."""
    return len(index) == len(full) and all(
        (ix <= f) if isinstance(ix, int) else (ix.numel() == 0 or int(ix.max()) < f) for ix, f in zip(index, full))


def nests_in(inner: ParamSpec, outer: ParamSpec) -> bool:
    """Whether every tensor of ``inner`` is a leading block of ``outer``'s (same names and ranks)."""
    o = dict(zip(outer.names, outer.shapes))
    return all(n in o and len(s) == len(o[n]) and all(a <= b for a, b in zip(s, o[n]))
               for n, s in zip(inner.names, inner.shapes))


def module_params(module: nn.Module) -> Params:
    """A detached copy of a module's parameters, keyed by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def stack_params(per_client: list[Mapping[str, Tensor]]) -> Params:
    """List of C parameter dicts → ``{name: [C, *shape]}``."""
    return {n: torch.stack([p[n] for p in per_client]) for n in per_client[0]}


def select(params: Mapping[str, Tensor], index: int | slice | Tensor) -> Params:
    return {n: t[index] for n, t in params.items()}


def as_template(module: nn.Module) -> nn.Module:
    """A weightless copy of the module's structure (meta device): functional calls supply
    every parameter, so nothing is stored twice."""
    return copy.deepcopy(module).to("meta")


def functional_forward(template: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Run ``template`` with ``params`` (one client: ``{name: [*shape]}``) on ``x``."""
    return functional_call(template, dict(params), (x,))


def batched_forward(template: nn.Module) -> Callable[[Params, Tensor], Tensor]:
    """``f(params {name: [C, *shape]}, x [C, B, ...]) -> [C, B, ...]``: one vmapped call for C
    clients sharing an architecture."""
    return vmap(lambda p, x: functional_call(template, p, (x,)))


def check_params(spec: ParamSpec, params: Mapping[str, Tensor], batch_dims: int = 0) -> None:
    """Raise ValueError naming the first key/shape mismatch."""
    missing = [n for n in spec.names if n not in params]
    extra = [n for n in params if n not in spec.names]
    if missing or extra:
        raise ValueError(f"parameter keys mismatch: missing {missing}, unexpected {extra}")
    for n, s in zip(spec.names, spec.shapes):
        got = tuple(params[n].shape[batch_dims:])
        if got != s:
            raise ValueError(f"parameter {n!r} has shape {got}, the model expects {s}")
