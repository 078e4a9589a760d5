import datetime

from generated.buf.validate import validate_pb2 as _validate_pb2
from generated.esper.common.v1 import decision_pb2 as _decision_pb2
from generated.esper.common.v1 import health_pb2 as _health_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecideRequest(_message.Message):
    __slots__ = ("request_id", "snapshot", "allowed_blueprints", "candidates")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_BLUEPRINTS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    snapshot: _health_pb2.HealthSnapshot
    allowed_blueprints: _containers.RepeatedScalarFieldContainer[str]
    candidates: CallerCandidates
    def __init__(self, request_id: _Optional[str] = ..., snapshot: _Optional[_Union[_health_pb2.HealthSnapshot, _Mapping]] = ..., allowed_blueprints: _Optional[_Iterable[str]] = ..., candidates: _Optional[_Union[CallerCandidates, _Mapping]] = ...) -> None: ...

class CallerCandidates(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[SlotCandidates]
    def __init__(self, slots: _Optional[_Iterable[_Union[SlotCandidates, _Mapping]]] = ...) -> None: ...

class SlotCandidates(_message.Message):
    __slots__ = ("slot_id", "kernels")
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    slot_id: str
    kernels: _containers.RepeatedCompositeFieldContainer[KernelCandidate]
    def __init__(self, slot_id: _Optional[str] = ..., kernels: _Optional[_Iterable[_Union[KernelCandidate, _Mapping]]] = ...) -> None: ...

class KernelCandidate(_message.Message):
    __slots__ = ("kernel_id", "blueprint_id", "blueprint_name", "family", "parameters", "forward_flops_per_sample", "outcomes", "fossilized", "pruned", "mean_contribution")
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FLOPS_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    FOSSILIZED_FIELD_NUMBER: _ClassVar[int]
    PRUNED_FIELD_NUMBER: _ClassVar[int]
    MEAN_CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    kernel_id: str
    blueprint_id: str
    blueprint_name: str
    family: str
    parameters: int
    forward_flops_per_sample: int
    outcomes: int
    fossilized: int
    pruned: int
    mean_contribution: float
    def __init__(self, kernel_id: _Optional[str] = ..., blueprint_id: _Optional[str] = ..., blueprint_name: _Optional[str] = ..., family: _Optional[str] = ..., parameters: _Optional[int] = ..., forward_flops_per_sample: _Optional[int] = ..., outcomes: _Optional[int] = ..., fossilized: _Optional[int] = ..., pruned: _Optional[int] = ..., mean_contribution: _Optional[float] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("decisions", "policy", "policy_version", "latency_ms")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[_decision_pb2.Decision]
    policy: str
    policy_version: str
    latency_ms: float
    def __init__(self, decisions: _Optional[_Iterable[_Union[_decision_pb2.Decision, _Mapping]]] = ..., policy: _Optional[str] = ..., policy_version: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class GetPolicyInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyInfoResponse(_message.Message):
    __slots__ = ("policy", "policy_version", "loaded_at", "settings", "fallback_policy")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: str
    policy_version: str
    loaded_at: _timestamp_pb2.Timestamp
    settings: _containers.ScalarMap[str, str]
    fallback_policy: str
    def __init__(self, policy: _Optional[str] = ..., policy_version: _Optional[str] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., settings: _Optional[_Mapping[str, str]] = ..., fallback_policy: _Optional[str] = ...) -> None: ...
