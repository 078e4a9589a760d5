from generated.buf.validate import validate_pb2 as _validate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SeedStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEED_STAGE_UNSPECIFIED: _ClassVar[SeedStage]
    SEED_STAGE_DORMANT: _ClassVar[SeedStage]
    SEED_STAGE_GERMINATED: _ClassVar[SeedStage]
    SEED_STAGE_TRAINING: _ClassVar[SeedStage]
    SEED_STAGE_BLENDING: _ClassVar[SeedStage]
    SEED_STAGE_HOLDING: _ClassVar[SeedStage]
    SEED_STAGE_FOSSILIZED: _ClassVar[SeedStage]
    SEED_STAGE_PRUNED: _ClassVar[SeedStage]
    SEED_STAGE_EMBARGOED: _ClassVar[SeedStage]
    SEED_STAGE_RESETTING: _ClassVar[SeedStage]

class ActivationLayout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVATION_LAYOUT_UNSPECIFIED: _ClassVar[ActivationLayout]
    ACTIVATION_LAYOUT_NC: _ClassVar[ActivationLayout]
    ACTIVATION_LAYOUT_NCL: _ClassVar[ActivationLayout]
    ACTIVATION_LAYOUT_NCHW: _ClassVar[ActivationLayout]
    ACTIVATION_LAYOUT_NLD: _ClassVar[ActivationLayout]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    D_TYPE_UNSPECIFIED: _ClassVar[DType]
    D_TYPE_FLOAT32: _ClassVar[DType]
    D_TYPE_FLOAT16: _ClassVar[DType]
    D_TYPE_BFLOAT16: _ClassVar[DType]
    D_TYPE_FLOAT64: _ClassVar[DType]

class SlotKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLOT_KIND_UNSPECIFIED: _ClassVar[SlotKind]
    SLOT_KIND_PARALLEL: _ClassVar[SlotKind]
SEED_STAGE_UNSPECIFIED: SeedStage
SEED_STAGE_DORMANT: SeedStage
SEED_STAGE_GERMINATED: SeedStage
SEED_STAGE_TRAINING: SeedStage
SEED_STAGE_BLENDING: SeedStage
SEED_STAGE_HOLDING: SeedStage
SEED_STAGE_FOSSILIZED: SeedStage
SEED_STAGE_PRUNED: SeedStage
SEED_STAGE_EMBARGOED: SeedStage
SEED_STAGE_RESETTING: SeedStage
ACTIVATION_LAYOUT_UNSPECIFIED: ActivationLayout
ACTIVATION_LAYOUT_NC: ActivationLayout
ACTIVATION_LAYOUT_NCL: ActivationLayout
ACTIVATION_LAYOUT_NCHW: ActivationLayout
ACTIVATION_LAYOUT_NLD: ActivationLayout
D_TYPE_UNSPECIFIED: DType
D_TYPE_FLOAT32: DType
D_TYPE_FLOAT16: DType
D_TYPE_BFLOAT16: DType
D_TYPE_FLOAT64: DType
SLOT_KIND_UNSPECIFIED: SlotKind
SLOT_KIND_PARALLEL: SlotKind

class ActivationSpec(_message.Message):
    __slots__ = ("layout", "channels", "spatial", "dtype")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    layout: ActivationLayout
    channels: int
    spatial: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, layout: _Optional[_Union[ActivationLayout, str]] = ..., channels: _Optional[int] = ..., spatial: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class SiteSignature(_message.Message):
    __slots__ = ("layout", "channels", "spatial", "dtype", "kind", "input")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    layout: ActivationLayout
    channels: int
    spatial: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    kind: SlotKind
    input: ActivationSpec
    def __init__(self, layout: _Optional[_Union[ActivationLayout, str]] = ..., channels: _Optional[int] = ..., spatial: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., kind: _Optional[_Union[SlotKind, str]] = ..., input: _Optional[_Union[ActivationSpec, _Mapping]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...
