"""IR node attributes: Python values ⇄ `esper.common.v1.AttrValue` (the one conversion)."""

from __future__ import annotations

from typing import Any

from generated.esper.common.v1 import blueprint_pb2

AttrPython = bool | int | float | str
"""What an attribute holds in Python: the oneof of `AttrValue`."""


def to_attr(value: AttrPython) -> blueprint_pb2.AttrValue:
    """The `AttrValue` holding `value` (bool before int: a bool is an int in Python).

    Raises:
        TypeError: `value` is not a bool, int, float or str.
    """
    out = blueprint_pb2.AttrValue()
    set_value(out, value)
    return out


def set_value(attr: blueprint_pb2.AttrValue, value: AttrPython) -> None:
    """Store `value` in `attr` (in place, e.g. `node.attrs[key]`), replacing what it held."""
    if isinstance(value, bool):
        attr.bool_value = value
    elif isinstance(value, int):
        attr.int_value = value
    elif isinstance(value, float):
        attr.float_value = value
    elif isinstance(value, str):
        attr.string_value = value
    else:
        raise TypeError(f"IR attribute value {value!r} is a {type(value).__name__}; "
                        "allowed: bool, int, float, str")


def set_attr(node: blueprint_pb2.IRNode, key: str, value: AttrPython) -> None:
    """`node.attrs[key] = value`, converted."""
    set_value(node.attrs[key], value)


def from_attr(value: Any) -> Any:
    """The Python value an `AttrValue` holds (None when unset); plain values pass through."""
    if hasattr(value, "WhichOneof"):
        which = value.WhichOneof("value")
        return None if which is None else getattr(value, which)
    return value


def attr_of(node: blueprint_pb2.IRNode, key: str) -> Any:
    """The Python value of `node.attrs[key]`, or None when the node does not set it."""
    return from_attr(node.attrs[key]) if key in node.attrs else None


def typed_attr(value: blueprint_pb2.AttrValue) -> list[Any]:
    """[kind, value] of an `AttrValue` ("int_value", 3), the form canonical IR hashes."""
    which = value.WhichOneof("value")
    return [which, getattr(value, which) if which else None]


__all__ = ["AttrPython", "attr_of", "from_attr", "set_attr", "set_value", "to_attr", "typed_attr"]
