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

from shn.registry import METHODS, TASKS


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what was expected."""


# --------------------------------------------------------------------------------------------
# the tables

@dataclass(frozen=True)
class LocalConfig:
    """Client-side training (pFedHN defaults, METHOD §3.1)."""

    steps: int = 50
    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    batch_size: int = 64
    grad_clip: float = 50.0
    # "auto": a documented rule (grouped for convolutional targets on CPU, the per-client loop
    # for those grouped cannot run, vmap otherwise), chosen by rule rather than by timing so that
    # the same config always takes the same path (shn/federated/local.py).
    mode: Literal["auto", "vmap", "loop", "grouped"] = "auto"

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size")
        _non_negative(self, "lr", "momentum", "weight_decay", "grad_clip")


@dataclass(frozen=True)
class ServerConfig:
    """The server optimiser (hypernetwork parameters, or FedOpt's global model)."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-3
    embed_lr: float | None = None  # client embeddings' own lr; None = lr
    embed_weight_decay: float = 0.0  # pFedHN: no weight decay on the client embeddings
    # hypernetwork methods: "sum" of the clients' VJPs (pFedHN's per-client step semantics) or
    # "mean" (divided by the round's client count: the pre-fix behaviour, for old results)
    delta_reduction: Literal["sum", "mean"] = "sum"
    grad_clip: float = 50.0  # 0 disables
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _non_negative(self, "lr", "momentum", "weight_decay", "embed_weight_decay", "grad_clip")
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("server.nesterov = true needs server.momentum > 0")


@dataclass(frozen=True)
class HyperNetworkConfig:
    """Embeddings → encoder → MLP trunk → one linear head per target tensor (pFedHN)."""

    embed_dim: int | None = None  # None: 1 + N/4 as in pFedHN
    hidden: int = 100
    n_hidden: int = 3
    spectral_norm: bool = False
    # graph methods: the trunk reads the encoder output ("replace", the SHN paper) or the
    # embedding plus a zero-initialised projection of it ("residual": starts as pFedHN)
    graph_branch: Literal["replace", "residual"] = "replace"

    def __post_init__(self) -> None:
        _positive(self, "hidden")
        _non_negative(self, "n_hidden")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ConfigError("hypernetwork.embed_dim must be ≥ 1 (or omitted for 1 + N/4)")


@dataclass(frozen=True)
class EncoderConfig:
    """Graph encoder between the embeddings and the heads (SHN: sheaf diffusion; GHN: GCN)."""

    # None: the method's defining encoder (identity / gcn / sheaf); or any registered encoder
    kind: str | None = None
    layers: int = 2
    stalk_dim: int = 3
    hidden_channels: int = 16
    sheaf_type: Literal["diag", "orth", "general"] = "diag"
    normalised: bool = True
    nonlinear: bool = True
    edge_weights: bool | None = None  # None: NSD default (on for orth)
    dropout: float = 0.0
    gcn_hidden: int | None = None  # None: stalk_dim * hidden_channels (same width as SHN)

    def __post_init__(self) -> None:
        _non_negative(self, "layers", "dropout")
        _positive(self, "stalk_dim", "hidden_channels")


@dataclass(frozen=True)
class GraphConfig:
    """The client-relation graph. ``given`` takes the task's own graph (e.g. road sensors) or
    ``path``; ``knn``/``threshold`` are built from stage-1 embeddings by ``shn pipeline``."""

    kind: Literal["given", "knn", "threshold", "complete", "learned"] = "knn"
    k: int = 5
    tau: float = 0.5
    metric: Literal["cosine", "euclidean"] = "cosine"
    path: str | None = None
    # learned: candidate edges = kNN with this k over the stage-1 embeddings (0 = complete)
    candidate_k: int = 10
    # stage 1 (pFedHN) budget of the three-stage pipeline; None = the run's ``rounds``
    stage1_rounds: int | None = None
    # a folder where stage-1 results are cached by a hash of everything stage 1 depends on, so
    # graph methods with the same seed and budget train pFedHN once (None: no caching)
    stage1_cache: str | None = None
    # stage 3 starts from the stage-1 "embeddings" only (fresh trunk and heads), or from the
    # "full" stage-1 hypernetwork (needs hypernetwork.graph_branch = "residual")
    stage3_init: Literal["embeddings", "full"] = "embeddings"
    # heterophily studies: rewire the graph toward this edge homophily (w.r.t. the task's client
    # label sets, else groups) before training, keeping the edge count; None = no rewiring
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
    ``reattach_every`` steps, and is evaluated on its test split (``novel_test_*``)."""

    fraction: float = 0.0
    steps: int = 50
    lr: float | None = None  # None: server.embed_lr (or server.lr)
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
    """Client-update checks done before any server update."""

    max_norm: float = 1e4  # reject a delta whose L2 norm is above this
    clip_norm: float = 0.0  # hypernetwork methods: scale deltas down to this norm (0 = off)

    def __post_init__(self) -> None:
        _positive(self, "max_norm")
        _non_negative(self, "clip_norm")


@dataclass(frozen=True)
class AttackConfig:
    """Attack simulation (robustness studies). A ``fraction`` of the clients, chosen from the run
    seed, is malicious: ``scale`` sends ``scale × Δ``, ``sign_flip`` sends ``−scale × Δ`` (scale 1:
    a plain sign flip), ``random`` sends Gaussian noise of std ``noise_std`` per coordinate instead
    of its update, ``label_flip`` trains honestly on permuted labels (a seeded derangement of the
    classes, train split only). The summary then reports ``honest_test_*`` and
    ``malicious_clients``."""

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
    ``failed_clients``."""

    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class TaskConfig:
    """``name`` picks a registered task; the remaining keys are that task's own options."""

    name: str = "digits"
    options: Any = None

    def option(self, key: str, default: Any = None) -> Any:
        return getattr(self.options, key, default)


@dataclass(frozen=True)
class RunConfig:
    method: str = "pfedhn"
    seed: int = 0
    rounds: int = 100
    clients_per_round: int = 5
    eval_every: int = 25
    checkpoint_every: int = 0  # 0: only at the end
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
    # per-method options, keyed by method name (only the active method's are used)
    methods: Mapping[str, Any] = field(default_factory=dict)
    # the optuna search space: parameter path → distribution table (used by `shn sweep`)
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


def read_config(path: str | Path) -> dict[str, Any]:
    """A config file as a dict with its inheritance resolved: ``base = "other.toml"`` (a path
    relative to the file that names it) is read first, recursively; this file's keys override
    it, tables merged key by key (any other value, lists included, replaces); ``base`` itself is
    dropped. A missing base file or a cycle of bases raises ``ConfigError`` naming the files."""
    return _with_bases(Path(path), ())


def _with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    data = read_toml(path)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: expected the path of another TOML config (relative to this file), got {base!r}")
    base_path = path.parent / base
    chain = chain + (path,)
    if base_path.resolve() in {p.resolve() for p in chain}:
        raise ConfigError("config base cycle: " + " -> ".join(str(p) for p in chain + (base_path,)))
    if not base_path.is_file():
        raise ConfigError(f"{path}: base {base!r} not found (looked for {base_path})")
    return _merged(_with_bases(base_path, chain), data)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: where both hold a table, merged recursively; else ``over`` wins."""
    out = dict(base)
    for key, value in over.items():
        both_tables = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merged(out[key], value) if both_tables else value
    return out


def read_toml(path: str | Path, what: str = "config", error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file raises ``error`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} file not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML ({e})") from None


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
    task_table = dict(data.pop("task", {}) or {})
    methods_table = dict(data.pop("methods", {}) or {})
    sweep = data.pop("sweep", {}) or {}
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
            if isinstance(value, float) and value.is_integer():
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


# --------------------------------------------------------------------------------------------
# writing back (the run directory's resolved config.toml)

def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "task":
            table = {"name": value.name}
            if value.options is not None:
                table.update(_plain(value.options))
            out["task"] = table
        elif f.name == "methods":
            if value:
                out["methods"] = {k: _plain(v) for k, v in value.items()}
        elif f.name == "sweep":
            if value:
                out["sweep"] = dict(value)
        else:
            out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if getattr(value, f.name) is not None}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


def dumps_toml(data: Mapping[str, Any]) -> str:
    """A minimal TOML writer for config dicts (scalars, lists, nested tables)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return _toml_string(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{ " + ", ".join(f"{_key(k)} = {scalar(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {v!r} to TOML")

    def table(prefix: str, d: Mapping[str, Any]) -> None:
        simple = {k: v for k, v in d.items() if not isinstance(v, Mapping)}
        nested = {k: v for k, v in d.items() if isinstance(v, Mapping)}
        if prefix and (simple or not nested):
            lines.append(f"\n[{prefix}]")
        for k, v in simple.items():
            lines.append(f"{_key(k)} = {scalar(v)}")
        for k, v in nested.items():
            table(f"{prefix}.{_key(k)}" if prefix else _key(k), v)

    table("", data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _key(k: str) -> str:
    bare = k.replace("_", "").replace("-", "")
    return k if bare.isascii() and bare.isalnum() else _toml_string(k)


def _toml_string(v: str) -> str:
    """A TOML basic string: quote, backslash and control characters (but tab) escaped."""
    out = []
    for ch in v:
        if ch in '"\\':
            out.append("\\" + ch)
        elif (ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


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
    "AttackConfig",
    "ConfigError",
    "EncoderConfig",
    "FaultConfig",
    "GraphConfig",
    "HyperNetworkConfig",
    "LocalConfig",
    "NovelConfig",
    "RunConfig",
    "ServerConfig",
    "TaskConfig",
    "ValidationConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dumps_toml",
    "load_config",
    "read_config",
]
