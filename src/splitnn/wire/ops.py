"""The one op vocabulary of a segment graph: the functions and tensor methods a graph may call.

A segment that travels as a graph (:mod:`splitnn.wire.graph`) runs at another party, so
every op it names is an op that party agrees to run on its own memory. The vocabulary is
a curated allow-list, not "everything public minus a few": dense, functional ops whose
output is a new tensor (or a view) of a size computable from the input shapes. It names
them two ways: at the Python level, as traced CNNs, MLPs and attention blocks call them
(``torch.relu``, ``F.conv2d``, ``x.flatten``), and at the ATen level, as ``torch.export``
graphs (the segments :func:`splitnn.cut` makes of transformers) call them
(``aten.linear.default``, ``aten.scaled_dot_product_attention.default``): one overload at a
time, each with a functional schema (no argument it writes, no ``out``). Left out on purpose:

* ``out=`` arguments and in-place ops (``add_``, ``operator.iadd``, ``setitem``,
  ``inplace=True``, ``F.embedding(max_norm=...)``, sparse embedding gradients): a graph never
  writes into its inputs, its parameters or its buffers, so what it leaves behind is only its outputs;
* uninitialised allocation (``torch.empty*``, ``new_empty``, ``empty_like``, ``empty_strided``);
* sparse, nested, quantized and segment ops (``sparse_coo_tensor``, ``segment_reduce``, ...),
  whose kernels trust their index arguments, and layouts other than strided;
* pointer and storage access (``data_ptr``, ``const_data_ptr``, ``untyped_storage``,
  ``set_``, ``as_strided``), and reads of values into Python (``item``, ``tolist``, ``numpy``);
* ops whose output size depends on the values (``nonzero``, ``unique``, ``masked_select``):
  the memory check (:mod:`splitnn.wire.budget`) computes every size on meta tensors (an
  ``aten.index.Tensor`` with a boolean mask fails there, so it is refused when it would run);
* kernels that index with unchecked arguments (``native_batch_norm``, ``batch_norm``).

Both sides use it: :func:`splitnn.wire.graph.describe_graph` refuses to describe a graph
that calls anything else (keep that module whole with ``cut(..., leaves=[...])`` and trust
its class at the worker) and :func:`splitnn.wire.graph.plan_graph` refuses a received one,
naming the op.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "GETATTR_NAMES",
    "TENSOR_METHODS",
    "ATEN_OPS",
    "allowed_functions",
    "allowed_methods",
    "check_call",
    "function_name",
]

# Elementwise and reduction ops that exist as torch.NAME and as Tensor.NAME.
_BOTH = """
abs acos acosh add addcdiv addcmul addmm all amax amin any argmax argmin argsort asin asinh atan atan2 atanh
baddbmm bitwise_and bitwise_not bitwise_or bitwise_xor bmm broadcast_to ceil chunk clamp clamp_max clamp_min
clip clone cos cosh cummax cummin cumprod cumsum deg2rad diag_embed diagonal diff div divide dot eq erf erfc
exp exp2 expm1 flatten flip fliplr flipud float_power floor floor_divide fmax fmin fmod frac gather ge
greater greater_equal gt hypot isclose isfinite isinf isnan isneginf isposinf kron le lerp less less_equal
log log10 log1p log2 logaddexp logcumsumexp logical_and logical_not logical_or logical_xor logit logsumexp
lt masked_fill matmul max maximum mean median min minimum mm moveaxis movedim mul multiply mv nan_to_num
nanmean nansum narrow ne neg negative norm not_equal outer permute pow prod rad2deg reciprocal relu remainder
repeat_interleave reshape roll rot90 round rsqrt select sigmoid sign signbit sin sinc sinh softmax
log_softmax sort split sqrt square squeeze std sub subtract sum swapaxes swapdims t take_along_dim tan tanh
tensor_split tile topk transpose tril triu true_divide trunc unbind unflatten unsqueeze var where xlogy
index_select cross inner kthvalue mode msort nanmedian quantile nanquantile
"""
# Only as torch.NAME: constructors (initialised) and combinations of several tensors.
_TORCH_ONLY = """
arange atleast_1d atleast_2d atleast_3d block_diag broadcast_tensors cartesian_prod cat column_stack concat
concatenate dstack einsum eye full full_like hstack linspace logspace meshgrid ones ones_like rand rand_like
randint randint_like randn randn_like scalar_tensor stack tensordot vstack zeros zeros_like cdist
dropout alpha_dropout feature_dropout layer_norm group_norm conv1d conv2d conv3d conv_transpose1d
conv_transpose2d conv_transpose3d avg_pool1d max_pool1d max_pool2d max_pool3d adaptive_avg_pool1d
adaptive_max_pool1d pixel_shuffle pixel_unshuffle cosine_similarity pairwise_distance selu celu rrelu
threshold hardshrink bernoulli multinomial normal poisson
"""
# Tensor methods that are not torch.NAME functions (or are, but only make sense as methods).
_METHODS_ONLY = """
bfloat16 bool contiguous detach dim double element_size expand expand_as float half int is_complex
is_contiguous is_floating_point long ndimension nelement new_full new_ones new_zeros numel repeat
reshape_as short size stride to type_as view view_as unfold char byte
"""
#: Tensor methods a graph may call (``call_method``).
TENSOR_METHODS: frozenset[str] = frozenset((_BOTH + _METHODS_ONLY).split())

# torch.nn.functional.NAME.
_FUNCTIONAL = """
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d avg_pool1d avg_pool2d avg_pool3d binary_cross_entropy binary_cross_entropy_with_logits
celu conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d cosine_similarity cross_entropy
dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout elu
embedding gelu glu group_norm hardshrink hardsigmoid hardswish hardtanh huber_loss
interpolate kl_div l1_loss layer_norm leaky_relu linear local_response_norm log_softmax logsigmoid
max_pool1d max_pool2d max_pool3d mish mse_loss nll_loss normalize one_hot pad
pairwise_distance pixel_shuffle pixel_unshuffle prelu relu relu6 rms_norm rrelu selu
sigmoid silu smooth_l1_loss softmax softmin softplus softshrink softsign tanh tanhshrink
threshold upsample upsample_bilinear upsample_nearest scaled_dot_product_attention bilinear
"""
# operator.NAME: arithmetic, comparison and indexing, never the in-place forms.
_OPERATORS = """
add sub mul truediv floordiv mod pow matmul neg pos abs invert getitem eq ne lt le gt ge and_ or_ xor
lshift rshift
"""
# torch.ops.aten.NAME.OVERLOAD: what torch.export graphs of transformers name (composite ops such as linear and
# scaled_dot_product_attention kept whole, as export's training IR keeps them), each overload functional.
_ATEN = """
add.Tensor add.Scalar sub.Tensor sub.Scalar rsub.Scalar mul.Tensor mul.Scalar div.Tensor div.Scalar neg.default
exp.default sqrt.default rsqrt.default pow.Tensor_Scalar sin.default cos.default tanh.default sigmoid.default
erf.default relu.default gelu.default silu.default where.self masked_fill.Scalar eq.Tensor eq.Scalar ne.Tensor
ne.Scalar lt.Scalar le.Tensor gt.Scalar ge.Scalar __and__.Tensor __or__.Tensor bitwise_not.default
logical_not.default sum.dim_IntList mean.dim amax.default cumsum.default diff.default softmax.int log_softmax.int
mm.default bmm.default matmul.default addmm.default baddbmm.default linear.default view.default reshape.default
permute.default transpose.int t.default expand.default unsqueeze.default squeeze.dim flatten.using_ints
unflatten.int slice.Tensor select.int split.Tensor chunk.default unbind.int cat.default stack.default
contiguous.default clone.default alias.default to.dtype to.device to.dtype_layout arange.default arange.start
arange.start_step full.default new_ones.default zeros_like.default ones_like.default full_like.default tril.default
triu.default embedding.default gather.default index.Tensor index_select.default layer_norm.default rms_norm.default
scaled_dot_product_attention.default dropout.default conv2d.default sym_size.int
"""
#: The ATen overloads a graph may call, by name (``"aten.linear.default"``).
ATEN_OPS: frozenset[str] = frozenset(f"aten.{n}" for n in _ATEN.split())

#: Tensor properties a graph may read with ``getattr``.
GETATTR_NAMES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "H", "mH", "real", "imag", "is_cuda"})

# Arguments that would make an allowed function write into one of its arguments.
_INPLACE_PARAMS = ("inplace",)
_MUTATING_PARAMS = {"embedding": ("max_norm", "sparse")}  # renormalises the weight in place; sparse gradients


@functools.cache
def allowed_functions() -> dict[str, Callable[..., Any]]:
    """The ``call_function`` targets a graph may name, by name (``"torch.cat"`` -> ``torch.cat``)."""
    out: dict[str, Callable[..., Any]] = {}
    for name in (_BOTH + _TORCH_ONLY).split():
        fn = getattr(torch, name, None)
        if callable(fn) and not isinstance(fn, type):
            out[f"torch.{name}"] = fn
    for name in _FUNCTIONAL.split():
        fn = getattr(F, name, None)
        if callable(fn):
            out[f"torch.nn.functional.{name}"] = fn
    for name in _OPERATORS.split():
        out[f"operator.{name}"] = getattr(operator, name)
    for name in sorted(ATEN_OPS):
        _, op, overload = name.split(".")
        fn = getattr(getattr(torch.ops.aten, op, None), overload, None)
        if isinstance(fn, torch._ops.OpOverload) and _functional(fn._schema):
            out[name] = fn
    out["getattr"] = builtins.getattr
    return out


@functools.cache
def allowed_methods() -> frozenset[str]:
    """The ``call_method`` targets (tensor methods) a graph may name."""
    return frozenset(m for m in TENSOR_METHODS if callable(getattr(torch.Tensor, m, None)))


@functools.cache
def _names_by_id() -> dict[int, str]:
    names: dict[int, str] = {}
    for name, fn in allowed_functions().items():
        names.setdefault(id(fn), name)  # torch.* first: an alias decodes to the same object
    return names


def _functional(schema: torch.FunctionSchema) -> bool:
    """An ATen schema that writes into none of its arguments and has no ``out``."""
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    return not (schema.is_mutable or writes or any(a.is_out for a in schema.arguments))


def function_name(fn: Any) -> str | None:
    """The vocabulary's name of the function object ``fn``, or None when it is not in the vocabulary."""
    return _names_by_id().get(id(fn))


def _refusal(what: str) -> str:
    return (
        f"{what} is not on the allow-list of graph ops (the op vocabulary of splitnn.wire.ops: dense, "
        "functional ops; no out=, no in-place writes, no uninitialised, sparse or pointer ops); keep the module "
        "that calls it whole with cut(..., leaves=[...]) and let the worker trust its class "
        "(splitnn worker --trust), or use an in-process worker"
    )


def check_call(op: str, target: str, fn: Callable[..., Any] | None, args: tuple, kwargs: dict) -> str | None:
    """Why a ``call_function``/``call_method`` node may not run (None: it may).

    ``fn`` is the resolved function of a ``call_function`` (None for a method). Checks the
    name against the vocabulary and the arguments against the rules that keep a call
    functional: no ``out=``, no ``inplace=True``, no argument that makes it write elsewhere.
    """
    if op == "call_method":
        if target not in allowed_methods():
            return _refusal(f"tensor method {target!r}")
    elif fn is None:
        return _refusal(f"function {target!r}")
    if "out" in kwargs:
        return f"{target!r} with out=: a graph may not write into an existing tensor; use the returned value"
    if op == "call_method":
        return None
    if isinstance(fn, torch._ops.OpOverload):
        return _check_aten(target, fn, args, kwargs)
    base = target.rsplit(".", 1)[-1]
    params = _INPLACE_PARAMS + _MUTATING_PARAMS.get(base, ())
    bound = _bind(fn, args, kwargs)
    for p in params:
        value = bound.get(p, kwargs.get(p)) if bound is not None else kwargs.get(p)
        if p in _INPLACE_PARAMS and value not in (None, False):
            return f"{target!r} with {p}={value!r}: a graph may not write into its arguments; pass {p}=False"
        if p not in _INPLACE_PARAMS and value not in (None, False):
            return f"{target!r} with {p}={value!r} writes into its argument; a graph may not (leave {p} unset)"
    if bound is None and any(isinstance(a, bool) and a for a in args[1:]) and _has_param(fn, "inplace"):
        return f"{target!r}: pass inplace as a keyword (inplace=False); a graph may not write into its arguments"
    return None


def _check_aten(target: str, fn: torch._ops.OpOverload, args: tuple, kwargs: dict) -> str | None:
    """The arguments of an ATen call, against its schema: known names, no sparse gradients, strided layouts."""
    schema = fn._schema
    positional = [a.name for a in schema.arguments if not a.kwarg_only]
    if len(args) > len(positional):
        return f"{target!r} takes at most {len(positional)} positional arguments ({schema}), got {len(args)}"
    names = {a.name for a in schema.arguments}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        return f"{target!r} has no argument {unknown[0]!r} ({schema})"
    bound = {**dict(zip(positional, args)), **kwargs}
    if bound.get("sparse") not in (None, False):
        return f"{target!r} with sparse={bound['sparse']!r} makes sparse gradients; a graph may not (pass False)"
    layout = bound.get("layout")
    if layout is not None and layout is not torch.strided:
        return f"{target!r} with layout={layout!r}: a graph makes dense (strided) tensors only"
    return None


def _bind(fn: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        return dict(sig.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return None  # the call itself is wrong: it fails when it runs, and writes nothing


def _has_param(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
