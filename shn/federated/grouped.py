"""A cohort of C clients run as ONE convolutional network (``local.mode = "grouped"``).

Each ``Conv2d`` of the template becomes one grouped convolution — the clients' weights stacked
along groups, their inputs along channels (``[B, C·channels, H, W]``), channels-last — and each
``Linear`` one batched matmul over the clients. Between layers, activations stay in one of two
layouts:

* *packed* ``[B, C·channels, H, W]`` (channels-last memory): what convolutions and pooling take;
  pooling and elementwise activations never mix channels, so they act on every client at once.
* *client-major* ``[C, B, *features]``: what linear layers (``bmm``) and the loss take.

Why: on CPU a per-client loop pays, per client and step, for NCHW max-pooling that costs more
than the convolution forward before it (``experiments/profile_cnn_step.py``; channels-last
pooling is 5–10× cheaper), plus one OpenMP fork/join per op and client, which on a loaded
machine waits for descheduled threads. The grouped network does each layer once per step for a
chunk of clients, channels-last.

The template is read once with ``torch.fx``; only the layers below are supported, so a target that
uses anything else is reported by :func:`grouped_unsupported` (``auto`` then takes the per-client
loop). The maths is the template's: the same per-client outputs up to float rounding (a different
summation order inside the kernels); ``tests/test_grouped.py`` bounds the difference.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

Params = Mapping[str, Tensor]

# elementwise ops: layout-agnostic, applied to the whole cohort as they are
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, torch.tanh, torch.sigmoid, F.gelu, F.elu, F.leaky_relu, F.silu}
_ELEMENTWISE_MODULES = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.Identity)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d}
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d)

PACKED, CLIENT_MAJOR = "packed", "client_major"


class _Unsupported(Exception):
    pass


def _trace(template: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(template)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "not supported"
        raise _Unsupported(f"torch.fx cannot trace {type(template).__name__}: {exc}") from exc


def _check_node(gm: fx.GraphModule, node: fx.Node) -> None:
    """Raise _Unsupported unless the grouped network can run ``node``."""
    if node.op in ("placeholder", "output"):
        if node.op == "placeholder" and len([n for n in gm.graph.nodes if n.op == "placeholder"]) != 1:
            raise _Unsupported("the target takes more than one input")
        return
    if not node.args or not isinstance(node.args[0], fx.Node) or any(
            isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        raise _Unsupported(f"{node.name}: only single-input layers are supported ({node.op} {node.target})")
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                raise _Unsupported(f"{node.target}: Conv2d with padding {mod.padding!r}/{mod.padding_mode!r}")
            return
        if isinstance(mod, nn.Linear) or isinstance(mod, _ELEMENTWISE_MODULES):
            return
        if isinstance(mod, _POOL_MODULES):
            if getattr(mod, "return_indices", False):
                raise _Unsupported(f"{node.target}: pooling with return_indices")
            return
        if isinstance(mod, nn.Flatten):
            if mod.start_dim < 1 and mod.start_dim != -1:
                raise _Unsupported(f"{node.target}: Flatten over the batch dimension")
            return
        raise _Unsupported(f"{node.target}: {type(mod).__name__} layers are not supported")
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            if node.kwargs.get("inplace"):
                raise _Unsupported(f"{node.name}: in-place activation")
            return
        if node.target in _POOL_FUNCTIONS:  # F.max_pool2d: the boolean_dispatch wrapper fx records
            if node.kwargs.get("return_indices"):
                raise _Unsupported(f"{node.name}: pooling with return_indices")
            return
        if node.target is torch.flatten:
            _flatten_dims(node)
            return
        raise _Unsupported(f"{node.name}: function {getattr(node.target, '__name__', node.target)} is not supported")
    if node.op == "call_method" and node.target == "flatten":
        _flatten_dims(node)
        return
    raise _Unsupported(f"{node.name}: {node.op} {node.target} is not supported")


def _flatten_dims(node: fx.Node) -> tuple[int, int]:
    args = list(node.args[1:]) + [None] * 2
    start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
    end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
    if not isinstance(start, int) or not isinstance(end, int) or start == 0 or start < -1 or end == 0:
        raise _Unsupported(f"{node.name}: flatten({start}, {end}) must keep the batch dimension")
    return start, end


def grouped_unsupported(template: nn.Module) -> str | None:
    """Why ``template`` cannot run grouped (one line), or None when it can."""
    try:
        gm = _trace(template)
        for node in gm.graph.nodes:
            _check_node(gm, node)
    except _Unsupported as exc:
        return str(exc)
    if not any(isinstance(m, nn.Conv2d) for m in template.modules()):
        return f"{type(template).__name__} has no Conv2d layer (grouped execution is for convolutional targets)"
    return None


# -- layouts ------------------------------------------------------------------------------------

def _packed(t: Tensor, layout: str, clients: int) -> Tensor:
    """``[B, C·ch, H, W]`` channels-last from either layout (one copy at most)."""
    if layout == PACKED:
        return t
    if t.dim() != 5:
        raise ValueError(f"a convolution or pooling layer needs [B, channels, H, W] per client, got {tuple(t.shape[1:])}")
    c, b, ch, h, w = t.shape
    # memory order [B, H, W, C, ch] is exactly channels-last [B, C·ch, H, W]; for one client the
    # reshape is a view of NCHW memory, hence the explicit channels-last (a no-op otherwise)
    packed = t.permute(1, 3, 4, 0, 2).reshape(b, h, w, c * ch).permute(0, 3, 1, 2)
    return packed.contiguous(memory_format=torch.channels_last)


def _cpu_bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _packed_even(t: Tensor) -> Tensor:
    """``[C, B, ch, H, W]`` (ch odd) packed as ``[B, C·(ch+1), H, W]`` channels-last in bfloat16, one
    zero channel after each client's: in one copy with the cast autocast would make anyway. With
    the weights given a zero input channel too, the outputs are those of the unpadded convolution
    bit for bit (the extra products are exact zeros); oneDNN's bfloat16 kernels multiply channels
    in pairs, and pFedHN's RGB convolution ran 7 % faster so (3 % of a grouped step, 2 threads)."""
    c, b, ch, h, w = t.shape
    buf = torch.zeros(b, h, w, c, ch + 1, dtype=torch.bfloat16, device=t.device)
    buf[..., :ch].copy_(t.permute(1, 3, 4, 0, 2))
    return buf.view(b, h, w, c * (ch + 1)).permute(0, 3, 1, 2)


def _client_major(t: Tensor, layout: str, clients: int) -> Tensor:
    """``[C, B, *features]`` (a view of a packed tensor)."""
    if layout == CLIENT_MAJOR:
        return t
    return t.unflatten(1, (clients, -1)).transpose(0, 1)


class GroupedNet:
    """``net(params {name: [C, *shape]}, x [C, B, *input]) -> [C, B, *output]`` for a template that
    :func:`grouped_unsupported` accepts; the same outputs as C calls of the template, up to float
    rounding."""

    def __init__(self, template: nn.Module) -> None:
        reason = grouped_unsupported(template)
        if reason is not None:
            raise ValueError(f"local.mode = 'grouped' cannot run this target: {reason}")
        self.graph = _trace(template)
        self.modules = dict(self.graph.named_modules())
        self.relu_after_pool = self._relu_pool_pairs()

    def _relu_pool_pairs(self) -> dict[str, str]:
        """{relu node: the max-pool node right after it} where the ReLU feeds only that pool.

        ReLU and max-pooling commute (ReLU is monotone), so the grouped network pools first and
        applies the ReLU to a tensor 4× smaller (2×2 pools). Forward values and gradients are
        exactly the same: windows whose maximum is ≤ 0 pass no gradient either way, and positive
        values are unchanged by ReLU, so the pool selects the same element."""
        pairs = {}
        for node in self.graph.graph.nodes:
            if not self._is_max_pool(node):
                continue
            src = node.args[0]
            if len(src.users) == 1 and self._is_relu(src):
                pairs[src.name] = node.name
        return pairs

    def _is_relu(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return type(self.modules[node.target]) is nn.ReLU
        return node.op == "call_function" and node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace")

    def _is_max_pool(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return type(self.modules[node.target]) is nn.MaxPool2d
        return node.op == "call_function" and node.target is F.max_pool2d

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        return self._run(params, x)

    def activation_numel(self, params: Params, x: Tensor) -> int:
        """The largest intermediate tensor's element count for ONE client of ``x [C, B, ...]``
        (a shape-only pass on the meta device): what sizes a chunk of clients."""
        sizes: list[int] = []
        self._run({k: torch.empty(v.shape[1:], device="meta").expand(1, *v.shape[1:]) for k, v in params.items()},
                  torch.empty(x.shape[1:], device="meta").expand(1, *x.shape[1:]), sizes)
        return max(sizes)

    def _run(self, params: Params, x: Tensor, sizes: list[int] | None = None) -> Tensor:
        clients = x.shape[0]
        env: dict[str, tuple[Tensor, str]] = {}

        def arg(a: Any) -> tuple[Tensor, str]:
            return env[a.name]

        deferred = set(self.relu_after_pool.values())
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = (x, CLIENT_MAJOR)
            elif node.op == "output":
                t, layout = arg(node.args[0])
                return _client_major(t, layout, clients)
            elif node.name in self.relu_after_pool:
                env[node.name] = arg(node.args[0])  # applied after the pool that follows
            elif node.op == "call_module":
                env[node.name] = self._module(node, params, *arg(node.args[0]), clients)
            else:
                env[node.name] = self._function(node, *arg(node.args[0]), clients)
            if node.name in deferred:
                t, layout = env[node.name]
                env[node.name] = (F.relu(t), layout)
            if sizes is not None:
                sizes.append(env[node.name][0].numel())
        raise AssertionError("traced graph without output")  # pragma: no cover - fx always has one

    def _module(self, node: fx.Node, params: Params, t: Tensor, layout: str, clients: int) -> tuple[Tensor, str]:
        mod = self.modules[node.target]
        weight = params.get(f"{node.target}.weight")
        bias = params.get(f"{node.target}.bias")
        if isinstance(mod, nn.Conv2d):
            if layout == CLIENT_MAJOR and mod.groups == 1 and mod.in_channels % 2 and _cpu_bf16_autocast():
                t, weight, layout = _packed_even(t), F.pad(weight, (0, 0, 0, 0, 0, 1)), PACKED  # weights: a zero channel
            t = _packed(t, layout, clients)
            return F.conv2d(t, weight.flatten(0, 1), None if bias is None else bias.flatten(), mod.stride,
                            mod.padding, mod.dilation, mod.groups * clients), PACKED
        if isinstance(mod, nn.Linear):
            t = _client_major(t, layout, clients)
            flat = t.reshape(clients, -1, t.shape[-1])
            out = (torch.bmm(flat, weight.transpose(1, 2)) if bias is None
                   else torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2)))
            return out.reshape(*t.shape[:-1], out.shape[-1]), CLIENT_MAJOR
        if isinstance(mod, _POOL_MODULES):  # pooling never mixes channels: the packed cohort as is
            return mod(_packed(t, layout, clients)), PACKED
        if isinstance(mod, nn.Flatten):
            return _flatten(t, layout, clients, mod.start_dim, mod.end_dim), CLIENT_MAJOR
        return mod(t), layout  # elementwise

    def _function(self, node: fx.Node, t: Tensor, layout: str, clients: int) -> tuple[Tensor, str]:
        rest, kwargs = node.args[1:], dict(node.kwargs)
        if node.op == "call_method" or node.target is torch.flatten:
            start, end = _flatten_dims(node)
            return _flatten(t, layout, clients, start, end), CLIENT_MAJOR
        if node.target in _POOL_FUNCTIONS:
            return node.target(_packed(t, layout, clients), *rest, **kwargs), PACKED
        return node.target(t, *rest, **kwargs), layout  # elementwise


def _flatten(t: Tensor, layout: str, clients: int, start: int, end: int) -> Tensor:
    """The template's ``x.flatten(start, end)`` on ``[B, ...]`` as a flatten of ``[C, B, ...]``."""
    t = _client_major(t, layout, clients)
    shift = lambda d: d + 1 if d >= 0 else d  # noqa: E731 - one more leading dim (clients)
    return t.flatten(shift(start), shift(end))


def grouped_loss(net: GroupedNet, loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``f(params, x [C, B, ...], *targets [C, B, ...]) -> [C]``: each client's loss on its batch."""
    per_client = torch.func.vmap(loss)

    def f(params: Params, x: Tensor, *targets: Tensor) -> Tensor:
        return per_client(net(params, x), *targets)

    return f


__all__ = ["GroupedNet", "grouped_unsupported", "grouped_loss"]
