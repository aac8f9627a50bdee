"""Safe wire formats of splitnn: nothing executable crosses the wire.

- :mod:`~splitnn.wire.tensor_codec`: one tensor <-> a validated header + raw bytes.
- :mod:`~splitnn.wire.state_codec`: a state dict <-> safetensors bytes.
- :mod:`~splitnn.wire.spec`: a model <-> a declarative JSON spec of known layer types,
  fx graphs (:mod:`~splitnn.wire.graph`) and trusted imports (:mod:`~splitnn.wire.trust`).
- :mod:`~splitnn.wire.optim_spec`: an optimizer choice as data.

Every malformed or oversized input raises :class:`splitnn.errors.WireError`
(:class:`splitnn.errors.SpecError` for specs).
"""

from splitnn.wire.optim_spec import KNOWN_OPTIMIZERS, OptimizerSpec
from splitnn.wire.spec import (
    DEFAULT_MAX_PARAMS,
    MAX_SPEC_DEPTH,
    MAX_SPEC_LAYERS,
    Trust,
    module_to_spec,
    register_layer,
    registered_layers,
    spec_from_json,
    spec_param_count,
    spec_to_json,
    spec_to_module,
    unregister_layer,
    validate_spec,
)
from splitnn.wire.state_codec import (
    DEFAULT_MAX_STATE_BYTES,
    DEFAULT_MAX_STATE_ENTRIES,
    decode_state,
    encode_state,
)
from splitnn.wire.tensor_codec import (
    DEFAULT_ALLOWED,
    DEFAULT_MAX_TENSOR_BYTES,
    DTYPE_CODES,
    MAGIC,
    MAX_NDIM,
    TensorHeader,
    decode_tensor,
    encode_tensor,
    encode_tensor_parts,
    header_size,
    read_header,
    tensor_nbytes,
)

__all__ = [
    # tensor_codec
    "MAGIC",
    "DTYPE_CODES",
    "DEFAULT_ALLOWED",
    "DEFAULT_MAX_TENSOR_BYTES",
    "MAX_NDIM",
    "TensorHeader",
    "encode_tensor",
    "encode_tensor_parts",
    "decode_tensor",
    "read_header",
    "header_size",
    "tensor_nbytes",
    # state_codec
    "DEFAULT_MAX_STATE_BYTES",
    "DEFAULT_MAX_STATE_ENTRIES",
    "encode_state",
    "decode_state",
    # spec
    "DEFAULT_MAX_PARAMS",
    "MAX_SPEC_DEPTH",
    "MAX_SPEC_LAYERS",
    "module_to_spec",
    "spec_to_module",
    "spec_param_count",
    "validate_spec",
    "spec_to_json",
    "spec_from_json",
    "register_layer",
    "unregister_layer",
    "registered_layers",
    "Trust",
    # optim_spec
    "OptimizerSpec",
    "KNOWN_OPTIMIZERS",
]
