from generated.buf.validate import validate_pb2 as _validate_pb2
from generated.esper.common.v1 import seed_pb2 as _seed_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttrValue(_message.Message):
    __slots__ = ("int_value", "float_value", "string_value", "bool_value")
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    int_value: int
    float_value: float
    string_value: str
    bool_value: bool
    def __init__(self, int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., string_value: _Optional[str] = ..., bool_value: _Optional[bool] = ...) -> None: ...

class IRNode(_message.Message):
    __slots__ = ("name", "op", "inputs", "attrs")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttrValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttrValue, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    name: str
    op: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    attrs: _containers.MessageMap[str, AttrValue]
    def __init__(self, name: _Optional[str] = ..., op: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., attrs: _Optional[_Mapping[str, AttrValue]] = ...) -> None: ...

class BlueprintIR(_message.Message):
    __slots__ = ("ir_version", "nodes", "output")
    IR_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ir_version: int
    nodes: _containers.RepeatedCompositeFieldContainer[IRNode]
    output: str
    def __init__(self, ir_version: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[IRNode, _Mapping]]] = ..., output: _Optional[str] = ...) -> None: ...

class Blueprint(_message.Message):
    __slots__ = ("blueprint_id", "name", "family", "description", "ir", "layouts", "tags", "parent_ids", "origin")
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    IR_FIELD_NUMBER: _ClassVar[int]
    LAYOUTS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PARENT_IDS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    blueprint_id: str
    name: str
    family: str
    description: str
    ir: BlueprintIR
    layouts: _containers.RepeatedScalarFieldContainer[_seed_pb2.ActivationLayout]
    tags: _containers.RepeatedScalarFieldContainer[str]
    parent_ids: _containers.RepeatedScalarFieldContainer[str]
    origin: str
    def __init__(self, blueprint_id: _Optional[str] = ..., name: _Optional[str] = ..., family: _Optional[str] = ..., description: _Optional[str] = ..., ir: _Optional[_Union[BlueprintIR, _Mapping]] = ..., layouts: _Optional[_Iterable[_Union[_seed_pb2.ActivationLayout, str]]] = ..., tags: _Optional[_Iterable[str]] = ..., parent_ids: _Optional[_Iterable[str]] = ..., origin: _Optional[str] = ...) -> None: ...
