"""Typed, frozen run configuration loaded from TOML.

Every table maps onto a frozen dataclass; unknown keys and bad values raise ``ConfigError``
naming the key and what is allowed. ``Literal`` annotations double as the list of allowed
values. Task and method options are typed by the dataclass each registry entry declares.

A config file may inherit: a top-level ``base = "other.toml"`` (relative to the file naming it)
is read first, recursively, and the file's own keys are merged over it, tables key by key
(:func:`read_config`); ``--set`` overrides apply after that.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from shn.config_compression import CompressionConfig
from shn.config_privacy import PrivacyConfig
from shn.config_files import ConfigError, read_config, read_toml
from shn.config_toml import config_to_dict, dumps_toml
from shn.registry import METHODS, TASKS


# --------------------------------------------------------------------------------------------
# the tables

@dataclass(frozen=True)
class LocalConfig:
    """Client-side training (pFedHN defaults, METHOD §3.1).

    Attributes:
        steps: local SGD steps per client and round (one minibatch each).
        lr: local learning rate.
        momentum: local SGD momentum.
        weight_decay: local L2 weight decay.
        batch_size: minibatch size (sampled with replacement from the client's train split).
        grad_clip: per-client gradient-norm clipping at every step; 0 disables.
        mode: how clients train: "vmap" (one batched call per step for all clients), "loop"
            (one client at a time), "grouped" (convolutional targets: the cohort as one network of
            grouped convolutions), or "auto": a documented rule (grouped for convolutional
            targets on CPU when their layers allow it, else loop there; vmap otherwise), chosen
            by rule rather than by timing so that the same config always takes the same path.
        precision: the local steps' forward and loss: "fp32", or "bf16" (mixed precision: the
            model's forward and loss run under ``torch.autocast`` to bfloat16 on the data's device;
            weights, gradients, optimiser state and the returned deltas stay float32). bf16 is
            within a tolerance of fp32, not equal to it; with mode "grouped" it made the CIFAR
            CNN's local steps 1.9× faster than the fp32 loop per CPU core (README, performance).
    """

    steps: int = 50
    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    batch_size: int = 64
    grad_clip: float = 50.0
    mode: Literal["auto", "vmap", "loop", "grouped"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size")
        if self.precision not in ("fp32", "bf16"):  # also when built in Python, not from TOML
            raise ConfigError(f"local.precision: {self.precision!r} is not allowed; allowed values: 'fp32', 'bf16'")
        _non_negative(self, "lr", "momentum", "weight_decay", "grad_clip")


@dataclass(frozen=True)
class ServerConfig:
    """The server optimiser of the hypernetwork methods (FedAvg-family methods take theirs from
    ``[methods.<name>]``).

    Attributes:
        optimizer: "sgd" or "adam" over the hypernetwork's parameters.
        lr: server learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum (needs momentum > 0).
        weight_decay: L2 weight decay of the hypernetwork (not of the client embeddings).
        embed_lr: the client embeddings' own learning rate; None: lr.
        embed_weight_decay: weight decay of the client embeddings (pFedHN: none).
        delta_reduction: "sum" of the clients' vector-Jacobian products (pFedHN's per-client
            step semantics) or "mean" (divided by the round's client count: the behaviour
            before a fix, kept to reproduce old results).
        grad_clip: gradient-norm clipping of a server step (times the client count with "sum");
            0 disables.
        betas: Adam's (beta1, beta2).
    """

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-3
    embed_lr: float | None = None
    embed_weight_decay: float = 0.0
    delta_reduction: Literal["sum", "mean"] = "sum"
    grad_clip: float = 50.0
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _non_negative(self, "lr", "momentum", "weight_decay", "embed_weight_decay", "grad_clip")
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("server.nesterov = true needs server.momentum > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):  # what torch.optim.Adam accepts
            raise ConfigError(f"betas: each must be in [0, 1), got {list(self.betas)!r}")


@dataclass(frozen=True)
class HyperNetworkConfig:
    """Embeddings → encoder → MLP trunk → one linear head per target tensor (pFedHN).

    Attributes:
        embed_dim: width of the client embeddings; None: 1 + N/4 for N clients, as in pFedHN.
        hidden: width of the MLP trunk.
        n_hidden: hidden layers of the MLP trunk.
        spectral_norm: spectral normalisation of the trunk's linear layers.
        graph_branch: graph methods: the trunk reads the encoder output ("replace", the SHN
            paper) or the embedding plus a zero-initialised projection of it ("residual":
            starts as pFedHN).
        personal_input: DEPT's decoupling for every hypernetwork method: the target's first
            layer (``input_proj.*`` / ``conv1.*``) stays on each client, trained locally and never
            sent; the hypernetwork generates the body. Lets clients whose inputs differ (weather
            stations with different variables) train with a hypernetwork.
    """

    embed_dim: int | None = None
    hidden: int = 100
    n_hidden: int = 3
    spectral_norm: bool = False
    graph_branch: Literal["replace", "residual"] = "replace"
    personal_input: bool = False

    def __post_init__(self) -> None:
        _positive(self, "hidden")
        _non_negative(self, "n_hidden")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ConfigError("hypernetwork.embed_dim must be ≥ 1 (or omitted for 1 + N/4)")


@dataclass(frozen=True)
class EncoderConfig:
    """Graph encoder between the embeddings and the heads (SHN: sheaf diffusion; GHN: GCN).

    Attributes:
        kind: the encoder; None: the method's defining one (pFedHN identity, GHN/Panacea gcn,
            SHN sheaf), or any registered encoder name.
        layers: diffusion / GCN layers (the depth L).
        stalk_dim: sheaf stalk dimension d.
        hidden_channels: channels per stalk dimension (sheaf diffusion width = d × this).
        sheaf_type: restriction maps: "diag" (diagonal), "orth" (orthogonal, Householder) or
            "general".
        sheaf_act: activation of the learned map entries ("diag", "general") or of the
            Householder parameters ("orth"), as neural sheaf diffusion: "tanh", "elu" or "id".
        normalised: use the normalised sheaf Laplacian.
        nonlinear: a non-linearity in each diffusion layer.
        edge_weights: learn edge weights in the sheaf Laplacian; None: the neural sheaf
            diffusion default (on for "orth").
        dropout: dropout inside the encoder (train mode only, seeded).
        gcn_hidden: width of the plain GCN stack (kind "gcn_stack"); None: stalk_dim ×
            hidden_channels (the same width as SHN).
    """

    kind: str | None = None
    layers: int = 2
    stalk_dim: int = 3
    hidden_channels: int = 16
    sheaf_type: Literal["diag", "orth", "general"] = "diag"
    sheaf_act: Literal["tanh", "elu", "id"] = "tanh"
    normalised: bool = True
    nonlinear: bool = True
    edge_weights: bool | None = None
    dropout: float = 0.0
    gcn_hidden: int | None = None

    def __post_init__(self) -> None:
        _non_negative(self, "layers")
        _positive(self, "stalk_dim", "hidden_channels")
        if not 0.0 <= self.dropout < 1.0:  # 1 would zero every activation
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class GraphConfig:
    """The client-relation graph of the graph methods (SHN, GHN, Panacea).

    Attributes:
        kind: "given" (the task's own graph, e.g. road sensors, or ``path``), "complete",
            "labels" (an oracle for ablations: the kNN graph, ``k`` and ``metric``, of the clients'
            training label distributions, which a server would not see; classification tasks),
            or inferred from stage-1 pFedHN embeddings by the three-stage pipeline: "knn",
            "threshold" or "learned" (edge weights trained over kNN candidates).
        k: neighbours per client of the kNN graph.
        tau: similarity threshold of the "threshold" graph.
        metric: similarity of the embeddings: "cosine" or "euclidean".
        path: a graph file for any task (ClientGraph JSON, or a dense N × N matrix as .csv /
            .npy), in the client order of ``shn inspect``; relative to the working directory.
        candidate_k: "learned": candidate edges = kNN with this k over the stage-1 embeddings
            (0 = complete).
        stage1_rounds: the stage-1 (pFedHN) budget of the three-stage pipeline; None: the run's
            rounds.
        stage1_cache: a folder where stage-1 results are cached by a hash of everything stage 1
            depends on, so graph methods with the same seed and budget train pFedHN once; None:
            no caching.
        stage3_init: stage 3 starts from the stage-1 "embeddings" only (fresh trunk and heads)
            or from the "full" stage-1 hypernetwork (needs hypernetwork.graph_branch =
            "residual").
        rewire_homophily: heterophily studies: rewire the graph toward this edge homophily
            (w.r.t. the task's client label sets, else groups) before training, keeping the edge
            count; None: no rewiring.
    """

    kind: Literal["given", "knn", "threshold", "complete", "learned", "labels"] = "knn"
    k: int = 5
    tau: float = 0.5
    metric: Literal["cosine", "euclidean"] = "cosine"
    path: str | None = None
    candidate_k: int = 10
    stage1_rounds: int | None = None
    stage1_cache: str | None = None
    stage3_init: Literal["embeddings", "full"] = "embeddings"
    rewire_homophily: float | None = None

    def __post_init__(self) -> None:
        _positive(self, "k")
        _non_negative(self, "candidate_k")
        if self.rewire_homophily is not None and not 0.0 <= self.rewire_homophily <= 1.0:
            raise ConfigError(f"rewire_homophily: must be in [0, 1] (or omitted), got {self.rewire_homophily!r}")


@dataclass(frozen=True)
class NovelConfig:
    """Novel-client generalisation (hypernetwork methods): ``fraction`` of the clients is held
    out of training (sampling pool and graph edges); after training each gets a new embedding
    fitted with the hypernetwork frozen (``steps`` server steps, each after a local training
    run with ``[local]``), is attached to the graph by kNN (``graph.k``) on that embedding every
    ``reattach_every`` steps, and is evaluated on its test split (``novel_test_*``).

    Attributes:
        fraction: share of the clients held out of training as novel clients (0: none).
        steps: server steps fitting each novel client's embedding.
        lr: learning rate of that fit; None: server.embed_lr (or server.lr).
        reattach_every: steps between re-attaching a novel client to the graph by kNN.
    """

    fraction: float = 0.0
    steps: int = 50
    lr: float | None = None
    reattach_every: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"fraction: must be in [0, 1), got {self.fraction!r}")
        _non_negative(self, "steps")
        _positive(self, "reattach_every")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr: must be > 0 (or omitted), got {self.lr!r}")


@dataclass(frozen=True)
class ValidationConfig:
    """Client-update checks done before any server update.

    Attributes:
        max_norm: reject a client's delta whose L2 norm is above this.
        clip_norm: hypernetwork methods: scale deltas down to this norm; 0: off.
        max_examples: the largest example count a client may claim (FedAvg weights by it); a
            larger claim is rejected.
    """

    max_norm: float = 1e4
    clip_norm: float = 0.0
    max_examples: int = 10**9

    def __post_init__(self) -> None:
        _positive(self, "max_norm", "max_examples")
        _non_negative(self, "clip_norm")


@dataclass(frozen=True)
class AttackConfig:
    """Attack simulation (robustness studies). A ``fraction`` of the clients, chosen from the run
    seed, is malicious: ``scale`` sends ``scale × Δ``, ``sign_flip`` sends ``−scale × Δ`` (scale 1:
    a plain sign flip), ``random`` sends Gaussian noise of std ``noise_std`` per coordinate instead
    of its update, ``label_flip`` trains honestly on permuted labels (a seeded derangement of the
    classes, train split only). The summary then reports ``honest_test_*`` and
    ``malicious_clients``.

    Attributes:
        kind: the attack: "none", "scale", "sign_flip", "random" or "label_flip".
        fraction: share of the clients that are malicious (chosen from the run seed).
        scale: "scale" / "sign_flip": the factor applied to the malicious clients' deltas.
        noise_std: "random": standard deviation of the noise sent instead of an update.
    """

    kind: Literal["none", "scale", "sign_flip", "random", "label_flip"] = "none"
    fraction: float = 0.0
    scale: float = 10.0
    noise_std: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"fraction: must be in [0, 1], got {self.fraction!r}")
        _positive(self, "scale")
        _non_negative(self, "noise_std")


@dataclass(frozen=True)
class FaultConfig:
    """Injected client faults: each sampled client fails (sends nothing) with probability
    ``dropout`` in each round, drawn from the run seed; failures are counted in
    ``failed_clients``.

    Attributes:
        dropout: probability that a sampled client fails in a round, in [0, 1).
    """

    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class TaskConfig:
    """``name`` picks a registered task; the remaining keys are that task's own options.

    Attributes:
        name: the task (a registered name: digits, mnist, cifar10, cifar100, traffic, weather,
            tabular, timeseries, or a plugin's).
        options: the task's own options (the other keys of the [task] table).
    """

    name: str = "digits"
    options: Any = None

    def option(self, key: str, default: Any = None) -> Any:
        return getattr(self.options, key, default)


@dataclass(frozen=True)
class RunConfig:
    """One run: the top level of a TOML config, and its tables.

    Attributes:
        method: the federated method (a registered name: pfedhn, shn, ghn, panacea, fedavg,
            fedprox, ditto, fedper, fedrep, local, decoupled, attentive, or a plugin's).
        seed: the run seed; every random choice (data split, initialisation, client sampling,
            minibatches) derives from it.
        rounds: federated rounds.
        clients_per_round: clients sampled per round.
        eval_every: rounds between evaluations of every client on val and test (and after the
            last round).
        checkpoint_every: rounds between checkpoints; 0: only at the end.
        device: torch device: "cpu", "cuda", "cuda:N" or "mps".
        task: the [task] table: ``name`` and that task's options.
        local: the [local] table: client-side training.
        server: the [server] table: the hypernetwork methods' server optimiser.
        hypernetwork: the [hypernetwork] table.
        encoder: the [encoder] table: the graph encoder.
        graph: the [graph] table: the client-relation graph.
        validation: the [validation] table: checks on client updates.
        attack: the [attack] table: simulated malicious clients.
        faults: the [faults] table: injected client failures.
        novel: the [novel] table: novel-client generalisation.
        privacy: the [privacy] table: client-level differential privacy.
        compression: the [compression] table: compression of the clients' uploads.
        methods: per-method options, [methods.<name>] tables (only the active method's are used).
        sweep: the optuna search space of ``shn sweep``: parameter path → distribution table.
    """

    method: str = "pfedhn"
    seed: int = 0
    rounds: int = 100
    clients_per_round: int = 5
    eval_every: int = 25
    checkpoint_every: int = 0
    device: str = "cpu"
    task: TaskConfig = field(default_factory=TaskConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    hypernetwork: HyperNetworkConfig = field(default_factory=HyperNetworkConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    novel: NovelConfig = field(default_factory=NovelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    methods: Mapping[str, Any] = field(default_factory=dict)
    sweep: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive(self, "rounds", "clients_per_round", "eval_every")
        _non_negative(self, "checkpoint_every", "seed")

    @property
    def method_options(self) -> Any:
        """The active method's options dataclass (defaults when not configured)."""
        entry = METHODS.get(self.method)
        if entry.options is None:
            return None
        return self.methods.get(self.method) or entry.options()


# --------------------------------------------------------------------------------------------
# loading

def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML config (and its ``base`` chain) into a validated ``RunConfig``, applying
    ``KEY=VALUE`` overrides (as ``shn run --set``). Raises ``ConfigError`` naming the key or file
    on any problem."""
    return config_from_dict(apply_overrides(read_config(path), overrides))


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``KEY=VALUE`` overrides (dotted keys, TOML values; bare words are strings)."""
    data = _deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. server.lr=0.01")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a table")
        node[parts[-1]] = value
    return data


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build a validated ``RunConfig`` from a dict shaped like the TOML file."""
    data = dict(data)
    task_table, methods_table, sweep = (_table(data.pop(key, None), key) for key in ("task", "methods", "sweep"))
    cfg = _build(RunConfig, data, "")
    method = cfg.method
    if method not in METHODS:
        raise ConfigError(f"method: unknown method {method!r}; allowed: {', '.join(METHODS.names())}")
    methods = {}
    for name, table in methods_table.items():
        if name not in METHODS:
            raise ConfigError(f"methods.{name}: unknown method; allowed: {', '.join(METHODS.names())}")
        opts_cls = METHODS.get(name).options
        if opts_cls is None:
            raise ConfigError(f"methods.{name}: method {name!r} takes no options")
        methods[name] = _build(opts_cls, table, f"methods.{name}.")
    return replace(cfg, task=build_task_config(task_table), methods=methods, sweep=dict(sweep))


def _table(value: Any, key: str) -> dict[str, Any]:
    """A top-level table (``task``, ``methods``, ``sweep``) as a dict; absent: empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a table, got {value!r}")
    return dict(value)


def build_task_config(table: Mapping[str, Any]) -> TaskConfig:
    table = dict(table)
    name = table.pop("name", "digits")
    if not isinstance(name, str) or name not in TASKS:  # (a list or table is unhashable: no lookup)
        raise ConfigError(f"task.name: unknown task {name!r}; allowed: {', '.join(TASKS.names())}")
    opts_cls = TASKS.get(name).options
    options = _build(opts_cls, table, "task.") if opts_cls is not None else None
    return TaskConfig(name=name, options=options)


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = [k for k in table if k not in known]
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; allowed keys here: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for key, value in table.items():
        hint = hints[key]
        if is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(prefix) or not prefix else f"{prefix}{msg}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not fit {hint}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, key) for v in value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:  # beyond: not exact
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ConfigError(f"{n}: must be > 0, got {getattr(obj, n)!r}")


def _non_negative(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 0:
            raise ConfigError(f"{n}: must be ≥ 0, got {getattr(obj, n)!r}")


__all__ = [
    "AttackConfig", "CompressionConfig", "ConfigError", "EncoderConfig", "FaultConfig", "GraphConfig",
    "HyperNetworkConfig", "LocalConfig", "NovelConfig", "PrivacyConfig", "RunConfig", "ServerConfig", "TaskConfig",
    "ValidationConfig",
    "apply_overrides", "config_from_dict", "config_to_dict", "dumps_toml", "load_config", "read_config",
]
