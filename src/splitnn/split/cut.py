"""Cutting a user's ``nn.Module`` into the segments of a split network: :func:`cut`.

``cut(model, at=["layer2", "layer3"])`` returns three segments; each cut falls *before* the named
submodule runs. The ways of cutting (sequential slices, the fx graph, ``torch.export``), what crosses a
cut, how names and weights are kept and the errors raised are in :func:`cut`'s docstring.
"""

from __future__ import annotations

import copy
import difflib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import fx, nn

from splitnn.errors import ConfigurationError
from splitnn.split.exported import (
    devices_follow_inputs,
    export_graph,
    mark_non_persistent,
    module_partition,
    recomputable,
    substitute_size,
)

__all__ = ["cut", "join", "merge_states", "segment_arity"]

Leaf = type | str
_SYM_SIZE = torch.ops.aten.sym_size.int


def cut(
    model: nn.Module,
    at: Sequence[str] | str,
    *,
    leaves: Iterable[Leaf] = (),
    example: object = None,
    output: str | int | None = None,
) -> list[nn.Module]:
    """Cut ``model`` into ``len(at) + 1`` segments, each cut falling before the submodule ``at[i]`` runs.

    ``cut(model, at=["layer2", "layer3"])`` returns three segments. A cut point names a
    submodule by its path (as in ``model.named_modules()``); the cut falls *before* that
    submodule runs, the convention of ``torch.distributed.pipelining``'s
    ``SplitPoint.BEGINNING``.

    Three ways of cutting, chosen per call:

    * **Sequential, directly.** When every cut point is reached through ``nn.Sequential``
      containers only (``"3"``, ``"features.7"``), the containers are sliced; no tracing.
      Each segment is an ``nn.Sequential`` whose children keep their names, nested
      containers included, so its state-dict keys are the original model's keys
      (``features.7.weight`` stays ``features.7.weight``).
    * **Any other module, on its fx graph.** The model is traced with ``torch.fx`` by a
      tracer that drops a marker into the graph when a cut-point module is called (what
      ``pipe_split()`` does for pipelining). The nodes between markers form the segments;
      each segment is a ``torch.fx.GraphModule`` holding the submodules it calls under their
      original paths, so again its state-dict keys are the original keys.

    * **Through ``torch.export``, given ``example=``** (a batch of the model's inputs): the model is
      exported in non-strict mode and its graph of ATen operations is cut before the first operation
      run inside each cut point (what ``torch.distributed.pipelining.pipeline()`` does); this cuts
      what fx cannot trace -- Hugging Face transformers, ``nn.TransformerEncoder`` between its
      layers. Values that need no data (positions, masks built from sizes, buffers, sizes) are
      recomputed in the segment that uses them instead of crossing; ``output=`` picks the tensor of a
      ``ModelOutput`` the loss takes. See :mod:`splitnn.split.exported`.

    Values crossing a cut. Every value computed before a cut and used after it crosses
    that cut: a residual block cut in the middle sends its hidden activation *and* its
    shortcut. A segment then returns a tuple and the next one takes the tuple's items as
    positional arguments; when exactly one value crosses, it stays a plain tensor. A value
    produced in segment 0 and used in segment 2 travels through segment 1 as a
    pass-through output: in split learning each cut is a link between adjacent parties, so
    a party never receives a tensor from a party it is not next to. (``torch.fx.passes.
    split_module`` wires such a value straight from the first partition to the third,
    which is right for one process and wrong here; that is why the partitioning is our own.)

    Names and weights. ``cut`` works on a deep copy: training the segments leaves
    ``model`` as it was. Parameters a segment uses keep their original names, so
    ``SplitNN.collect_state()`` (or ``merge_states(segments)``) gives back a state dict that
    ``model.load_state_dict`` accepts. Parameters the forward never uses belong to no
    segment and are not in it.

    Errors, raised here before anything trains, name the path or node and the fix: a cut
    point that does not exist (with close names), cut points out of execution order, a
    model fx cannot trace, a segment that would be empty, a parameter used on both sides of
    a cut (tied weights).

    Args:
        model: any ``nn.Module``; it is copied, never changed.
        at: submodule paths in execution order, e.g. ``["layer2", "layer3"]`` or ``["features.7"]``.
        leaves: module classes or paths that tracing keeps whole (a ``call_module`` node)
            instead of tracing through: modules with data-dependent control flow, or custom
            blocks a remote party builds from trusted code (``splitnn worker --trust``).
            ``torch.nn`` layers are always kept whole. A cut cannot fall inside a leaf.
        example: the model's input for ``torch.export`` (a tensor, a tuple of positional inputs, or a
            dict of keyword inputs such as ``{"input_ids": ids}``; a batch of 2 or more rows). Given,
            the model is traced by ``torch.export`` (non-strict) instead of ``torch.fx``: what
            Hugging Face transformers, ``nn.TransformerEncoder`` (cut between its layers) and other
            models fx cannot trace need. See :mod:`splitnn.split.exported`.
        output: with ``example``, the tensor of the model's output the loss takes: a key of a
            ``ModelOutput`` or dict (``"logits"``), or an index of a tuple. Default: the output
            when it is one tensor (a Hugging Face model without labels and with ``use_cache=False``
            returns only ``logits``).

    Returns:
        The segments, in order: ``nn.Sequential`` slices for a sequential model, else
        ``torch.fx.GraphModule``s (see above).

    Raises:
        ConfigurationError: naming the cut point, node or parameter at fault and the fix.
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"cut() takes an nn.Module, got {type(model).__name__}")
    paths = [at] if isinstance(at, str) else list(at)
    if not paths:
        raise ConfigurationError("cut() needs at least one cut point: at=['layer2'] cuts before model.layer2")
    names = dict(model.named_modules(remove_duplicate=False))
    for p in paths:
        if not isinstance(p, str):
            raise ConfigurationError(f"cut points are submodule paths (strings), got {p!r}")
        if p == "":
            raise ConfigurationError("cut point '' is the whole model: nothing runs before it; name a submodule")
        if p not in names:
            close = difflib.get_close_matches(p, [n for n in names if n], n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigurationError(
                f"cut point {p!r} is not a submodule of {type(model).__name__}.{hint} "
                f"Cut points are paths as listed by model.named_modules()."
            )
    dupes = sorted({p for p in paths if paths.count(p) > 1})
    if dupes:
        raise ConfigurationError(f"cut point {dupes[0]!r} is given twice; each cut needs its own point")
    leaf_list = list(leaves)
    for leaf in leaf_list:
        if isinstance(leaf, str) and leaf not in names:
            raise ConfigurationError(f"leaf {leaf!r} is not a submodule of {type(model).__name__}")
        if not isinstance(leaf, (str, type)):
            raise ConfigurationError(f"leaves are module classes or paths, got {leaf!r}")
    if example is None and output is not None:
        raise ConfigurationError("output= chooses among the outputs of an exported model; give example= too")
    model = copy.deepcopy(model)
    positions = _sequential_positions(model, paths) if example is None else None
    if example is not None:
        if leaf_list:
            raise ConfigurationError("leaves= applies to torch.fx tracing; torch.export (example=) traces every module")
        segments = _cut_exported(model, paths, example, output)
    elif positions is not None:
        segments: list[nn.Module] = _cut_sequential(model, paths, positions)
    else:
        segments = _cut_graph(model, paths, leaf_list)
    _check_untied(segments, paths)
    return segments


# ----------------------------------------------------------------------------- sequential


def _sequential_positions(model: nn.Module, paths: list[str]) -> list[tuple[int, ...]] | None:
    """Each path as child indices through nested ``nn.Sequential``s, or ``None`` if one leaves them."""
    positions = []
    for p in paths:
        node, pos = model, []
        for part in p.split("."):
            if type(node) is not nn.Sequential:
                return None
            keys = list(node._modules)
            if part not in keys:
                return None
            pos.append(keys.index(part))
            node = node._modules[part]
        while pos and pos[-1] == 0:  # "features.0" is the same cut as "features"
            pos.pop()
        positions.append(tuple(pos))
    return positions


def _cut_sequential(model: nn.Sequential, paths: list[str], positions: list[tuple[int, ...]]) -> list[nn.Module]:
    _check_order(paths, positions, "the sequential model")
    bounds: list[tuple[int, ...] | None] = [None, *positions, None]
    segments = []
    for i in range(len(bounds) - 1):
        seg = _slice(model, bounds[i], bounds[i + 1])
        if not any(not isinstance(m, nn.Sequential) for m in seg.modules()):
            raise ConfigurationError(_empty_segment_message(i, paths))
        segments.append(seg)
    return segments


def _slice(seq: nn.Sequential, lo: tuple[int, ...] | None, hi: tuple[int, ...] | None) -> nn.Sequential:
    """Children of ``seq`` from position ``lo`` (inclusive) to ``hi`` (exclusive), names kept."""
    out: list[tuple[str, nn.Module]] = []
    for i, (name, child) in enumerate(seq._modules.items()):
        if (lo and i < lo[0]) or (hi is not None and (not hi or i > hi[0])):
            continue
        sub_lo = lo[1:] if lo and i == lo[0] else None
        sub_hi = hi[1:] if hi and i == hi[0] else None
        if hi and i == hi[0] and not sub_hi:
            continue  # the cut falls before this child
        if sub_lo or sub_hi is not None:
            out.append((name, _slice(child, sub_lo or None, sub_hi)))
        else:
            out.append((name, child))
    return nn.Sequential(OrderedDict(out))


# ----------------------------------------------------------------------------- fx


def _cut_marker(path: str) -> None:
    """Placeholder function whose call nodes mark where a cut falls (never executed)."""


class _CutTracer(fx.Tracer):
    def __init__(self, cut_paths: set[str], leaves: list[Leaf]) -> None:
        super().__init__()
        self.cut_paths = cut_paths
        self.leaf_paths = {x for x in leaves if isinstance(x, str)}
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.called_leaves: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if path in self.cut_paths:
            self.create_proxy("call_function", _cut_marker, (path,), {})
        if self.is_leaf_module(m, path):
            self.called_leaves.append(path)
        return super().call_module(m, forward, args, kwargs)


def _trace(model: nn.Module, paths: list[str], leaves: list[Leaf]) -> fx.Graph:
    tracer = _CutTracer(set(paths), leaves)
    try:
        return tracer.trace(model)
    except Exception as exc:
        # the tracer's module stack is left as it was when tracing failed: the innermost entry is the culprit
        stack = [qual for qual, _ in tracer.module_stack.values() if qual]
        what = f"cannot cut {type(model).__name__}: torch.fx cannot trace it"
        why = f"{type(exc).__name__}: {exc}. Data-dependent control flow (an `if` on tensor values) cannot be traced"
        if stack:
            culprit = stack[-1]
            kind = type(model.get_submodule(culprit)).__name__
            fix = (
                "Fix: pass example=<a batch of inputs> to cut through torch.export, or "
                f"keep that module whole with cut(model, at=..., leaves=[{culprit!r}]) if it lies inside a "
                "segment and cut at module boundaries around it, or write the segments by hand and pass the list "
                "to splitnn.SplitNN"
            )
            raise ConfigurationError(f"{what} while tracing {culprit!r} ({kind}): {why}. {fix}") from exc
        fix = (
            "Fix: pass example=<a batch of inputs> to cut through torch.export, keep untraceable submodules whole "
            "with leaves=[...], or write the segments by hand and pass the list to splitnn.SplitNN"
        )
        raise ConfigurationError(f"{what}: {why}. {fix}") from exc


def _cut_graph(model: nn.Module, paths: list[str], leaves: list[Leaf]) -> list[nn.Module]:
    graph = _trace(model, paths, leaves)
    markers = [n for n in graph.nodes if n.op == "call_function" and n.target is _cut_marker]
    hit = [n.args[0] for n in markers]
    for p in paths:
        if p not in hit:
            raise ConfigurationError(_not_called_message(model, p, leaves))
        if hit.count(p) > 1:
            raise ConfigurationError(
                f"cut point {p!r} runs {hit.count(p)} times in {type(model).__name__}.forward; a cut before "
                "a module that runs more than once is ambiguous. Cut before another module"
            )
    _check_order(paths, [(hit.index(p),) for p in paths], f"{type(model).__name__}.forward")
    parts = _partition(graph)
    live = _crossing(graph, parts, len(paths) + 1)
    segments = []
    for k in range(len(paths) + 1):
        if not any(parts.get(n) == k for n in graph.nodes if n.op in ("call_module", "call_function", "call_method")):
            raise ConfigurationError(_empty_segment_message(k, paths))
        g = _segment_graph(graph, parts, live, k)
        segments.append(fx.GraphModule(model, g, class_name=f"Segment{k}"))
    return segments


def _partition(graph: fx.Graph) -> dict[fx.Node, int]:
    """Segment index of every node that computes a value (the markers advance it)."""
    parts: dict[fx.Node, int] = {}
    k = 0
    for n in graph.nodes:
        if n.op == "call_function" and n.target is _cut_marker:
            k += 1
        elif n.op == "placeholder":  # the model's inputs arrive at the first party
            parts[n] = 0
        elif n.op not in ("get_attr", "output"):  # attributes are read where they are used, never sent
            parts[n] = k
    return parts


def _crossing(
    graph: fx.Graph, parts: dict[fx.Node, int], count: int, rec: set[fx.Node] = frozenset()
) -> list[list[fx.Node]]:
    """``live[k]``: the values that cross cut ``k`` (from segment k to k+1), in graph order; the nodes of
    ``rec`` (recomputable) never cross."""
    live: list[list[fx.Node]] = [[] for _ in range(count - 1)]
    for n in graph.nodes:
        if n not in parts or n in rec:
            continue
        users = [u for u in n.users if not (rec and u.target is _SYM_SIZE)]  # sizes are read where they are used
        last = max((count - 1 if u.op == "output" else parts.get(u, parts[n]) for u in users), default=parts[n])
        for k in range(parts[n], last):
            live[k].append(n)
    return live


def _segment_graph(
    graph: fx.Graph, parts: dict[fx.Node, int], live: list[list[fx.Node]], k: int, rec: set[fx.Node] = frozenset()
) -> fx.Graph:
    """Segment ``k``'s graph: its inputs (the model's, or what crosses cut k-1), its nodes, the recomputable
    nodes of earlier segments it uses (``rec``), and what crosses cut k."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    extra = _recomputed(graph, parts, k, rec)

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env and a.op == "get_attr":  # read the attribute in this segment
            env[a] = g.node_copy(a)
        return env[a]

    if k == 0:
        for n in graph.nodes:
            if n.op == "placeholder":
                env[n] = g.node_copy(n)
    else:
        for n in live[k - 1]:
            env[n] = g.placeholder(n.name)
    last = k == len(live)
    members = {n for n in graph.nodes if n in extra or (parts.get(n) == k and n.op != "placeholder")}
    for n in graph.nodes:  # attributes first, in the model's order: the segment's parameters keep the model's order
        if n.op == "get_attr" and any(u in members or (last and u.op == "output") for u in n.users):
            env[n] = g.node_copy(n)
    for n in graph.nodes:
        if n.op == "output":
            if last:
                g.node_copy(n, lookup)
        elif n in extra or (parts.get(n) == k and n.op != "placeholder"):
            if n.target is _SYM_SIZE and n.args[0] not in env:  # a size read again from a tensor that is here
                env[n] = substitute_size(n, live[k - 1], g, env)
            else:
                env[n] = g.node_copy(n, lookup)
    if not last:
        out = [lookup(n) for n in live[k]]
        g.output(out[0] if len(out) == 1 else tuple(out))
    g.lint()
    return g


def _recomputed(graph: fx.Graph, parts: dict[fx.Node, int], k: int, rec: set[fx.Node]) -> set[fx.Node]:
    """The recomputable nodes of other segments that segment ``k``'s nodes use, with their own inputs."""
    if not rec:
        return set()
    extra: set[fx.Node] = set()
    todo = [
        a
        for n in graph.nodes
        if parts.get(n) == k or (n.op == "output" and k == max(parts.values()))
        for a in n.all_input_nodes
        if a in rec and a.op != "get_attr" and parts.get(a) != k
    ]
    while todo:
        a = todo.pop()
        if a in extra:
            continue
        extra.add(a)
        if a.target is _SYM_SIZE:
            continue  # read from a tensor that reaches segment k
        todo.extend(b for b in a.all_input_nodes if b.op != "get_attr" and parts.get(b) != k)
    return extra


def _cut_exported(model: nn.Module, paths: list[str], example: object, output: str | int | None) -> list[nn.Module]:
    """Cut ``model`` on its ``torch.export`` graph (:mod:`splitnn.split.exported`)."""
    saved = set(model.state_dict().keys())
    root = export_graph(model, example, output)
    graph = root.graph
    parts = module_partition(graph, paths, type(model).__name__)
    rec = recomputable(graph, root)
    live = _crossing(graph, parts, len(paths) + 1, rec)
    for k, values in enumerate(live):
        for n in values:
            if not isinstance(n.meta.get("val"), torch.Tensor):
                stack = list((n.meta.get("nn_module_stack") or {}).values())
                where = f" in {stack[-1][0]!r}" if stack else ""
                raise ConfigurationError(
                    f"node {n.name!r} ({n.target}{where}) computes a {type(n.meta.get('val')).__name__}, not a tensor, "
                    f"that is needed after cut {paths[k]!r}; only tensors cross a cut. Fix: cut at a block boundary "
                    "(before a module whose inputs are tensors)"
                )
    segments = []
    for k in range(len(paths) + 1):
        if not any(parts.get(n) == k for n in graph.nodes if n.op == "call_function"):
            raise ConfigurationError(_empty_segment_message(k, paths))
        seg_graph = _segment_graph(graph, parts, live, k, rec)
        devices_follow_inputs(seg_graph)  # made on the device of the segment's input, not the one traced on
        seg = fx.GraphModule(root, seg_graph, class_name=f"Segment{k}")
        mark_non_persistent(seg, saved)
        segments.append(seg)
    return segments


# ----------------------------------------------------------------------------- checks and messages


def _check_order(paths: list[str], positions: list[tuple[int, ...]], where: str) -> None:
    ranked = sorted(range(len(paths)), key=lambda i: positions[i])
    if ranked != list(range(len(paths))):
        run = [paths[i] for i in ranked]
        raise ConfigurationError(f"cut points are out of execution order; {where} runs them as {run}: give at={run}")
    for i in range(1, len(paths)):
        if positions[i] == positions[i - 1]:
            raise ConfigurationError(
                f"cut points {paths[i - 1]!r} and {paths[i]!r} fall at the same place: segment {i} would be "
                "empty; drop one of them"
            )


def _empty_segment_message(k: int, paths: list[str]) -> str:
    if k == 0:
        where = f"before cut point {paths[0]!r}"
    elif k == len(paths):
        where = f"after cut point {paths[-1]!r}"
    else:
        where = f"between cut points {paths[k - 1]!r} and {paths[k]!r}"
    return f"segment {k} would be empty: nothing runs {where}; move or drop that cut point"


def _not_called_message(model: nn.Module, path: str, leaves: list[Leaf]) -> str:
    parents = [".".join(path.split(".")[:i]) for i in range(1, path.count(".") + 1)]
    for parent in parents:
        m = model.get_submodule(parent)
        tracer = _CutTracer(set(), leaves)
        if tracer.is_leaf_module(m, parent):
            return (
                f"cut point {path!r} lies inside {parent!r} ({type(m).__name__}), which tracing keeps whole "
                f"(a torch.nn layer or one of leaves=); cut before {parent!r} instead, or pass example=<a batch of "
                "inputs> to cut through torch.export, which traces inside torch.nn layers"
            )
    return (
        f"cut point {path!r} ({type(model.get_submodule(path)).__name__}) never runs as a module call in "
        f"{type(model).__name__}.forward (it is not called, or only its functions/attributes are used); "
        "cut before a module that forward calls"
    )


def _check_untied(segments: list[nn.Module], paths: list[str]) -> None:
    """Refuse a parameter or buffer that two segments share: it would live at two parties."""
    owner: dict[int, tuple[int, str]] = {}
    for k, seg in enumerate(segments):
        saved = set(seg.state_dict(keep_vars=True))  # a buffer the model does not save is a constant, read by all
        tensors = list(seg.named_parameters(remove_duplicate=False)) + list(seg.named_buffers(remove_duplicate=False))
        for name, t in tensors:
            if name not in saved and not isinstance(t, nn.Parameter):
                continue
            prev = owner.setdefault(id(t), (k, name))
            if prev[0] != k:
                raise ConfigurationError(
                    f"{prev[1]!r} (segment {prev[0]}) and {name!r} (segment {k}) are the same tensor: a "
                    f"parameter used on both sides of cut {paths[k - 1]!r} (tied weights) would live at two "
                    "parties. Move the cut so that every use of it falls in one segment, or untie the weights"
                )


# ----------------------------------------------------------------------------- back to one model


def segment_arity(segment: nn.Module) -> tuple[int, int]:
    """How many values ``segment`` takes and returns: ``(1, 1)`` unless it is a ``GraphModule``
    whose forward has several placeholders or returns a tuple."""
    if not isinstance(segment, fx.GraphModule):
        return 1, 1
    nodes = list(segment.graph.nodes)
    ins = sum(n.op == "placeholder" for n in nodes)
    out = next((n for n in reversed(nodes) if n.op == "output"), None)
    value = out.args[0] if out is not None and out.args else None
    return ins, len(value) if isinstance(value, (tuple, list)) else 1


def sequential_of(modules: Iterable[nn.Module]) -> nn.Sequential:
    """``modules`` in order as one ``nn.Sequential``, the layers of ``nn.Sequential`` modules spliced in."""
    layers: list[nn.Module] = []
    for module in modules:
        layers.extend(module.children() if isinstance(module, nn.Sequential) else [module])
    return nn.Sequential(*layers)


def join(segments: Sequence[nn.Module]) -> nn.Module | None:
    """One ``GraphModule`` running ``GraphModule`` segments in order, or ``None`` when they cannot be
    joined (not all graphs, or two segments hold different modules under one name).

    For :func:`cut`'s segments the joined module has the original model's state-dict keys.
    """
    if not segments or not all(isinstance(s, fx.GraphModule) for s in segments):
        return None
    g = fx.Graph()
    attrs: dict[str, object] = {}
    values: object = None
    for k, seg in enumerate(segments):
        env: dict[fx.Node, fx.Node] = {}
        nodes = list(seg.graph.nodes)
        inputs = [n for n in nodes if n.op == "placeholder"]
        if k == 0:
            for n in inputs:
                env[n] = g.node_copy(n)
        else:
            given = list(values) if isinstance(values, (tuple, list)) else [values]
            if len(given) != len(inputs):
                return None
            env.update(zip(inputs, given))
        for n in nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                values = fx.node.map_arg(n.args[0], env.__getitem__)
                break
            if n.op in ("call_module", "get_attr"):
                obj = _get_path(seg, n.target)
                if attrs.setdefault(n.target, obj) is not obj:
                    return None
            env[n] = g.node_copy(n, env.__getitem__)
    g.output(values)
    return fx.GraphModule(attrs, g, class_name="Joined")


def _get_path(module: nn.Module, target: str) -> object:
    obj: object = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def merge_states(states: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One state dict from the segments' state dicts; for :func:`cut`'s segments, under the original
    model's names (``model.load_state_dict(merge_states(s.state_dict() for s in segments))``).

    Raises :class:`ConfigurationError` when two segments use one name (hand-written segments:
    use ``SplitNN.collect()`` and its positional names instead).
    """
    merged: dict[str, torch.Tensor] = {}
    for i, state in enumerate(states):
        for name, value in state.items():
            if name in merged:
                raise ConfigurationError(
                    f"two segments both hold a tensor named {name!r} (segment {i} and an earlier one); their names "
                    "do not come from one model (segments from splitnn.cut keep the model's names)"
                )
            merged[name] = value
    return merged
