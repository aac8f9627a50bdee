"""Safe wire formats of splitnn: nothing executable crosses the wire.

- :mod:`~splitnn.wire.tensor_codec`: one tensor <-> a validated header + raw bytes.
- :mod:`~splitnn.wire.state_codec`: a state dict <-> safetensors bytes.
- :mod:`~splitnn.wire.spec`: a model <-> a declarative JSON spec of known layer types
  (:mod:`~splitnn.wire.layers`), graphs of allow-listed ops (:mod:`~splitnn.wire.graph`,
  :mod:`~splitnn.wire.ops`) and trusted imports (:mod:`~splitnn.wire.trust`).
- :mod:`~splitnn.wire.optim_spec`: an optimizer choice as data.

Every malformed or oversized input raises :class:`splitnn.errors.WireError`
(:class:`splitnn.errors.SpecError` for specs).

This package exports what a user or a worker implementer needs: layer specs and the layer
registry, :class:`Trust`, optimizer specs, and the tensor and state codecs' encode/decode.
The codecs' internals (frame magic, dtype codes, headers, size limits) stay in their modules.
"""

from splitnn.wire.optim_spec import KNOWN_OPTIMIZERS, OptimizerSpec
from splitnn.wire.spec import (
    Trust,
    module_to_spec,
    register_layer,
    registered_layers,
    spec_from_json,
    spec_to_json,
    spec_to_module,
    unregister_layer,
    validate_spec,
)
from splitnn.wire.state_codec import decode_state, encode_state
from splitnn.wire.tensor_codec import decode_tensor, encode_tensor

__all__ = [
    # layer specs: a model as data, and the layer types it may use
    "module_to_spec",
    "spec_to_module",
    "validate_spec",
    "spec_to_json",
    "spec_from_json",
    "register_layer",
    "unregister_layer",
    "registered_layers",
    "Trust",
    # optimizer specs
    "OptimizerSpec",
    "KNOWN_OPTIMIZERS",
    # codecs
    "encode_tensor",
    "decode_tensor",
    "encode_state",
    "decode_state",
]
