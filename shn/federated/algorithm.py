"""The engine-agnostic ``Algorithm`` protocol and the two server shapes every method composes:
a hypernetwork server (pFedHN rule) and a global-model server (FedAvg / FedOpt family).

Conventions shared by all engines:
* weights travel as ``{name: Tensor[C, *shape]}`` for the C clients of a round;
* a client returns ``delta = θ_sent − θ_trained`` (before minus after) for the tensors it was
  sent, plus its number of training examples;
* tensors listed in ``personal_keys`` never leave the client: the server neither sends nor
  receives them (FedPer heads, personal input layers, Local's whole model).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from shn.config import ServerConfig
from shn.hypernetwork import HyperNetwork
from shn.seeding import derive_seed, torch_generator
from shn.target import Params, ParamSpec


@runtime_checkable
class Algorithm(Protocol):
    """What an engine needs from a federated method's server side."""

    spec: ParamSpec  # every tensor of the target model
    personal_keys: frozenset[str]  # tensors that stay on the client

    @property
    def server_spec(self) -> ParamSpec:
        """The tensors the server sends and receives."""
        ...

    def weights_for(self, clients: Sequence[int]) -> Params:
        """The weights to send, ``{name: [C, *shape]}`` over ``server_spec``."""
        ...

    def initial_personal(self) -> Params:
        """Initial values of the personal tensors (un-batched), shared by all clients."""
        ...

    def apply_updates(self, clients: Sequence[int], deltas: Params, num_examples: Tensor) -> dict[str, float]:
        """One server step from the accepted clients' deltas ``{name: [C, *shape]}``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def make_optimizer(cfg: ServerConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov) or Adam over parameter groups (each group may set ``lr``)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


class _PersonalMixin:
    spec: ParamSpec
    personal_keys: frozenset[str]
    _initial: Params

    @property
    def server_spec(self) -> ParamSpec:
        return self.spec.subset(n for n in self.spec.names if n not in self.personal_keys)

    def initial_personal(self) -> Params:
        return {k: self._initial[k].clone() for k in self.spec.names if k in self.personal_keys}


# A regulariser added to the hypernetwork server objective: f(hn, graph, generator) -> scalar.
Regularizer = Callable[[HyperNetwork, Any, torch.Generator], Tensor]


class HyperNetworkAlgorithm(_PersonalMixin):
    """pFedHN's server: θ_i = H_φ(i); after local training, one vector–Jacobian product

        g_φ = Σ_i (∂θ_i/∂φ)ᵀ (θ_i − θ̃_i)

    for all C clients of the round in ONE backward pass, grad-norm clipping, optimiser step.
    A graph encoder makes each client's delta reach its neighbours' embeddings (SHN, GHN).

    Why the sum (``server.delta_reduction = "sum"``, the default): pFedHN takes one server step
    per client with gradient ``(∂θ_i/∂φ)ᵀ Δ_i``. C such steps of lr η equal, to first order in
    η, one step of lr η along the sum. Dividing by C instead (``"mean"``, the behaviour before
    this fix, kept to reproduce old results) moves each client's embedding — which only its own
    delta reaches — C× less per round than pFedHN, while weight decay acts at full strength, so
    the embeddings barely learn. Client embeddings get no weight decay by default
    (``server.embed_weight_decay = 0``), as in pFedHN's code.

    Dropout in the hypernetwork: the weights sent for training are generated in train mode with
    a mask drawn from ``(seed, step)``, and ``apply_updates`` regenerates them with the same
    mask, so the server differentiates exactly the θ it sent; evaluation uses eval mode
    (:meth:`eval_weights`).

    With ``[privacy]`` (``self.privacy`` set), each client's VJP is clipped and their sum noised
    instead (:mod:`shn.federated.privacy`: one backward per client).

    Args:
        hn: the hypernetwork (already on its device).
        graph: the client graph passed to the encoder (None for pFedHN).
        initial: the template's initial weights (used only for personal tensors).
        regularizer: optional extra server loss (Panacea's graph reconstruction), already
            weighted; its gradient is added in the same backward pass.
    """

    privacy: Any = None  # the run's GaussianMechanism (shn.federated.privacy.enable_privacy), None: off

    def __init__(self, hn: HyperNetwork, config: ServerConfig, *, graph: Any = None, initial: Params | None = None,
                 personal_keys: Sequence[str] = (), regularizer: Regularizer | None = None, seed: int = 0) -> None:
        self.hn = hn
        self.graph = graph
        self.config = config
        self.spec = hn.spec  # the whole target
        self.personal_keys = frozenset(personal_keys)
        if self.personal_keys:  # generate only what is sent (issue 18 item 2)
            hn.restrict(self.server_spec.names)
        self._initial = initial or {}
        self.regularizer = regularizer
        self.seed = seed
        self.steps = 0
        embed_lr = config.embed_lr if config.embed_lr is not None else config.lr
        self.optimizer = make_optimizer(config, [
            {"params": hn.other_parameters()},
            {"params": hn.embedding_parameters(), "lr": embed_lr, "weight_decay": config.embed_weight_decay},
        ])
        self.hn.eval()  # train mode only inside _generate(train=True), with a seeded mask
        self._dropout = has_dropout(hn)

    def generate(self, clients: Sequence[int], *, train: bool = False) -> Params:
        if train and self._dropout:
            # one dropout mask per server step: weights_for and apply_updates draw the same one
            device = self.hn.embeddings.weight.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(derive_seed(self.seed, "hn-dropout", self.steps))
                self.hn.train()
                try:
                    weights = self.hn(clients, self.graph)
                finally:
                    self.hn.eval()
        else:
            weights = self.hn(clients, self.graph)
        return {k: weights[k] for k in self.server_spec.names}

    @torch.no_grad()
    def weights_for(self, clients: Sequence[int]) -> Params:
        return self.generate(clients, train=True)

    @torch.no_grad()
    def eval_weights(self, clients: Sequence[int]) -> Params:
        """The weights to evaluate: eval mode (no dropout)."""
        return self.generate(clients)

    def apply_updates(self, clients: Sequence[int], deltas: Params, num_examples: Tensor) -> dict[str, float]:
        params = [p for p in self.hn.parameters() if p.requires_grad]
        theta = self.generate(clients, train=True)  # recomputed with grad: the engine may be remote
        names = list(theta)
        outputs = [theta[n] for n in names]
        scale = 1.0 / len(clients) if self.config.delta_reduction == "mean" else 1.0
        grad_outputs = [deltas[n].to(theta[n]) for n in names]
        regs, out = [], {}
        if self.regularizer is not None:
            regs = [self.regularizer(self.hn, self.graph, torch_generator(self.seed, "server-regularizer", self.steps))]
        if self.privacy is None:
            # The pFedHN update: one vector-Jacobian product for the whole batch of clients.
            grads = torch.autograd.grad(outputs + regs, params, [d * scale for d in grad_outputs]
                                        + [torch.ones_like(r) for r in regs], allow_unused=True)
        else:  # each client's VJP clipped, their sum noised (shn.federated.privacy)
            private, clipped = self.privacy.hypernetwork_gradient(outputs, params, grad_outputs, self.steps)
            out["dp_clipped_clients"] = float(clipped)
            grads = [None if g is None else g * scale for g in private]
            if regs:  # the regulariser reads no client update: added without noise
                grads = [a if b is None else b if a is None else a + b
                         for a, b in zip(grads, torch.autograd.grad(regs, params, allow_unused=True))]
        out["server_regularizer"] = float(regs[0].detach()) if regs else 0.0
        for p, g in zip(params, grads):
            p.grad = g
        # pFedHN clips each client's step; a sum of C clients' gradients gets C× the threshold
        norm = _clip(params, self.config.grad_clip * (len(clients) if self.config.delta_reduction == "sum" else 1))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"server_grad_norm": norm, **out}

    def state_dict(self) -> dict[str, Any]:
        return {"hn": self.hn.state_dict(), "optimizer": self.optimizer.state_dict(), "steps": self.steps,
                "initial": self._initial}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.hn.load_state_dict(state["hn"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self._initial = dict(state["initial"])


class GlobalModelAlgorithm(_PersonalMixin):
    """A global model updated FedOpt-style: the example-weighted mean delta is used as the
    pseudo-gradient of a server optimiser. SGD with lr 1 and no momentum is plain FedAvg
    (θ ← θ − mean Δ = mean θ̃); momentum / Nesterov / Adam give FedAvgM / FedAdam. With
    ``[privacy]`` (``self.privacy`` set) the pseudo-gradient is DP-FedAvg's unweighted mean of
    clipped deltas plus noise (:mod:`shn.federated.privacy`)."""

    privacy: Any = None  # the run's GaussianMechanism (shn.federated.privacy.enable_privacy), None: off

    def __init__(self, initial: Params, config: ServerConfig, *, personal_keys: Sequence[str] = (),
                 aggregate: Callable[[Tensor, Tensor], Tensor] | None = None, spec: ParamSpec | None = None) -> None:
        self.spec = spec or ParamSpec(tuple(initial), tuple(tuple(t.shape) for t in initial.values()))
        self.personal_keys = frozenset(personal_keys)
        self._initial = {k: v.detach().clone() for k, v in initial.items()}
        self.config = config
        self.aggregate = aggregate or weighted_mean
        self.params = nn.ParameterList(
            [nn.Parameter(self._initial[n].clone()) for n in self.server_spec.names]
        )
        self.optimizer = make_optimizer(config, [{"params": list(self.params)}]) if len(self.params) else None
        self.steps = 0  # server steps taken (the privacy noise's stream)

    def weights_for(self, clients: Sequence[int]) -> Params:
        return {n: p.detach().unsqueeze(0).expand(len(clients), *p.shape).clone()
                for n, p in zip(self.server_spec.names, self.params)}

    def apply_updates(self, clients: Sequence[int], deltas: Params, num_examples: Tensor) -> dict[str, float]:
        if self.optimizer is None:
            return {}
        out = {}
        if self.privacy is None:
            weights = num_examples.to(self.params[0].device, torch.float64)
            for n, p in zip(self.server_spec.names, self.params):
                p.grad = self.aggregate(deltas[n].to(p), weights).to(p.dtype)
        else:  # DP-FedAvg: clipped deltas summed, noised, divided by the clients' count (unweighted)
            mean, clipped = self.privacy.mean_update([deltas[n].to(p) for n, p in zip(self.server_spec.names, self.params)],
                                                     self.steps)
            for p, g in zip(self.params, mean):
                p.grad = g.to(p.dtype)
            out["dp_clipped_clients"] = float(clipped)
        norm = _clip(list(self.params), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"server_grad_norm": norm, **out}

    def state_dict(self) -> dict[str, Any]:
        return {"params": [p.detach().clone() for p in self.params], "steps": self.steps,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None, "initial": self._initial}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, state["params"]):
                p.copy_(v)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self._initial = dict(state["initial"])
        self.steps = int(state.get("steps", 0))  # (checkpoints before the privacy path have none)


def has_dropout(module: nn.Module) -> bool:
    """Whether any submodule drops units in train mode (``nn.Dropout`` or a ``dropout`` /
    ``input_dropout`` float attribute, as the graph encoders keep them)."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if any(isinstance(getattr(m, a, None), float) and getattr(m, a) > 0 for a in ("dropout", "input_dropout")):
            return True
    return False


def eval_weights(algorithm: Algorithm, clients: Sequence[int]) -> Params:
    """Weights for evaluation: the algorithm's ``eval_weights`` when it has one (hypernetworks
    with dropout), else ``weights_for``."""
    fn = getattr(algorithm, "eval_weights", None)
    return fn(clients) if fn is not None else algorithm.weights_for(clients)


def weighted_mean(stacked: Tensor, weights: Tensor) -> Tensor:
    """``stacked [C, *shape]`` averaged with ``weights [C]`` (normalised here)."""
    w = (weights / weights.sum()).to(stacked.dtype)
    return torch.tensordot(w, stacked, dims=1)


def _clip(params: list[Tensor], max_norm: float) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
