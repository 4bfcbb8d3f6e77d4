"""Compressed uploads (``[compression]``): the wire format of what a client sends back, for
every method.

A client's delta ``{name: [*shape]}`` becomes a *payload*, a dict of tensors that the Flower
engine sends as its ArrayRecord and the in-process engine passes by hand; the server decodes it
back to a dense float32 delta before validation and the method's update, so FedAvg-family and
hypernetwork methods (whose server step is a VJP with the deltas) run unchanged.

* ``"none"``: the delta itself.
* ``"topk"``: per tensor, the ``k = ceil(topk_fraction · size)`` entries of largest magnitude:
  ``<name>:idx`` (int32 flat indices, ascending) and ``<name>:val`` (their values).
* ``"qsgd8"``: per tensor, ``s = max|x| / 127`` and ``q = floor(x / s + u)``, ``u ~ U[0, 1)``
  per entry, sent as ``<name>:q8`` (int8, the tensor's shape) and ``<name>:scale`` (``s``,
  float32). Decoded ``q · s``: unbiased, since ``E[floor(y + u)] = y``. The noise comes from
  ``torch_generator(seed, "upload-compression", round, client)`` (on the CPU, so a run's
  numbers do not depend on the device or on which engine or cohort trains the client).

Error feedback (``error_feedback = true``): the client adds its residual — what compression
dropped from its earlier uploads — to the delta before encoding, and keeps the new residual
``corrected − decoded``; summed over rounds, what the server received plus the residual equals
what the client computed. The residual is the client's own state, never sent: the in-process
engine keeps it per client (and in checkpoints), the Flower engine in the node's
``context.state``. It takes one model's worth of memory per client that has trained.

Sizes: :mod:`shn.federated.traffic` counts a payload as Flower serialises it.
"""

from __future__ import annotations

import math
from typing import Any, MutableMapping, Sequence

import torch
from torch import Tensor

from shn.config_compression import CompressionConfig
from shn.federated.validation import UnreadableUpdate
from shn.seeding import torch_generator
from shn.target import Params, ParamSpec

__all__ = ["ClientUpload", "UploadCodec", "topk_count"]

LEVELS = 127  # int8 codes in [-127, 127]: symmetric, so the scale alone fixes the grid
SUFFIXES = {"none": ("",), "topk": (":idx", ":val"), "qsgd8": (":q8", ":scale")}


def topk_count(numel: int, fraction: float) -> int:
    """Entries a top-k upload keeps of a tensor of ``numel``: ceil(fraction · numel), at least 1."""
    return min(numel, max(1, math.ceil(round(fraction * numel, 9))))  # (round: 0.1·30 is 3.0000000000000004)


class UploadCodec:
    """Encodes a cohort's deltas into one payload per client and decodes a payload back.

    Args:
        config: the ``[compression]`` table.
        spec: the tensors the server sends and receives deltas for (``algorithm.server_spec``).
    """

    def __init__(self, config: CompressionConfig, spec: ParamSpec) -> None:
        self.config = config
        self.kind = config.kind
        self.spec = spec
        self.k = {n: topk_count(numel, config.topk_fraction) for n, numel in zip(spec.names, spec.numels)}
        self.keys = frozenset(n + s for n in spec.names for s in SUFFIXES[self.kind])

    def encode(self, deltas: Params, generators: Sequence[torch.Generator] | None = None) -> tuple[list[Params], Params]:
        """``deltas {name: [C, *shape]}`` → (C payloads, the decoded deltas ``{name: [C, *shape]}``,
        exactly what the server will reconstruct). ``generators``: one per client ("qsgd8")."""
        count = int(next(iter(deltas.values())).shape[0]) if deltas else 0
        payloads: list[Params] = [{} for _ in range(count)]
        decoded: Params = {}
        noise = self._noise(generators, count) if self.kind == "qsgd8" else {}
        for name in self.spec.names:
            d = deltas[name]
            flat = d.reshape(count, -1)
            if self.kind == "topk":
                idx = flat.abs().topk(self.k[name], dim=1).indices.sort(dim=1).values
                val = flat.gather(1, idx)
                decoded[name] = torch.zeros_like(flat).scatter_(1, idx, val).reshape(d.shape)
                parts = {f"{name}:idx": idx.to(torch.int32), f"{name}:val": val}
            elif self.kind == "qsgd8":
                scale = flat.abs().amax(dim=1) / LEVELS  # [C]
                safe = torch.where(scale > 0, scale, torch.ones_like(scale))
                q = torch.floor(flat / safe[:, None] + noise[name].to(flat.device)).clamp_(-LEVELS, LEVELS)
                decoded[name] = (q * scale[:, None]).reshape(d.shape)
                parts = {f"{name}:q8": q.to(torch.int8).reshape(d.shape), f"{name}:scale": scale}
            else:
                decoded[name] = d
                parts = {name: d}
            for i, p in enumerate(payloads):
                p.update({k: v[i] for k, v in parts.items()})
        return payloads, decoded

    def _noise(self, generators: Sequence[torch.Generator] | None, count: int) -> Params:
        """``{name: [C, size]}`` uniform rounding noise, one generator per client."""
        if generators is None or len(generators) != count:
            raise ValueError(f"qsgd8 needs one generator per client: got {0 if generators is None else len(generators)} "
                             f"for {count} clients")
        flat = torch.stack([torch.rand(self.spec.total, generator=g) for g in generators]) if count else \
            torch.zeros(0, self.spec.total)
        return dict(zip(self.spec.names, flat.split(list(self.spec.numels), dim=1)))

    def decode(self, payload: Any) -> Any:
        """A client's payload as a dense delta ``{name: [*shape]}``, or an
        :class:`UnreadableUpdate` naming what is wrong (the server rejects it). With "none" the
        payload is returned as it is: ``Server.receive`` validates it."""
        if self.kind == "none":
            return payload
        try:
            return self._decode(payload)
        except Exception as e:  # noqa: BLE001 - whatever a client sent must not take the server down
            return UnreadableUpdate(f"malformed {self.kind} upload: {str(e)[:300]}")

    def _decode(self, payload: Any) -> Params:
        if not hasattr(payload, "keys"):
            raise ValueError(f"a {type(payload).__name__}, expected a mapping of tensors")
        missing = sorted(self.keys - set(payload.keys()))
        extra = sorted(set(payload.keys()) - self.keys)
        if missing or extra:
            raise ValueError(f"missing {missing[:4]}, unexpected {extra[:4]}")
        out: Params = {}
        for name, shape, numel in zip(self.spec.names, self.spec.shapes, self.spec.numels):
            if self.kind == "topk":
                idx, val = _tensor(payload, f"{name}:idx", torch.int32), _tensor(payload, f"{name}:val", torch.float32)
                k = self.k[name]
                if tuple(idx.shape) != (k,) or tuple(val.shape) != (k,):
                    raise ValueError(f"{name}: {tuple(idx.shape)} indices and {tuple(val.shape)} values, expected ({k},)")
                idx = idx.long()
                if k and (int(idx[0]) < 0 or int(idx[-1]) >= numel or not bool((idx[1:] > idx[:-1]).all())):
                    raise ValueError(f"{name}: indices must be ascending, distinct and in [0, {numel})")
                out[name] = torch.zeros(numel, dtype=val.dtype, device=val.device).index_put_((idx,), val).reshape(shape)
            else:
                q, scale = _tensor(payload, f"{name}:q8", torch.int8), _tensor(payload, f"{name}:scale", torch.float32)
                if tuple(q.shape) != tuple(shape) or scale.dim() != 0:
                    raise ValueError(f"{name}: codes of shape {tuple(q.shape)} and a scale of shape {tuple(scale.shape)}, "
                                     f"expected {tuple(shape)} and ()")
                if q.numel() and int(q.min()) < -LEVELS:
                    raise ValueError(f"{name}: codes below -{LEVELS}")
                if not (math.isfinite(float(scale)) and float(scale) >= 0):
                    raise ValueError(f"{name}: scale {float(scale)!r} is not a finite number ≥ 0")
                out[name] = q.to(torch.float32) * scale
        return out


def _tensor(payload: Any, key: str, dtype: torch.dtype) -> Tensor:
    t = payload[key]
    if not isinstance(t, Tensor) or t.layout != torch.strided or t.dtype != dtype:
        raise ValueError(f"{key}: expected a dense {dtype} tensor, got "
                         f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    return t


class ClientUpload:
    """A client's side of ``[compression]``: error feedback, then the codec.

    ``residuals``: where each client keeps its residual between rounds (``{client: {name:
    tensor}}``; a dict in-process, the node's ``context.state`` on Flower); None: no error
    feedback.
    """

    def __init__(self, codec: UploadCodec, residuals: MutableMapping[int, Params] | None) -> None:
        self.codec = codec
        self.residuals = residuals

    @classmethod
    def from_config(cls, config: CompressionConfig, spec: ParamSpec) -> "ClientUpload | None":
        """None for ``kind = "none"`` (deltas are sent as they are)."""
        if config.kind == "none":
            return None
        return cls(UploadCodec(config, spec), {} if config.error_feedback else None)

    def with_residuals(self, residuals: MutableMapping[int, Params] | None) -> "ClientUpload":
        """The same codec over another residual store (a Flower node's); keeps "no feedback"."""
        return ClientUpload(self.codec, residuals if self.residuals is not None else None)

    def for_spec(self, spec: ParamSpec) -> "ClientUpload":
        """The same compression and residual store for deltas of ``spec``'s shapes (a narrower
        client's block: :mod:`shn.federated.blocks`)."""
        if spec == self.codec.spec:
            return self
        return ClientUpload(UploadCodec(self.codec.config, spec), self.residuals)

    def encode(self, clients: Sequence[int], deltas: Params, seed: int, round_: int) -> list[Params]:
        """``clients``' payloads for ``deltas {name: [C, *shape]}`` in round ``round_``."""
        clients = [int(c) for c in clients]
        if self.residuals is not None and clients:
            kept = [self.residuals.get(c) for c in clients]
            deltas = {k: d + torch.stack([_residual(r, k, d[i]) for i, r in enumerate(kept)]) for k, d in deltas.items()}
        gens = [torch_generator(seed, "upload-compression", round_, c) for c in clients] \
            if self.codec.kind == "qsgd8" else None
        payloads, decoded = self.codec.encode(deltas, gens)
        if self.residuals is not None:
            for i, c in enumerate(clients):
                left = {k: deltas[k][i] - decoded[k][i] for k in self.codec.spec.names}
                # a diverged client's non-finite upload is rejected; its residual must not poison every later one
                self.residuals[c] = {k: torch.where(torch.isfinite(v), v, torch.zeros_like(v)).detach().clone()
                                     for k, v in left.items()}
        return payloads

    def state_dict(self) -> dict[int, Params]:
        return {} if self.residuals is None else {int(c): dict(r) for c, r in self.residuals.items()}

    def load_state_dict(self, state: dict) -> None:
        if self.residuals is not None:
            self.residuals.clear()
            self.residuals.update({int(c): dict(r) for c, r in state.items()})


def _residual(stored: Params | None, name: str, like: Tensor) -> Tensor:
    """A client's residual for tensor ``name`` (zeros before its first upload)."""
    if stored is None:
        return torch.zeros_like(like)
    return stored[name].to(device=like.device, dtype=like.dtype)
