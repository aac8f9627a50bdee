from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Command(_message.Message):
    __slots__ = ("seq", "op", "args_json", "blobs", "ack")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    seq: int
    op: str
    args_json: str
    blobs: _containers.RepeatedScalarFieldContainer[bytes]
    ack: int
    def __init__(self, seq: _Optional[int] = ..., op: _Optional[str] = ..., args_json: _Optional[str] = ..., blobs: _Optional[_Iterable[bytes]] = ..., ack: _Optional[int] = ...) -> None: ...

class Transfer(_message.Message):
    __slots__ = ("src", "dst", "kind", "count", "nbytes", "raw_nbytes")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    RAW_NBYTES_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    kind: str
    count: int
    nbytes: int
    raw_nbytes: int
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ..., kind: _Optional[str] = ..., count: _Optional[int] = ..., nbytes: _Optional[int] = ..., raw_nbytes: _Optional[int] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("seq", "ok", "error_type", "error", "result_json", "blobs", "transfers", "more", "progress")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    ok: bool
    error_type: str
    error: str
    result_json: str
    blobs: _containers.RepeatedScalarFieldContainer[bytes]
    transfers: _containers.RepeatedCompositeFieldContainer[Transfer]
    more: bool
    progress: bool
    def __init__(self, seq: _Optional[int] = ..., ok: _Optional[bool] = ..., error_type: _Optional[str] = ..., error: _Optional[str] = ..., result_json: _Optional[str] = ..., blobs: _Optional[_Iterable[bytes]] = ..., transfers: _Optional[_Iterable[_Union[Transfer, _Mapping]]] = ..., more: _Optional[bool] = ..., progress: _Optional[bool] = ...) -> None: ...

class RawFrame(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
