import datetime

from generated.buf.validate import validate_pb2 as _validate_pb2
from generated.esper.common.v1 import blueprint_pb2 as _blueprint_pb2
from generated.esper.common.v1 import kernel_pb2 as _kernel_pb2
from generated.esper.common.v1 import seed_pb2 as _seed_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CompileJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPILE_JOB_STATE_UNSPECIFIED: _ClassVar[CompileJobState]
    COMPILE_JOB_STATE_QUEUED: _ClassVar[CompileJobState]
    COMPILE_JOB_STATE_RUNNING: _ClassVar[CompileJobState]
    COMPILE_JOB_STATE_SUCCEEDED: _ClassVar[CompileJobState]
    COMPILE_JOB_STATE_FAILED: _ClassVar[CompileJobState]
COMPILE_JOB_STATE_UNSPECIFIED: CompileJobState
COMPILE_JOB_STATE_QUEUED: CompileJobState
COMPILE_JOB_STATE_RUNNING: CompileJobState
COMPILE_JOB_STATE_SUCCEEDED: CompileJobState
COMPILE_JOB_STATE_FAILED: CompileJobState

class CompileJob(_message.Message):
    __slots__ = ("job_id", "state", "blueprint_id", "site", "kernel_id", "manifest", "error", "created_at", "finished_at")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: CompileJobState
    blueprint_id: str
    site: _seed_pb2.SiteSignature
    kernel_id: str
    manifest: _kernel_pb2.KernelManifest
    error: str
    created_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[CompileJobState, str]] = ..., blueprint_id: _Optional[str] = ..., site: _Optional[_Union[_seed_pb2.SiteSignature, _Mapping]] = ..., kernel_id: _Optional[str] = ..., manifest: _Optional[_Union[_kernel_pb2.KernelManifest, _Mapping]] = ..., error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CompileRequest(_message.Message):
    __slots__ = ("request_id", "blueprint_id", "blueprint", "site", "wait")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    blueprint_id: str
    blueprint: _blueprint_pb2.Blueprint
    site: _seed_pb2.SiteSignature
    wait: bool
    def __init__(self, request_id: _Optional[str] = ..., blueprint_id: _Optional[str] = ..., blueprint: _Optional[_Union[_blueprint_pb2.Blueprint, _Mapping]] = ..., site: _Optional[_Union[_seed_pb2.SiteSignature, _Mapping]] = ..., wait: _Optional[bool] = ...) -> None: ...

class CompileResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: CompileJob
    def __init__(self, job: _Optional[_Union[CompileJob, _Mapping]] = ...) -> None: ...

class GetCompileJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetCompileJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: CompileJob
    def __init__(self, job: _Optional[_Union[CompileJob, _Mapping]] = ...) -> None: ...

class EnsureKernelsRequest(_message.Message):
    __slots__ = ("request_id", "site", "blueprint_names", "wait")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_NAMES_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    site: _seed_pb2.SiteSignature
    blueprint_names: _containers.RepeatedScalarFieldContainer[str]
    wait: bool
    def __init__(self, request_id: _Optional[str] = ..., site: _Optional[_Union[_seed_pb2.SiteSignature, _Mapping]] = ..., blueprint_names: _Optional[_Iterable[str]] = ..., wait: _Optional[bool] = ...) -> None: ...

class EnsureKernelsResponse(_message.Message):
    __slots__ = ("jobs", "unsupported_blueprints")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    UNSUPPORTED_BLUEPRINTS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[CompileJob]
    unsupported_blueprints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, jobs: _Optional[_Iterable[_Union[CompileJob, _Mapping]]] = ..., unsupported_blueprints: _Optional[_Iterable[str]] = ...) -> None: ...
