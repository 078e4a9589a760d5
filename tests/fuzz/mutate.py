"""Hypothesis strategies for hostile requests, driven by the message descriptors.

* `mutated(seed)`: a copy of a VALID request with one to three fields, anywhere in the
  message tree, set to extreme values of their type: huge ints (±2^63, 2^64-1), NaN and
  ±inf, empty, huge or odd strings (NUL, surrogate-free emoji, a 1.3 MB one), undefined
  enum numbers, long repeats of messages or scalars, timestamps/durations out of range.
  Starting from a valid request lets the mutated one pass everything but the mutated
  field, so the service core, not only the validator, meets the value.
* `raw(seed)`: bytes that are not a request — random bytes, or the seed's serialization
  cut, flipped, padded or with a field of the wrong wire type.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

T = FieldDescriptor
_INT32 = [0, 1, -1, 2**31 - 1, -(2**31)]
_INT64 = [0, 1, -1, 2**63 - 1, -(2**63), 2**53 + 1, -(2**53) - 1]
_UINT32 = [0, 1, 2**31, 2**32 - 1]
_UINT64 = [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 3.4e38]
_HUGE = "x" * 1_300_000
_STRINGS = ["", " ", "a", "\x00", "é" * 70, "\U0001F600" * 300, "../../../../etc/passwd", "%s%n{0}",
            "x" * 70_000, _HUGE, "bp-0123456789abcdef", "sha256:" + "0" * 64,
            "6F1C2A52-2A83-4C4E-9D36-5F0F3E0B1A01", "run-0", "input", "*"]
_BYTES = [b"", b"\x00", b"\xff" * 64, b"\x00" * 70_000, bytes(range(256))]


def _scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = f.type
    if t in (T.TYPE_INT32, T.TYPE_SINT32, T.TYPE_SFIXED32):
        return st.sampled_from(_INT32) | st.integers(-(2**31), 2**31 - 1)
    if t in (T.TYPE_INT64, T.TYPE_SINT64, T.TYPE_SFIXED64):
        return st.sampled_from(_INT64) | st.integers(-(2**63), 2**63 - 1)
    if t in (T.TYPE_UINT32, T.TYPE_FIXED32):
        return st.sampled_from(_UINT32) | st.integers(0, 2**32 - 1)
    if t in (T.TYPE_UINT64, T.TYPE_FIXED64):
        return st.sampled_from(_UINT64) | st.integers(0, 2**64 - 1)
    if t in (T.TYPE_DOUBLE, T.TYPE_FLOAT):
        return st.sampled_from(_FLOATS) | st.floats(allow_nan=True, allow_infinity=True,
                                                    width=32 if t == T.TYPE_FLOAT else 64)
    if t == T.TYPE_BOOL:
        return st.booleans()
    if t == T.TYPE_ENUM:
        defined = [v.number for v in f.enum_type.values]
        return st.sampled_from([*defined, -1, 99, 2**31 - 1, -(2**31)])
    if t == T.TYPE_STRING:
        return st.sampled_from(_STRINGS) | st.text(max_size=40)
    if t == T.TYPE_BYTES:
        return st.sampled_from(_BYTES) | st.binary(max_size=64)
    raise AssertionError(f"no strategy for {f.full_name} (type {t})")


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


@st.composite
def _mutate_once(draw: st.DrawFn, msg: Message) -> None:
    """Set one field somewhere under `msg` to an extreme value (in place)."""
    desc: Descriptor = msg.DESCRIPTOR
    for _ in range(8):  # walk down at most 8 levels
        fields = list(desc.fields)
        if not fields:
            return
        f = draw(st.sampled_from(fields))
        if _is_map(f):
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            target = getattr(msg, f.name)
            n = draw(st.sampled_from([1, 3, 40, 5000]))
            keys = draw(st.lists(_scalar(key_f), min_size=1, max_size=min(n, 40)))
            if n > 40:
                keys = [f"k{i}" if key_f.type == T.TYPE_STRING else i for i in range(n)]
            for k in keys:
                if value_f.message_type is not None:
                    target[k].SetInParent()
                else:
                    target[k] = draw(_scalar(value_f))
            return
        if f.is_repeated:
            target = getattr(msg, f.name)
            n = draw(st.sampled_from([0, 1, 2, 300, 20_000]))
            del target[:]
            if f.message_type is not None:
                proto = message_factory.GetMessageClass(f.message_type)()
                if n <= 2 and draw(st.booleans()):
                    for _ in range(n):
                        item = target.add()
                        draw(_mutate_once(item))
                    return
                target.extend([proto] * n)
            else:
                value = draw(_scalar(f))
                if n > 2 and isinstance(value, (str, bytes)) and len(value) > 64:
                    value = value[:64]  # many items or huge items, not both: a 1.4 GB request tests nothing
                target.extend([value] * n if n > 2 else draw(st.lists(_scalar(f), min_size=n, max_size=n)))
            return
        if f.message_type is not None:
            choice = draw(st.sampled_from(["descend", "descend", "clear", "empty"]))
            if choice == "clear":
                msg.ClearField(f.name)
                return
            sub = getattr(msg, f.name)
            if choice == "empty":
                sub.Clear()
                sub.SetInParent()
                return
            msg, desc = sub, f.message_type
            continue
        setattr(msg, f.name, draw(_scalar(f)))
        return


@st.composite
def mutated(draw: st.DrawFn, seed: Message) -> Message:
    """A copy of `seed` with 1–3 fields set to extreme values."""
    msg = type(seed)()
    msg.CopyFrom(seed)
    for _ in range(draw(st.integers(1, 3))):
        draw(_mutate_once(msg))
    return msg


def _wrong_wire_type(seed: bytes) -> st.SearchStrategy[bytes]:
    # Field 1 sent as a varint, a fixed64, a length that runs past the end, a group.
    return st.sampled_from([b"\x08\x01", b"\x09" + b"\x00" * 8, b"\x0a\xff\xff\x03", b"\x0b\x0c",
                            b"\x0f", b"\x00"]).map(lambda prefix: prefix + seed)


@st.composite
def _edited(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed or b"\x00")
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "double"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            data.extend(bytes(data))
    return bytes(data)


def raw(seed: Message) -> st.SearchStrategy[bytes]:
    """Bytes that a client could send instead of a serialized request."""
    wire = seed.SerializeToString()
    return st.one_of(st.binary(max_size=256), _edited(wire), _wrong_wire_type(wire),
                     st.just(b"\xff" * 10), st.just(b"\x0a" + b"\xff\xff\xff\xff\x0f"))
