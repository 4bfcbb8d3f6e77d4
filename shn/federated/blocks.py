"""Width-nested clients on the wire: each client receives, and sends back, only the block of the
server's tensors its architecture uses (``task.widths``; README: Heterogeneous clients).

The server's tensors follow the widest architecture; a narrower client's are their leading
blocks (:func:`shn.target.take_block`; a model may place them elsewhere, e.g. per GRU gate).
:class:`ClientBlocks` is the server's side of that exchange on both engines: the block a client
is sent, the bytes that costs, and a client's upload decoded with the codec of its block's shapes (``[compression]``: top-k counts and quantisation
noise follow the block) and checked to have exactly those shapes before it is zero-padded to the
server's — the exact gradient input of the slicing. An upload in any other shape is an
:class:`~shn.federated.validation.UnreadableUpdate`, which the server rejects.

When every client has the server's shapes this is the plain codec, unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import Tensor

from shn.config_compression import CompressionConfig
from shn.federated.compression import UploadCodec
from shn.federated.traffic import npy_bytes, payload_bytes
from shn.federated.validation import UnreadableUpdate
from shn.target import BlockIndex, Params, ParamSpec, block_shape, put_block, take_block

__all__ = ["ClientBlocks"]


class ClientBlocks:
    """Args:
        spec: the tensors the server sends (``algorithm.server_spec``), in the widest shapes.
        index_of: where a client's tensors sit in the server's (``ClientRuntime.index_of``; empty:
            the server's shapes).
        compression: the ``[compression]`` table.
    """

    def __init__(self, spec: ParamSpec, index_of: Callable[[int], Mapping[str, BlockIndex]],
                 compression: CompressionConfig) -> None:
        self.spec = spec
        self.index_of = index_of
        self.compression = compression
        self._full = dict(zip(spec.names, spec.shapes))
        self._codecs: dict[ParamSpec, UploadCodec] = {spec: UploadCodec(compression, spec)}

    def spec_of(self, client: int) -> ParamSpec:
        """The block of the server's tensors that ``client`` uses."""
        index = self.index_of(int(client))
        if not index:
            return self.spec
        return ParamSpec(self.spec.names, tuple(block_shape(index[n]) for n in self.spec.names))

    def codec(self, client: int) -> UploadCodec:
        spec = self.spec_of(client)
        if spec not in self._codecs:
            self._codecs[spec] = UploadCodec(self.compression, spec)
        return self._codecs[spec]

    def send(self, client: int, row: Mapping[str, Tensor]) -> Params:
        """What ``client`` receives of its row ``{name: [*widest shape]}``: its block."""
        index = self.index_of(int(client))
        return {n: take_block(row[n], index[n]) for n in self.spec.names} if index else dict(row)

    def down_bytes(self, client: int, weights: Mapping[str, Tensor]) -> int:
        """Bytes of ``client``'s block of a cohort's ``weights {name: [C, *shape]}`` (as Flower
        serialises it)."""
        spec = self.spec_of(client)
        if spec == self.spec:
            return payload_bytes(weights, batch_dims=1)
        return sum(len(n) + npy_bytes(weights[n].dtype, s) for n, s in zip(spec.names, spec.shapes))

    def receive(self, client: int, payload: Any, *, compressed: bool = True) -> Any:
        """``client``'s upload as a delta in the server's shapes, or an UnreadableUpdate.
        ``compressed = False``: a plain delta (the novel-client fit sends one)."""
        codec = self.codec(client)
        delta = codec.decode(payload) if compressed else payload
        if codec.spec == self.spec or isinstance(delta, UnreadableUpdate):
            return delta  # (in the server's shapes: Server.receive validates it)
        try:
            got = {n: tuple(delta[n].shape) for n in codec.spec.names}
            if set(delta.keys()) != set(codec.spec.names) or any(
                    got[n] != s for n, s in zip(codec.spec.names, codec.spec.shapes)):
                raise ValueError(f"expected the shapes of client {int(client)}'s architecture "
                                 f"{dict(zip(codec.spec.names, codec.spec.shapes))}")
            index = self.index_of(int(client))
            return {n: put_block(delta[n], index[n], self._full[n]) for n in self.spec.names}
        except Exception as e:  # noqa: BLE001 - whatever a client sent must not take the server down
            return UnreadableUpdate(f"delta not in its architecture's shapes ({str(e)[:300]})")
