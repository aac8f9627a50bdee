"""Tracing a model with ``torch.export`` for :func:`splitnn.cut`: models ``torch.fx`` cannot trace.

``cut(model, at=[...], example=...)`` traces ``model`` with ``torch.export.export`` in non-strict
mode on the example inputs (the way ``torch.distributed.pipelining.pipeline()`` traces a model
before splitting it) and cuts the resulting graph of ATen operations. This module holds what is
particular to that graph:

* :func:`export_graph`: the exported program as a ``GraphModule`` whose parameters and buffers
  keep the model's own names (``ExportedProgram.module()``), the batch dimension of every input
  left dynamic (so any batch size runs), export's guard and metadata checks dropped, and the
  output reduced to the one tensor the loss takes (``output=``: a key of a ``ModelOutput`` or
  dict, e.g. ``"logits"``; an index of a tuple), and every ``aten.view`` made an ``aten.reshape``
  (see :func:`views_as_reshapes`).
* :func:`module_partition`: which segment each node belongs to. A cut at ``"transformer.h.2"``
  falls before the first operation that runs inside that submodule (read from each node's
  ``nn_module_stack``), the convention of ``torch.distributed.pipelining``'s split points.
* :func:`recomputable`: the nodes that need no data: constants, masks and positions built from
  ``arange``/``full``, buffers that are not parameters, sizes (``sym_size``) and arithmetic on
  them. Such a value never crosses a cut: the segment that uses it computes it again (a size is
  read from a tensor that reaches that segment). Random operations are never recomputed.
* :func:`devices_follow_inputs`: export writes the device it traced on into factory calls and
  moves (``aten.arange(..., device=cpu)``, ``aten.to.device``); in each segment these read the
  device of the segment's input instead, so a segment runs on whatever device its party computes
  on (``VirtualWorker(device="cuda:0")``, ``splitnn worker --device``, the worker's meta-tensor
  memory check) and its graph names no device.

The mode of the layers is fixed when the model is exported: export it in the mode it trains in
(``model.train()``). Dropout and batch-norm layers then behave as in training for evaluation too,
so models cut this way should use neither (transformer fine-tuning recipes commonly set dropout to
0) or be evaluated on a model loaded with :meth:`~splitnn.SplitNN.collect_state`.
"""

from __future__ import annotations

import linecache
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import fx, nn

from splitnn.errors import ConfigurationError

__all__ = [
    "devices_follow_inputs",
    "export_graph",
    "mark_non_persistent",
    "module_partition",
    "recomputable",
    "substitute_size",
    "views_as_reshapes",
]

_aten = torch.ops.aten

#: operations whose result depends on torch's random generator: computed once, where they run
_RANDOM = {
    "dropout",
    "native_dropout",
    "feature_dropout",
    "alpha_dropout",
    "bernoulli",
    "rand",
    "randn",
    "randint",
    "rand_like",
    "randn_like",
    "randint_like",
    "randperm",
    "normal",
    "uniform",
    "multinomial",
    "exponential",
    "poisson",
}

#: checks that export puts into the graph (of the example's metadata): dropped, the segments check shapes themselves
_DROPPED = {"_assert_tensor_metadata"}


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    overload = getattr(target, "_overloadpacket", None)
    if overload is not None:
        name = overload.__name__
    return name.split(".")[0]


def _inputs(example: object) -> tuple[tuple, dict]:
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, tuple):
        return example, {}
    if isinstance(example, Mapping):
        return (), dict(example)
    raise ConfigurationError(
        f"example= is the model's input for tracing: a tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs (e.g. {{'input_ids': ids}}), got {type(example).__name__}"
    )


def export_graph(model: nn.Module, example: object, output: str | int | None) -> fx.GraphModule:
    """``model`` exported on ``example`` (see the module docstring); ConfigurationError naming the fix otherwise."""
    args, kwargs = _inputs(example)
    for name, t in [*((str(i), a) for i, a in enumerate(args)), *kwargs.items()]:
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] < 2:
            raise ConfigurationError(
                f"example input {name!r} has a batch of {t.shape[0]}; give an example batch of 2 or more rows so "
                "that the segments take any batch size (export fixes a dimension of size 1)"
            )
    shapes = torch.export.ShapesCollection()  # the batch dimension of every input tensor, by identity
    for t in [*args, *kwargs.values()]:
        if isinstance(t, torch.Tensor) and t.dim():
            shapes[t] = {0: torch.export.Dim.AUTO}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dynamic = shapes.dynamic_shapes(model, args, kwargs)
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigurationError(
            f"cannot cut {type(model).__name__}: torch.export cannot trace it on the example inputs"
            f"{_culprit(model, exc)} ({type(exc).__name__}: {first}). Fix: make that line traceable (no Python "
            "branch on tensor values: torch.where or torch.cond instead), or write the segments by hand and pass "
            "the list to splitnn.SplitNN"
        ) from exc
    gm = ep.module()
    graph = gm.graph
    for n in list(graph.nodes):
        if (n.op == "call_module" and n.target == "_guards_fn") or (
            n.op == "call_function" and _op_name(n) in _DROPPED and not n.users
        ):
            graph.erase_node(n)
    _select_output(graph, ep.call_spec.out_spec, output, type(model).__name__)
    views_as_reshapes(graph)
    graph.lint()
    _check_any_batch(gm, args, kwargs, type(model).__name__)
    return gm


def views_as_reshapes(graph: fx.Graph) -> None:
    """Every ``aten.view`` of a graph that writes into nothing becomes ``aten.reshape``: the same tensor wherever
    the view is valid (a view of it, no copy), and still valid where another kernel lays its input out otherwise.
    Export drops a ``.contiguous()`` that the eager kernel made unnecessary (CPU attention returns an output whose
    transpose is contiguous); a worker's memory check runs the graph on meta tensors, whose attention output is
    laid out otherwise, and a view there fails."""
    if any(_mutates(n) for n in graph.nodes):
        return
    for n in graph.nodes:
        if n.op == "call_function" and n.target is _aten.view.default:
            n.target = _aten.reshape.default


def _check_any_batch(gm: fx.GraphModule, args: tuple, kwargs: dict, model: str) -> None:
    """Run the exported graph once on a batch one row larger than the example (no gradients, the random
    streams and the buffers put back): a model whose export fixed the batch size fails here, not in training."""
    grown = [torch.cat([t, t[:1]]) if isinstance(t, torch.Tensor) and t.dim() else t for t in (*args, *kwargs.values())]
    batch = next((t.shape[0] for t in grown if isinstance(t, torch.Tensor) and t.dim()), None)
    if batch is None:
        return
    g = fx.Graph()  # the graph with plain inputs and output (export's module takes and returns pytrees)
    g.output(g.graph_copy(gm.graph, {}))
    plain = fx.GraphModule(gm, g)
    buffers = {k: v.clone() for k, v in gm.state_dict(keep_vars=False).items()}
    try:
        with torch.no_grad(), torch.random.fork_rng():
            out = plain(*grown)
        ok, why = out.shape[:1] == (batch,), f"gave an output of shape {tuple(out.shape)}"
    except Exception as exc:  # a size baked into the graph no longer fits
        ok, why = (
            False,
            f"failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})",
        )
    finally:
        gm.load_state_dict(buffers, strict=False)
    if not ok:
        raise ConfigurationError(
            f"cannot cut {model}: torch.export fixed the batch size at the example's {batch - 1} rows (the model's "
            f"code makes a tensor of that size, e.g. torch.ones(x.shape[0], ...)); on {batch} rows its graph {why}. "
            "Fix: create such tensors from the input (torch.ones_like(x), x.new_ones(...)), or write the segments "
            "by hand"
        )


def _culprit(model: nn.Module, exc: BaseException) -> str:
    """`` at FILE:LINE in QUALNAME of module 'PATH': `CODE` ``: the innermost frame of the failed trace outside
    torch, and the submodule it ran for (empty when there is none)."""
    torch_dir = str(Path(torch.__file__).parent)
    paths = {id(m): name for name, m in model.named_modules()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if not frame.f_code.co_filename.startswith(torch_dir):
            found = (frame, tb.tb_lineno)
        tb = tb.tb_next
    if found is None or found[0].f_code.co_filename == __file__:
        return ""
    frame, line = found
    owner = frame.f_locals.get("self")
    where = f" of module {paths[id(owner)]!r} ({type(owner).__name__})" if paths.get(id(owner)) else ""
    code = linecache.getline(frame.f_code.co_filename, line).strip()
    return f" at {Path(frame.f_code.co_filename).name}:{line} in {frame.f_code.co_name}{where}: `{code}`"


def _select_output(graph: fx.Graph, spec: object, output: str | int | None, model: str) -> None:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    index = _leaf_index(spec, output, model)
    value = leaves[index]
    if not isinstance(value, fx.Node) or not isinstance(value.meta.get("val"), torch.Tensor):
        raise ConfigurationError(f"the output {output!r} of {model} is not a tensor; choose a tensor with output=")
    out.args = (value,)


def _keys(spec: object) -> list | None:
    context = getattr(spec, "context", None)
    if isinstance(context, (list, tuple)) and len(context) == spec.num_children:  # type: ignore[attr-defined]
        return list(context)
    return None


def _leaf_index(spec, output: str | int | None, model: str) -> int:
    if spec.is_leaf():
        if output is not None:
            raise ConfigurationError(f"{model} returns one tensor; drop output={output!r}")
        return 0
    keys = _keys(spec)
    children = list(spec.children())
    named = f"named {keys}" if keys is not None else f"{len(children)} values"
    if output is None:
        if spec.num_leaves == 1:
            return 0
        raise ConfigurationError(
            f"{model} returns {spec.type.__name__} with {named}; the loss takes one tensor: choose it with "
            f"output=, e.g. cut(..., output={keys[0]!r})"
            if keys
            else f"{model} returns {named}; choose the tensor the loss takes with output=<index>"
        )
    if isinstance(output, str):
        if keys is None or output not in keys:
            raise ConfigurationError(f"{model} has no output {output!r}; its outputs are {named}")
        i = keys.index(output)
    elif isinstance(output, int) and not isinstance(output, bool) and 0 <= output < len(children):
        i = output
    else:
        raise ConfigurationError(f"output= is a key or index of {model}'s outputs ({named}), got {output!r}")
    if not children[i].is_leaf():
        raise ConfigurationError(f"output {output!r} of {model} is not one tensor; choose a tensor with output=")
    return sum(c.num_leaves for c in children[:i])


def module_partition(graph: fx.Graph, paths: Sequence[str], model: str) -> dict[fx.Node, int]:
    """Segment index of every node that computes a value: cut ``k`` falls before the first node run inside
    ``paths[k]``. ConfigurationError for a cut point that runs no operation, runs twice, or out of order."""
    nodes = list(graph.nodes)
    first: dict[str, int] = {}
    calls: dict[str, set[str]] = {p: set() for p in paths}
    for i, n in enumerate(nodes):
        for key, entry in (n.meta.get("nn_module_stack") or {}).items():
            path = entry[0] if isinstance(entry, tuple) else entry
            if path in calls:
                first.setdefault(path, i)
                calls[path].add(key)
    for p in paths:
        if p not in first:
            raise ConfigurationError(
                f"cut point {p!r} runs no operation in {model}.forward (it is not called, or only its attributes "
                "are used); cut before a module that forward calls"
            )
        if len(calls[p]) > 1:
            raise ConfigurationError(
                f"cut point {p!r} runs {len(calls[p])} times in {model}.forward; a cut before a module that runs "
                "more than once is ambiguous. Cut before another module"
            )
    starts = [first[p] for p in paths]
    if starts != sorted(starts):
        run = sorted(paths, key=first.__getitem__)
        raise ConfigurationError(
            f"cut points are out of execution order; {model}.forward runs them as {run}: give at={run}"
        )
    parts: dict[fx.Node, int] = {}
    k = 0
    for i, n in enumerate(nodes):
        while k < len(starts) and i >= starts[k]:
            k += 1
        if n.op == "placeholder":
            parts[n] = 0
        elif n.op not in ("get_attr", "output"):
            parts[n] = k
    return parts


def recomputable(graph: fx.Graph, root: nn.Module) -> set[fx.Node]:
    """The nodes whose value needs no data (see the module docstring): recomputed where used, never sent."""
    params = {id(p) for p in root.parameters()}
    # a tensor an in-place operation writes (a buffer's update, a mask filled in through a view), and every tensor
    # it derives from, is computed once, where it is: recomputing it would lose the write
    mutated: set[fx.Node] = set()
    todo = [a for n in graph.nodes if _mutates(n) for a in n.all_input_nodes]
    while todo:
        a = todo.pop()
        if a not in mutated:
            mutated.add(a)
            todo.extend(a.all_input_nodes)
    rec: set[fx.Node] = set()
    for n in graph.nodes:
        if n in mutated or _mutates(n):
            continue
        if n.op == "get_attr":
            obj = _attr(root, n.target)
            if id(obj) not in params:
                rec.add(n)
        elif n.op == "call_function":
            if n.target is _aten.sym_size.int:
                rec.add(n)  # read again from a tensor that reaches the segment (substitute_size)
            elif _op_name(n) not in _RANDOM and all(a in rec for a in n.all_input_nodes):
                rec.add(n)
    return rec


def _mutates(node: fx.Node) -> bool:
    """Whether ``node`` is an operation that writes into one of its arguments (an ATen schema marked mutable)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def substitute_size(
    node: fx.Node, available: Sequence[fx.Node], g: fx.Graph, env: Mapping[fx.Node, fx.Node]
) -> fx.Node:
    """A ``sym_size`` read again in another segment: from one of ``available`` (the tensors reaching it) whose
    shape has the same size; ConfigurationError naming the node when none has."""
    want = node.meta.get("val")
    for a in available:
        val = a.meta.get("val")
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if (
                    isinstance(size, torch.SymInt)
                    and isinstance(want, torch.SymInt)
                    and size.node.expr == want.node.expr
                ):
                    new = g.call_function(_aten.sym_size.int, (env[a], d))
                    new.meta = dict(node.meta)
                    return new
    raise ConfigurationError(
        f"node {node.name!r} (the size {want} of {node.args[0]}) is needed after a cut that no tensor of that size "
        "crosses; cut at a block boundary, where the hidden states cross"
    )


def devices_follow_inputs(graph: fx.Graph) -> int:
    """Every ``torch.device`` constant in the arguments of ``graph``'s calls becomes the device of its first input
    (one ``getattr(input, "device")`` node after the inputs); returns how many were replaced. A segment's inputs
    are on its party's device (what crosses a cut moves to the receiver's device), so what it makes lands there
    too; a device fixed at export would put a CPU-made mask beside CUDA activations."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    calls = [n for n in graph.nodes if n.op == "call_function"]
    if not inputs or not any(_has_device(a) for n in calls for a in (*n.args, *n.kwargs.values())):
        return 0
    with graph.inserting_after(inputs[-1]):
        device = graph.call_function(getattr, (inputs[0], "device"))
    count = 0

    def swap(a: object) -> object:
        nonlocal count
        if isinstance(a, torch.device):
            count += 1
            return device
        return a

    for n in calls:
        if n is not device:
            n.args = fx.node.map_aggregate(n.args, swap)
            n.kwargs = fx.node.map_aggregate(n.kwargs, swap)
    return count


def _has_device(a: object) -> bool:
    if isinstance(a, torch.device):
        return True
    return isinstance(a, (list, tuple)) and any(_has_device(b) for b in a)


def _attr(root: nn.Module, target: str) -> object:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def mark_non_persistent(segment: nn.Module, saved: set[str]) -> None:
    """Buffers the model does not save (not among ``saved``, its state-dict keys: ``persistent=False``, constants
    export lifted) stay out of the segment's state dict, so that the segments' state dicts are the model's."""
    for name, _ in list(segment.named_buffers()):
        if name not in saved:
            owner, _, leaf = name.rpartition(".")
            segment.get_submodule(owner)._non_persistent_buffers_set.add(leaf)
