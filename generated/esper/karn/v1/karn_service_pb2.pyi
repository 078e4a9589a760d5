from generated.buf.validate import validate_pb2 as _validate_pb2
from generated.esper.common.v1 import blueprint_pb2 as _blueprint_pb2
from generated.esper.common.v1 import seed_pb2 as _seed_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposeBlueprintsRequest(_message.Message):
    __slots__ = ("request_id", "count", "site", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    count: int
    site: _seed_pb2.SiteSignature
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., count: _Optional[int] = ..., site: _Optional[_Union[_seed_pb2.SiteSignature, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("blueprint", "operator", "accepted", "rejection", "kernel_id")
    BLUEPRINT_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    blueprint: _blueprint_pb2.Blueprint
    operator: str
    accepted: bool
    rejection: str
    kernel_id: str
    def __init__(self, blueprint: _Optional[_Union[_blueprint_pb2.Blueprint, _Mapping]] = ..., operator: _Optional[str] = ..., accepted: _Optional[bool] = ..., rejection: _Optional[str] = ..., kernel_id: _Optional[str] = ...) -> None: ...

class ProposeBlueprintsResponse(_message.Message):
    __slots__ = ("proposals",)
    PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    proposals: _containers.RepeatedCompositeFieldContainer[Proposal]
    def __init__(self, proposals: _Optional[_Iterable[_Union[Proposal, _Mapping]]] = ...) -> None: ...
