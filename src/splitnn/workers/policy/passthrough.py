"""The pass-through heuristic: does a segment look like it hands its input on unchanged?

For parties that do not pin fingerprints (``refuse_passthrough``): :func:`passthrough_reason`
reads the segment's layers (a graph's ops) in order. A researcher who wants to leak the data can
still find a map it does not recognise (a learned one, even): pinning ``accept_segments`` is the
guard that holds, and a pinned segment is not judged by the heuristic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from splitnn.errors import SpecError
from splitnn.wire.spec import canonical_spec

__all__ = ["passthrough_reason"]


def _kinds(**groups: Iterable[str]) -> dict[str, str]:
    """Name -> kind, from kind -> names (the groups do not overlap)."""
    return {name: kind for kind, names in groups.items() for name in names}


def _dims(pattern: str, *dims: int) -> list[str]:
    return [pattern.format(d) for d in dims]


#: What a layer does to the values it reads: ``shape`` moves or copies them (a permutation, a reshape,
#: padding); ``invertible`` is an element-wise or per-channel bijection (it hides nothing); ``clip`` loses
#: information once values can be negative (after a weighted layer); ``pool`` loses information on any input.
_LAYER_KINDS = _kinds(
    shape=[
        "Identity", "Flatten", "Unflatten", "AlphaDropout", "FeatureAlphaDropout", "PixelShuffle", "PixelUnshuffle",
        "ChannelShuffle", "Upsample", "Dropout", *_dims("Dropout{}d", 1, 2, 3),
        *(f"{pad}Pad{d}d" for pad in ("Zero", "Constant", "Reflection", "Replication", "Circular") for d in (1, 2, 3)),
    ],
    invertible=[
        *_dims("BatchNorm{}d", 1, 2, 3), *_dims("InstanceNorm{}d", 1, 2, 3), "LayerNorm", "GroupNorm", "LeakyReLU",
        "PReLU", "Sigmoid", "Tanh", "ELU", "SELU", "CELU", "Softplus", "Softsign", "LogSigmoid", "Softmax",
        "LogSoftmax",
    ],
    clip=["ReLU", "ReLU6", "Hardtanh", "Hardsigmoid", "Hardswish", "GELU", "SiLU", "Mish", "Threshold", "RReLU"],
    pool=[
        *(f"{pool}Pool{d}d" for pool in ("Max", "AdaptiveMax", "Avg", "AdaptiveAvg") for d in (1, 2, 3)),
        "LPPool1d", "LPPool2d",
    ],
)  # fmt: skip
_WEIGHTED = {"Linear", "Bilinear", *_dims("Conv{}d", 1, 2, 3), *_dims("ConvTranspose{}d", 1, 2, 3)}

#: The same for functions and tensor methods in a graph segment (torch.*, torch.nn.functional.*, operator.*).
_FN_KINDS = _kinds(
    shape=[
        "flatten", "reshape", "view", "permute", "transpose", "contiguous", "getitem", "unsqueeze", "squeeze", "cat",
        "stack", "clone", "dropout", "pad", "size", "getattr", "to", "float", "double", "half", "t", "flip", "roll",
        "chunk", "split", "expand", "repeat",
    ],
    invertible=[
        "add", "sub", "mul", "truediv", "neg", "pos", "batch_norm", "layer_norm", "group_norm", "sigmoid", "tanh",
        "leaky_relu", "elu", "selu", "softplus", "softmax", "log_softmax", "exp",
    ],
    clip=["relu", "relu_", "relu6", "hardtanh", "gelu", "silu", "mish", "threshold", "hardswish", "clamp"],
    pool=[
        *_dims("max_pool{}d", 1, 2, 3), *_dims("avg_pool{}d", 1, 2, 3), "adaptive_avg_pool1d", "adaptive_avg_pool2d",
        "adaptive_max_pool2d", "mean", "sum", "amax", "max", "min",
    ],
    weighted=["linear", "conv1d", "conv2d", "matmul", "mm", "bmm"],
)  # fmt: skip


def passthrough_reason(spec: Mapping[str, Any]) -> str | None:
    """Why segment ``spec`` looks like it passes its input through, or ``None`` when it does not.

    A heuristic over the segment's layers in order (graphs: their ops in order). It refuses a
    segment unless, after its first weighted layer (Linear, Conv...), some layer loses
    information: a clipping nonlinearity (ReLU, GELU, ...), pooling, or a weighted layer that
    narrows (fewer outputs than inputs). Pooling, or a narrowing weighted layer, counts anywhere;
    a ReLU on the raw input does not (non-negative data, like pixels, passes a ReLU unchanged).
    So it refuses: nothing but identity, flatten, reshape, permutation or padding; a first
    weighted layer at least as wide as its input followed only by invertible maps (batch norm,
    sigmoid, tanh, leaky ReLU, softmax, ...); and layers it does not know (it cannot judge them:
    pin such a segment's fingerprint instead).
    """
    try:
        layers = canonical_spec(spec)["layers"]
    except SpecError as exc:
        return f"its spec is not valid ({exc})"
    steps = list(_steps(layers))
    unknown = [name for kind, name in steps if kind == "unknown"]
    if unknown:
        return f"it holds {_names(unknown)}, which the heuristic cannot judge"
    weighted = False
    for kind, _name in steps:
        if kind in ("pool", "narrowing"):
            return None
        if kind == "clip" and weighted:
            return None
        if kind in ("weighted", "narrowing"):
            weighted = True
    names = [name for _, name in steps]
    if not steps or all(kind in ("shape", "invertible") for kind, _ in steps):
        return f"it only moves values around ({_names(names) if names else 'no layers'})"
    if not any(kind == "weighted" for kind, _ in steps):
        return f"its layers ({_names(names)}) lose nothing of non-negative data"
    return (
        f"its first weighted layer is at least as wide as its input and nothing after it loses information "
        f"({_names(names)}): an invertible map"
    )


def _names(names: Sequence[str]) -> str:
    shown = list(dict.fromkeys(names))
    return ", ".join(shown[:6]) + (", ..." if len(shown) > 6 else "")


def _steps(layers: Sequence[Mapping[str, Any]]) -> Iterable[tuple[str, str]]:
    for layer in layers:
        yield from _layer_steps(layer)


def _layer_steps(layer: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    if "import" in layer:
        module, _, cls = str(layer["import"]).partition(":")
        name = cls.rsplit(".", 1)[-1]
        if module.startswith("torch.nn.") and name in _LAYER_KINDS:
            yield _LAYER_KINDS[name], name
        else:
            yield "unknown", cls or str(layer["import"])
        return
    type_name = layer.get("type")
    if type_name == "Sequential":
        yield from _steps(layer.get("layers", []))
        return
    if type_name == "Graph":
        yield from _graph_steps(layer)
        return
    if type_name in _WEIGHTED:
        yield ("narrowing" if _narrows(layer) else "weighted"), type_name
        return
    if type_name in _LAYER_KINDS:
        kind = _LAYER_KINDS[type_name]
        yield ("shape" if kind == "pool" and not _pool_reduces(layer) else kind), type_name
        return
    yield "unknown", str(type_name)


def _pair(v: Any) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _narrows(layer: Mapping[str, Any]) -> bool:
    """Whether a weighted layer gives fewer values than it reads (per position, for convolutions)."""
    t = layer["type"]
    if t == "Linear":
        return layer["out_features"] < layer["in_features"]
    if t == "Conv2d":
        sh, sw = _pair(layer.get("stride", 1))
        return layer["out_channels"] < layer["in_channels"] * sh * sw
    return False  # transposed convolutions and others widen, or cannot be told without shapes


def _pool_reduces(layer: Mapping[str, Any]) -> bool:
    if layer["type"] in ("MaxPool2d", "AvgPool2d"):
        k = _pair(layer.get("kernel_size"))
        stride = layer.get("stride")
        s = _pair(stride) if stride is not None else k
        return any(x > 1 for x in (*k, *s))
    return True


def _graph_steps(spec: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    modules = spec.get("modules", {})
    for node in spec.get("nodes", []):
        op = node.get("op")
        if op in ("placeholder", "output", "get_attr"):
            continue
        target = str(node.get("target", ""))
        if op == "call_module":
            sub = modules.get(target)
            yield from (_layer_steps(sub) if isinstance(sub, Mapping) else [("unknown", target)])
            continue
        name = target.rsplit(".", 1)[-1]
        yield _FN_KINDS.get(name, "unknown"), name
