"""protovalidate on request messages, violations as dotted field paths.

The rules live in the .proto files (`buf.validate`); this module only runs them and
turns each violation into (field path, description, rule id), e.g.
("config.sites", "must contain no more than 64 item(s)", "repeated.max_items") or
("ir.nodes[2].op", "value length must be at least 1 characters", "string.min_len").
"""

from __future__ import annotations

import protovalidate
from google.protobuf.message import Message

from esper.runtime.errors import RequestValidationError

_validator = protovalidate.Validator()


def field_path(elements: object) -> str:
    """Dotted path of a protovalidate FieldPath: `a.b[3].c["key"]`."""
    out: list[str] = []
    for el in elements:  # type: ignore[attr-defined]
        out.append(("." if out else "") + el.field_name)
        sub = el.subscript
        if sub is not None:
            out.append(f'["{sub.value}"]' if sub.field == "string_key" else f"[{sub.value}]")
    return "".join(out)


def violations_of(msg: Message) -> list[tuple[str, str, str]]:
    """Every rule the message breaks, as (field path, description, rule id); empty when valid."""
    try:
        _validator.validate(msg)
    except protovalidate.ValidationError as e:
        out = []
        for v in e.violations:
            p = v.proto
            path = field_path(p.field.elements) if p.field is not None else ""
            out.append((path, p.message or p.rule_id, p.rule_id))
        return out
    return []


def check(msg: Message) -> None:
    """Raise RequestValidationError naming every broken field of `msg`.

    The message lists each violation as "<field>: <description>" so a human reading
    only the status details still learns which field to fix and how.
    """
    violations = violations_of(msg)
    if violations:
        text = "; ".join(f"{f or msg.DESCRIPTOR.name}: {d}" for f, d, _ in violations)
        raise RequestValidationError(f"invalid {msg.DESCRIPTOR.full_name}: {text}", violations,
                                     message_type=msg.DESCRIPTOR.full_name)
