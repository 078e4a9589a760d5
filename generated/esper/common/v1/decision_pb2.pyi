from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecisionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_KIND_UNSPECIFIED: _ClassVar[DecisionKind]
    DECISION_KIND_WAIT: _ClassVar[DecisionKind]
    DECISION_KIND_GERMINATE: _ClassVar[DecisionKind]
    DECISION_KIND_PRUNE: _ClassVar[DecisionKind]
    DECISION_KIND_FOSSILIZE: _ClassVar[DecisionKind]
DECISION_KIND_UNSPECIFIED: DecisionKind
DECISION_KIND_WAIT: DecisionKind
DECISION_KIND_GERMINATE: DecisionKind
DECISION_KIND_PRUNE: DecisionKind
DECISION_KIND_FOSSILIZE: DecisionKind

class Decision(_message.Message):
    __slots__ = ("kind", "slot_id", "blueprint_id", "kernel_id", "reason", "confidence", "uncertainty", "fallback", "policy")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    kind: DecisionKind
    slot_id: str
    blueprint_id: str
    kernel_id: str
    reason: str
    confidence: float
    uncertainty: float
    fallback: bool
    policy: str
    def __init__(self, kind: _Optional[_Union[DecisionKind, str]] = ..., slot_id: _Optional[str] = ..., blueprint_id: _Optional[str] = ..., kernel_id: _Optional[str] = ..., reason: _Optional[str] = ..., confidence: _Optional[float] = ..., uncertainty: _Optional[float] = ..., fallback: _Optional[bool] = ..., policy: _Optional[str] = ...) -> None: ...
