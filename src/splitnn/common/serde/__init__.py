"""The messages the table of operations (:mod:`splitnn.common.operations`) does not declare field by field, each
message's two directions side by side: set-up (:mod:`~splitnn.common.serde.setup`), epoch plans and losses
(:mod:`~splitnn.common.serde.plans`) and the building blocks (:mod:`~splitnn.common.serde.blocks`: refs,
tensor, state, segment, index and id blobs, batches).

``*_to_args`` / ``*_from_args`` encode and decode a command's arguments, ``*_to_command`` /
``*_from_command`` those with blobs, ``*_to_result`` / ``*_from_result`` a reply's result. Decoders
raise :class:`~splitnn.errors.WireError` on anything a peer could get wrong. Nothing here imports grpc.
"""

from splitnn.common.messages import PROTOCOL_VERSION  # noqa: F401
from splitnn.common.serde.blocks import (  # noqa: F401
    DTYPE_NAMES,
    MAX_AVERAGE_SEGMENTS,
    MAX_ID_CHARS,
    MAX_MERGE_SOURCES,
    MAX_METRIC_NAMES,
    MAX_PEERS,
    MAX_PLAN_STAGES,
    MAX_PSI_PARTS,
    arg,
    batch_from_command,
    batch_to_command,
    blob_arg,
    draw_from_arg,
    ids_from_blob,
    ids_to_blob,
    indices_from_blob,
    indices_to_blob,
    output_id_from_args,
    ref_from_dict,
    ref_to_dict,
    segment_from_blobs,
    segment_to_blobs,
    state_from_blob,
    state_to_blob,
    tensor_from_blob,
    tensor_to_blob,
    value_from_blob,
    value_to_blob,
)
from splitnn.common.serde.plans import (  # noqa: F401  # noqa: F401
    epoch_plan_from_command,
    epoch_plan_to_command,
    epoch_report_from_result,
    epoch_report_to_result,
    loss_stats_from_result,
    loss_stats_to_result,
    losses_from_result,
    losses_to_result,
)
from splitnn.common.serde.setup import (  # noqa: F401
    Hello,
    PeerAddress,
    check_data_address,
    dataset_stats_from_result,
    dataset_stats_to_result,
    hello_from_result,
    hello_to_result,
    peers_from_args,
    peers_to_args,
    shape_from_json,
    shape_to_json,
    stats_from_result,
    stats_to_result,
)
