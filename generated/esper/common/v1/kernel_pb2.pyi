import datetime

from generated.buf.validate import validate_pb2 as _validate_pb2
from generated.esper.common.v1 import blueprint_pb2 as _blueprint_pb2
from generated.esper.common.v1 import seed_pb2 as _seed_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KernelProfile(_message.Message):
    __slots__ = ("parameters", "forward_flops_per_sample", "latency_us_p50", "latency_us_p99", "benchmark_batch_size", "benchmark_device")
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FLOPS_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_P50_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_P99_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_DEVICE_FIELD_NUMBER: _ClassVar[int]
    parameters: int
    forward_flops_per_sample: int
    latency_us_p50: float
    latency_us_p99: float
    benchmark_batch_size: int
    benchmark_device: str
    def __init__(self, parameters: _Optional[int] = ..., forward_flops_per_sample: _Optional[int] = ..., latency_us_p50: _Optional[float] = ..., latency_us_p99: _Optional[float] = ..., benchmark_batch_size: _Optional[int] = ..., benchmark_device: _Optional[str] = ...) -> None: ...

class ValidationReport(_message.Message):
    __slots__ = ("shape_ok", "init_max_abs_delta", "forward_finite", "backward_finite", "notes")
    SHAPE_OK_FIELD_NUMBER: _ClassVar[int]
    INIT_MAX_ABS_DELTA_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FINITE_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FINITE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    shape_ok: bool
    init_max_abs_delta: float
    forward_finite: bool
    backward_finite: bool
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shape_ok: _Optional[bool] = ..., init_max_abs_delta: _Optional[float] = ..., forward_finite: _Optional[bool] = ..., backward_finite: _Optional[bool] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class KernelManifest(_message.Message):
    __slots__ = ("format_version", "blueprint_id", "blueprint_name", "family", "site", "ir_sha256", "weights_sha256", "weights_size", "tensors", "profile", "validation", "key_id", "created_at", "tags")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    IR_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    blueprint_id: str
    blueprint_name: str
    family: str
    site: _seed_pb2.SiteSignature
    ir_sha256: str
    weights_sha256: str
    weights_size: int
    tensors: _containers.RepeatedCompositeFieldContainer[_seed_pb2.TensorSpec]
    profile: KernelProfile
    validation: ValidationReport
    key_id: str
    created_at: _timestamp_pb2.Timestamp
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, format_version: _Optional[int] = ..., blueprint_id: _Optional[str] = ..., blueprint_name: _Optional[str] = ..., family: _Optional[str] = ..., site: _Optional[_Union[_seed_pb2.SiteSignature, _Mapping]] = ..., ir_sha256: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., weights_size: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_seed_pb2.TensorSpec, _Mapping]]] = ..., profile: _Optional[_Union[KernelProfile, _Mapping]] = ..., validation: _Optional[_Union[ValidationReport, _Mapping]] = ..., key_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class KernelArtifact(_message.Message):
    __slots__ = ("manifest", "signature", "ir", "weights")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    IR_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    signature: bytes
    ir: bytes
    weights: bytes
    def __init__(self, manifest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., ir: _Optional[bytes] = ..., weights: _Optional[bytes] = ...) -> None: ...

class KernelRecord(_message.Message):
    __slots__ = ("kernel_id", "manifest", "artifact_size", "artifact_sha256", "stats", "blueprint")
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SIZE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_FIELD_NUMBER: _ClassVar[int]
    kernel_id: str
    manifest: KernelManifest
    artifact_size: int
    artifact_sha256: str
    stats: KernelStats
    blueprint: _blueprint_pb2.Blueprint
    def __init__(self, kernel_id: _Optional[str] = ..., manifest: _Optional[_Union[KernelManifest, _Mapping]] = ..., artifact_size: _Optional[int] = ..., artifact_sha256: _Optional[str] = ..., stats: _Optional[_Union[KernelStats, _Mapping]] = ..., blueprint: _Optional[_Union[_blueprint_pb2.Blueprint, _Mapping]] = ...) -> None: ...

class KernelStats(_message.Message):
    __slots__ = ("outcomes", "fossilized", "pruned", "mean_contribution", "mean_accuracy_delta", "rolled_back", "score")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    FOSSILIZED_FIELD_NUMBER: _ClassVar[int]
    PRUNED_FIELD_NUMBER: _ClassVar[int]
    MEAN_CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCURACY_DELTA_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    outcomes: int
    fossilized: int
    pruned: int
    mean_contribution: float
    mean_accuracy_delta: float
    rolled_back: int
    score: float
    def __init__(self, outcomes: _Optional[int] = ..., fossilized: _Optional[int] = ..., pruned: _Optional[int] = ..., mean_contribution: _Optional[float] = ..., mean_accuracy_delta: _Optional[float] = ..., rolled_back: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...
