"""FedRep (Collins et al., ICML 2021): a shared body (representation) averaged FedAvg-style and a
personal head (``head.*``) that never leaves the client. Unlike FedPer, which trains both
together, each round a client first trains its head alone with the received body fixed
(``head_steps``), then the body alone with its new head fixed (``local.steps``); only the body's
delta is sent. Both phases are batched over the round's clients. Configured under
``[methods.fedrep]``: ``head_prefix``, ``head_steps`` and FedAvg's server options."""

from __future__ import annotations

from dataclasses import dataclass

from baselines.fedavg import FedAvgOptions
from shn.federated.algorithm import GlobalModelAlgorithm
from shn.federated.client_method import ClientFit, ClientMethod, ClientRound
from shn.federated.local import LocalObjective
from shn.methods import MethodContext, register_method


@dataclass(frozen=True)
class FedRepOptions(FedAvgOptions):
    """FedRep: FedAvg's server options (for the body), and

    Attributes:
        head_prefix: the personal head: target tensors whose names start with this.
        head_steps: local steps on the head (body fixed) before the body steps; None: local.steps.
    """

    head_prefix: str = "head."
    head_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_steps is not None and self.head_steps < 1:
            raise ValueError(f"head_steps: must be ≥ 1, got {self.head_steps!r}")


class FedRepClient(ClientMethod):
    """Head phase (body fixed), then body phase (head fixed)."""

    def __init__(self, head: tuple[str, ...], head_steps: int | None = None) -> None:
        self.head = frozenset(head)
        self.head_steps = head_steps

    def fit(self, round: ClientRound) -> ClientFit:
        heads = round.train(round.received, LocalObjective(trainable=self.head, steps=self.head_steps))
        body = frozenset(round.received) - self.head
        result = round.train(heads.params, LocalObjective(trainable=body))
        return ClientFit(result.params, result.loss)


@register_method("fedrep", FedRepOptions)
def make_fedrep(ctx: MethodContext) -> GlobalModelAlgorithm:
    """FedRep: shared body, personal head; head steps, then body steps."""
    opts = ctx.options
    head = ctx.keys_with_prefix(opts.head_prefix)
    ctx.client = FedRepClient(head, opts.head_steps)
    return GlobalModelAlgorithm(ctx.initial, opts.server_config(), spec=ctx.spec, personal_keys=head)
