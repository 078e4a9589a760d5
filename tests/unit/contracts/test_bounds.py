"""Every field a client can set has a size bound in the proto (issue 11, point 3).

Walks every request message of every Esper RPC, and every message reachable from one,
and checks that each string, bytes, repeated and map field carries a `buf.validate`
rule that bounds its size (strings and bytes: max_len, max_bytes, len, a bounded
pattern, `in`, uuid; repeated: max_items, and a bound on string items; maps:
max_pairs, and bounds on string keys and values). From the same rules it computes the
largest serialization a valid message can have, which stored nouns must keep small
(they come back many to a page).
"""

from __future__ import annotations

import re._parser as sre_parse  # type: ignore[import-not-found]
from collections.abc import Iterator

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from generated.buf.validate import validate_pb2 as v
from generated.esper.karn.v1 import karn_service_pb2
from generated.esper.tamiyo.v1 import tamiyo_service_pb2
from generated.esper.tezzeret.v1 import tezzeret_service_pb2
from generated.esper.tolaria.v1 import tolaria_service_pb2
from generated.esper.urza.v1 import urza_service_pb2

SERVICES = [
    urza_service_pb2.DESCRIPTOR.services_by_name["UrzaService"],
    tezzeret_service_pb2.DESCRIPTOR.services_by_name["TezzeretService"],
    tamiyo_service_pb2.DESCRIPTOR.services_by_name["TamiyoService"],
    karn_service_pb2.DESCRIPTOR.services_by_name["KarnService"],
    tolaria_service_pb2.DESCRIPTOR.services_by_name["TolariaService"],
]
URZA_FILE = "esper/urza/v1/urza_service.proto"
"""Bounds on Urza's own messages are the `harden-urza` half of issue 11."""
MIB = 1 << 20


def _rules(f: FieldDescriptor) -> v.FieldRules:
    return f.GetOptions().Extensions[v.field]


def _pattern_width(p: str) -> int | None:
    hi = sre_parse.parse(p).getwidth()[1]
    return None if hi >= sre_parse.MAXREPEAT else hi


def _ascii_only(items: object) -> bool:
    """Whether a parsed pattern matches ASCII text only (literals and ranges below 128)."""
    for op, arg in items:  # type: ignore[attr-defined]
        name = str(op)
        if name == "LITERAL" and arg < 128 or name in ("AT",):
            continue
        if name == "RANGE" and arg[1] < 128:
            continue
        if name == "IN" and _ascii_only(arg):
            continue
        if name in ("MAX_REPEAT", "MIN_REPEAT") and _ascii_only(arg[2]):
            continue
        if name == "SUBPATTERN" and _ascii_only(arg[3]):
            continue
        return False
    return True


def string_bound(r: v.StringRules) -> int | None:
    """Most bytes a string these rules accept can have (None: unbounded)."""
    bounds = []
    if r.HasField("max_bytes"):
        bounds.append(r.max_bytes)
    if r.HasField("len_bytes"):
        bounds.append(r.len_bytes)
    if r.HasField("max_len"):
        bounds.append(4 * r.max_len)  # characters; UTF-8 takes up to 4 bytes each
    if r.HasField("len"):
        bounds.append(4 * r.len)
    if r.HasField("pattern") and (w := _pattern_width(r.pattern)) is not None:
        bounds.append(w if _ascii_only(sre_parse.parse(r.pattern)) else 4 * w)
    if r.HasField("const"):
        bounds.append(len(r.const.encode()))
    allowed = getattr(r, "in")  # `in` is a Python keyword
    if allowed:
        bounds.append(max(len(s.encode()) for s in allowed))
    if r.HasField("uuid") and r.uuid:
        bounds.append(36)
    return min(bounds) if bounds else None


def _scalar_bound(f_type: int, r: v.FieldRules) -> int | None:
    if f_type == FieldDescriptor.TYPE_STRING:
        return string_bound(r.string)
    if f_type == FieldDescriptor.TYPE_BYTES:
        b = r.bytes
        return b.max_len if b.HasField("max_len") else (b.len if b.HasField("len") else None)
    return 10  # a varint or fixed64 at most


def reachable(desc: Descriptor) -> Iterator[Descriptor]:
    seen: set[str] = set()
    todo = [desc]
    while todo:
        d = todo.pop()
        if d.full_name in seen:
            continue
        seen.add(d.full_name)
        yield d
        for f in d.fields:
            if f.message_type is not None and f.message_type.full_name.startswith("esper."):
                mt = f.message_type
                if mt.GetOptions().map_entry:
                    value = mt.fields_by_name["value"]
                    if value.message_type is not None and value.message_type.full_name.startswith("esper."):
                        todo.append(value.message_type)
                else:
                    todo.append(mt)


def unbounded_fields(desc: Descriptor) -> list[str]:
    """`Message.field (what is missing)` for each field of `desc` without a size bound."""
    out = []
    for f in desc.fields:
        r = _rules(f)
        name = f"{desc.full_name}.{f.name}"
        is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
        if is_map:
            if not r.map.HasField("max_pairs"):
                out.append(f"{name} (map.max_pairs)")
            key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            if key.type == FieldDescriptor.TYPE_STRING and string_bound(r.map.keys.string) is None:
                out.append(f"{name} (map.keys)")
            if value.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES) and \
                    _scalar_bound(value.type, r.map.values) is None:
                out.append(f"{name} (map.values)")
        elif f.is_repeated:
            if not r.repeated.HasField("max_items"):
                out.append(f"{name} (repeated.max_items)")
            if f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES) and \
                    _scalar_bound(f.type, r.repeated.items) is None:
                out.append(f"{name} (repeated.items)")
        elif f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES) and _scalar_bound(f.type, r) is None:
            out.append(f"{name} ({'string' if f.type == FieldDescriptor.TYPE_STRING else 'bytes'} size)")
    return out


_FIXED = {FieldDescriptor.TYPE_DOUBLE: 8, FieldDescriptor.TYPE_FIXED64: 8, FieldDescriptor.TYPE_SFIXED64: 8,
          FieldDescriptor.TYPE_FLOAT: 4, FieldDescriptor.TYPE_FIXED32: 4, FieldDescriptor.TYPE_SFIXED32: 4,
          FieldDescriptor.TYPE_BOOL: 1}


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _tag_len(f: FieldDescriptor) -> int:
    return _varint_len(f.number << 3)


def _len_delimited(f: FieldDescriptor, size: int) -> int:
    return _tag_len(f) + _varint_len(size) + size


def worst_size(desc: Descriptor, depth: int = 0) -> int:
    """An upper bound on the serialized size of any message of `desc` its rules accept
    (every field at its largest, oneof members counted together)."""
    assert depth < 16, f"{desc.full_name}: recursive message"
    total = 0
    for f in desc.fields:
        r = _rules(f)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            kb = _len_delimited(key, _scalar_bound(key.type, r.map.keys) or 0)
            vb = (_len_delimited(value, worst_size(value.message_type, depth + 1)) if value.message_type is not None
                  else _len_delimited(value, _scalar_bound(value.type, r.map.values) or 0))
            total += r.map.max_pairs * _len_delimited(f, kb + vb)
            continue
        count = r.repeated.max_items if f.is_repeated else 1
        if f.message_type is not None:
            total += count * _len_delimited(f, worst_size(f.message_type, depth + 1))
        elif f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            total += count * _len_delimited(f, _scalar_bound(f.type, r.repeated.items if f.is_repeated else r) or 0)
        elif f.is_repeated:  # packed: one tag and length, the values back to back
            total += _len_delimited(f, count * _FIXED.get(f.type, 10))
        else:
            total += _tag_len(f) + _FIXED.get(f.type, 10)
    return total


def _requests() -> list[Descriptor]:
    return [m.input_type for s in SERVICES for m in s.methods]


def _messages(*, urza: bool) -> list[Descriptor]:
    seen: dict[str, Descriptor] = {}
    for req in _requests():
        for d in reachable(req):
            if (d.file.name == URZA_FILE) == urza:
                seen[d.full_name] = d
    return sorted(seen.values(), key=lambda d: d.full_name)


def test_every_client_settable_field_outside_urza_has_a_size_bound() -> None:
    missing = [m for d in _messages(urza=False) for m in unbounded_fields(d)]
    assert missing == []


def test_every_client_settable_urza_field_has_a_size_bound_and_fits_the_cap() -> None:
    missing = [m for d in _messages(urza=True) for m in unbounded_fields(d)]
    too_big = [d.full_name for d in _requests() if d.file.name == URZA_FILE and worst_size(d) > 4 * MIB]
    assert (missing, too_big) == ([], [])


def test_the_check_finds_a_missing_bound() -> None:
    # KernelRecord is a reply, so its fields are not bounded: the check must say so.
    from generated.esper.common.v1 import kernel_pb2

    assert "esper.common.v1.KernelRecord.kernel_id (string size)" in unbounded_fields(kernel_pb2.KernelRecord.DESCRIPTOR)


@pytest.mark.parametrize(("message", "budget"), [
    (tolaria_service_pb2.RunConfig.DESCRIPTOR, 256 * 1024),
    (tolaria_service_pb2.StartRunRequest.DESCRIPTOR, 256 * 1024),
])
def test_stored_nouns_stay_small(message: Descriptor, budget: int) -> None:
    # A run's config comes back in every GetRun/ListRuns reply; 3 × 1.3 MB labels once
    # made ListRuns' default page 6 MB.
    assert worst_size(message) <= budget


OVER_THE_CAP = {
    "esper.tamiyo.v1.DecideRequest":
        "a snapshot of up to 1024 slots and caller candidates for up to 1024 slots of 256 "
        "kernels each; the largest combinations are refused by the 4 MiB transport cap "
        "(RESOURCE_EXHAUSTED), whatever their rules allow",
}
"""Requests whose largest valid form may exceed gRPC's 4 MiB message cap, and why."""


def test_every_request_outside_urza_fits_the_default_message_cap() -> None:
    # gRPC's default receive limit is 4 MiB: a request the rules accept should be sendable.
    too_big = {d.full_name: worst_size(d) for d in _requests()
               if d.file.name != URZA_FILE and worst_size(d) > 4 * MIB and d.full_name not in OVER_THE_CAP}
    assert too_big == {}


def test_a_snapshot_alone_fits_the_cap() -> None:
    # What Tolaria sends every epoch: the snapshot without caller candidates.
    from generated.esper.common.v1 import health_pb2

    assert worst_size(health_pb2.HealthSnapshot.DESCRIPTOR) < 4 * MIB - 64 * 1024
