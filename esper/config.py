"""One config mechanism for every component: frozen kw-only dataclasses built by `from_dict`.

    @dataclass(kw_only=True, frozen=True)
    class UrzaConfig:
        chunk_size: int = 256 << 10
        \"\"\"GetKernel chunk size (bytes).\"\"\"

        def __post_init__(self) -> None:          # ValueError, naming value and what is allowed
            if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
                raise ValueError(f"urza.chunk_size={self.chunk_size}: must be in [...]")

        @classmethod
        def from_dict(cls, data: Mapping[str, Any] | None) -> UrzaConfig:
            return from_dict(cls, data, what="urza settings")

`from_dict(cls, data)` turns a plain mapping (YAML, JSON, `ESPER_<PART>_<KEY>` values) into
the dataclass, recursively, driven by the field annotations:

* nested dataclass fields take a mapping (or an instance); `X | None` takes None; tuples,
  lists and frozensets take a list or tuple (a list becomes a tuple, so a frozen config
  stays hashable); mappings are copied with their values converted (`Mapping[str, Sub]`
  builds each `Sub`); `Literal[...]` and Enum fields take one of their values (an Enum
  also its member name); `Path` takes a string; an int is a valid float.
* every failure is one `ConfigError` that names the dotted key path (also in
  `metadata["configKey"]`): an unknown key (with the keys allowed there), a missing
  required key, a value of the wrong type, or the `ValueError` a `__post_init__` raised.
* a `__post_init__` that checks one field among several (a bound that depends on another
  field, or a key inside a mapping) raises `FieldError(key, message)`, a `ValueError`
  whose key `from_dict` adds to the path it names ("optimizer.warmup_epochs").
* `field(metadata={PARSE: fn})` runs `fn` on the raw value first (e.g. a comma-separated
  string of URLs into a tuple), for a field whose YAML form is not its Python type.

`to_dict(config)` is the inverse (plain lists, dicts, strings). `from_message` and
`to_message` derive the mapping between a config and a protobuf message of the same
field names (nested messages ↔ nested dataclasses, repeated ↔ tuples, maps ↔ mappings,
`google.protobuf.Duration` ↔ seconds), so a config that mirrors a wire message is not
mirrored by hand.

Direct construction (`UrzaConfig(chunk_size=1)`) raises the plain `ValueError`; code that
builds a config from user input goes through `from_dict` or `replace` to get the
`ConfigError` (an `EsperError`, so the CLI prints it and a service answers
INVALID_ARGUMENT).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from esper.errors import ConfigError

T = TypeVar("T")

PARSE = "esper.config.parse"
"""Field metadata key: a function applied to a field's raw value before it is converted."""

ErrorFactory = Callable[[str, str], Exception]
"""(message, dotted key path) → the exception `from_dict` raises."""


class FieldError(ValueError):
    """A `__post_init__`'s ValueError about one field (`key`, dotted below the dataclass).

    Direct construction shows "key: message"; `from_dict` names the full dotted path
    ("budget.max_seeds: ...") and passes that path to its error factory.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def config_error(message: str, key: str) -> ConfigError:
    """The default `ErrorFactory`: a `ConfigError` with `metadata["configKey"]`."""
    return ConfigError(message, metadata={"configKey": key} if key else None)


def reject_unknown_keys(cls: type, data: Mapping[str, Any], what: str) -> None:
    """Raise ConfigError naming every key of `data` that `cls` (a dataclass) has no field for.

    `what` names the keys in the message: "unknown {what} [...]; allowed: [...]".
    """
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise config_error(f"unknown {what} {unknown}; allowed: {sorted(known)}", unknown[0])


# --------------------------------------------------------------------------- from_dict


@dataclasses.dataclass(frozen=True)
class _Where:
    """Where in the document a value sits: the names used in error messages."""

    what: str
    """Noun for the document's keys, e.g. "urza settings"."""
    root: str
    """Dotted path of the document itself ("" at the top level)."""
    rel: str = ""
    """Dotted path below the document's top level."""
    error: ErrorFactory = config_error

    def at(self, key: str | int) -> _Where:
        step = f"[{key}]" if isinstance(key, int) else (f"{key}" if not self.rel else f".{key}")
        return dataclasses.replace(self, rel=f"{self.rel}{step}")

    @property
    def full(self) -> str:
        if not self.root:
            return self.rel
        if not self.rel:
            return self.root
        return self.root + (self.rel if self.rel.startswith("[") else f".{self.rel}")

    def fail(self, message: str) -> Exception:
        return self.error(message, self.full)


def from_dict(cls: type[T], data: Mapping[str, Any] | T | None, *, what: str | None = None,
              path: str = "", error: ErrorFactory = config_error) -> T:
    """Build the dataclass `cls` from a plain mapping (None: every default).

    Args:
        what: noun for the mapping's keys in messages ("unknown {what} [...]"); default
            "<ClassName> keys".
        path: dotted path of the mapping in a larger document (e.g. "settings.urza"),
            prefixed to every key path the errors name.
        error: builds the raised exception from (message, dotted key path); the default
            raises `ConfigError`.

    Raises:
        ConfigError (or what `error` builds): see the module docstring.
    """
    where = _Where(what or f"{cls.__name__} keys", path, "", error)
    return _build(cls, data, where)


def replace(config: T, /, **changes: Any) -> T:
    """`dataclasses.replace` whose validation failures are `ConfigError`s naming the class."""
    try:
        return dataclasses.replace(config, **changes)  # type: ignore[type-var]
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{type(config).__name__}: {e}") from e


def _build(cls: type[T], data: Any, where: _Where) -> T:
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        label = where.full or where.what
        raise where.fail(f"{label} must be a mapping of keys to values, got "
                         f"{type(data).__name__} {data!r}")
    declared = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(declared), key=str)
    if unknown:
        under = f" under {where.full!r}" if where.rel else ""
        raise where.at(str(unknown[0])).fail(
            f"unknown {where.what} {unknown}{under}; allowed: {sorted(declared)}")
    hints = _hints(cls)
    missing = [name for name, f in declared.items() if f.init and name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise where.at(missing[0]).fail(f"{where.what}: missing required key(s) "
                                        f"{[where.at(m).full for m in missing]}")
    kwargs: dict[str, Any] = {}
    for key, raw in data.items():
        f = declared[key]
        if not f.init:
            raise where.at(key).fail(f"{where.what}: {where.at(key).full} cannot be set")
        parse = f.metadata.get(PARSE)
        value = raw
        if parse is not None:
            try:
                value = parse(raw)
            except (TypeError, ValueError) as e:
                raise _wrapped(where.at(key), e) from e
        kwargs[key] = _convert(hints.get(key, Any), value, where.at(key))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise _wrapped(where, e) from e


def _wrapped(where: _Where, e: Exception) -> Exception:
    """A `__post_init__`'s (or a parser's) error with the key path in front of it."""
    if isinstance(e, FieldError):
        where = where.at(e.key)
        text = e.message
    else:
        text = str(e)
    full = where.full
    if isinstance(e, ConfigError) and not full:
        return e
    message = f"{full}: {text}" if full else text
    out = where.fail(message)
    if isinstance(e, ConfigError) and isinstance(out, ConfigError):
        out.metadata = {**e.metadata, **out.metadata}
    return out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        # A hint that names a TYPE_CHECKING-only import: resolve what resolves.
        out = {}
        for f in fields(cls):
            try:
                out[f.name] = typing.get_type_hints(
                    type("_", (), {"__annotations__": {f.name: f.type},
                                   "__module__": cls.__module__}))[f.name]
            except (NameError, TypeError):
                out[f.name] = Any
        return out


_NUMBER = "a number"


def _expected(hint: Any) -> str:
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return _NUMBER
    if hint is str:
        return "a string"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _type_error(where: _Where, value: Any, expected: str) -> Exception:
    return where.fail(f"{where.what}: {where.full}={value!r} must be {expected}, "
                      f"got {type(value).__name__}")


def _convert(hint: Any, value: Any, where: _Where) -> Any:
    if hint is Any or isinstance(hint, TypeVar):
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        errors = []
        for arm in arms:
            try:
                return _convert(arm, value, where)
            except ConfigError as e:
                errors.append(e)
        if len(arms) == 1 and (_dataclass_of(arms[0]) is not None
                               or typing.get_origin(arms[0]) is not None):
            raise errors[0]  # the error is inside the value: keep its key path
        raise _type_error(where, value, " or ".join(_expected(a) for a in arms)
                          + (" or null" if type(None) in args else ""))
    if origin is typing.Literal:
        if value in args:
            return value
        raise where.fail(f"{where.what}: {where.full}={value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _build(hint, value, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        if isinstance(value, str) and value in hint.__members__:
            return hint[value]
        try:
            return hint(value)
        except ValueError:
            raise where.fail(f"{where.what}: {where.full}={value!r} is not one of "
                             f"{list(hint.__members__)}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(where, value, _expected(bool))
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(where, value, _expected(int))
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        raise _type_error(where, value, _NUMBER)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(where, value, _expected(str))
    if hint is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise _type_error(where, value, "a path (string)")
    if origin in (tuple, list, set, frozenset) or origin is Sequence:
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple | set | frozenset):
            raise _type_error(where, value, "a list")
        items = list(value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise where.fail(f"{where.what}: {where.full}={value!r} must have "
                                 f"{len(args)} items, got {len(items)}")
            return tuple(_convert(a, v, where.at(i)) for i, (a, v) in enumerate(zip(args, items)))
        item = args[0] if args else Any
        out = [_convert(item, v, where.at(i)) for i, v in enumerate(items)]
        if origin is list:
            return out
        if origin in (set, frozenset):
            return frozenset(out)
        return tuple(out)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _type_error(where, value, "a mapping")
        key_hint, value_hint = args if args else (Any, Any)
        return {_convert(key_hint, k, where.at(str(k))): _convert(value_hint, v, where.at(str(k)))
                for k, v in value.items()}
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _type_error(where, value, _expected(hint))
    return value  # Callable, Protocol, ...: nothing to check here


# --------------------------------------------------------------------------- to_dict


def to_dict(config: Any) -> Any:
    """A config as plain data that `from_dict` accepts back (and YAML/JSON can hold)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in fields(config)}
    if isinstance(config, enum.Enum):
        return config.name
    if isinstance(config, Path):
        return str(config)
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, frozenset | set):
        return sorted(to_dict(v) for v in config)
    if isinstance(config, list | tuple):
        return [to_dict(v) for v in config]
    return config


# --------------------------------------------------------------------------- protobuf


def from_message(cls: type[T], msg: Any, *, names: Mapping[str, str] | None = None,
                 zero_is_default: Sequence[str] = (), what: str | None = None, path: str = "",
                 error: ErrorFactory = config_error) -> T:
    """Build `cls` from a protobuf message whose fields carry the same names.

    A dataclass field maps to the message field of the same name (or `names[field]`);
    fields the message lacks keep their defaults. An unset message field, or an unset
    `optional` scalar, means "the default"; so does a proto3 zero in a field listed in
    `zero_is_default` (a plain scalar cannot say "unset" otherwise). Nested messages build
    nested dataclasses, `Duration` becomes seconds. The result is validated by `from_dict`.
    """
    return from_dict(cls, message_to_dict(cls, msg, names=names, zero_is_default=zero_is_default),
                     what=what, path=path, error=error)


def message_to_dict(cls: type, msg: Any, *, names: Mapping[str, str] | None = None,
                    zero_is_default: Sequence[str] = ()) -> dict[str, Any]:
    """The plain mapping `from_message` validates (see there)."""
    names = names or {}
    hints = _hints(cls)
    by_name = msg.DESCRIPTOR.fields_by_name
    out: dict[str, Any] = {}
    for f in fields(cls):
        pf = by_name.get(names.get(f.name, f.name))
        if pf is None or not f.init:
            continue
        value = getattr(msg, pf.name)
        sub = _dataclass_of(hints.get(f.name, Any))
        if _is_map(pf):
            value_field = pf.message_type.fields_by_name["value"]
            out[f.name] = {k: _from_wire(value_field, v, _dataclass_of(_map_value(hints.get(f.name))))
                           for k, v in value.items()}
        elif _is_repeated(pf):
            out[f.name] = [_from_wire(pf, v, sub) for v in value]
        elif pf.message_type is not None:
            if msg.HasField(pf.name):
                out[f.name] = _from_wire(pf, value, sub)
        elif not ((pf.has_presence and not msg.HasField(pf.name))
                  or (f.name in zero_is_default and not value)):
            out[f.name] = value
    return out


def to_message(config: Any, msg: Any, *, names: Mapping[str, str] | None = None) -> Any:
    """Fill the protobuf message `msg` (an instance) from `config`; returns `msg`.

    The inverse of `from_message`: same-named fields (or `names`), nested dataclasses into
    nested messages, seconds into `Duration`; None values and fields the message lacks are
    left out.
    """
    names = names or {}
    by_name = msg.DESCRIPTOR.fields_by_name
    for f in fields(config):
        pf = by_name.get(names.get(f.name, f.name))
        value = getattr(config, f.name)
        if pf is None or value is None:
            continue
        target = getattr(msg, pf.name)
        if _is_map(pf):
            value_field = pf.message_type.fields_by_name["value"]
            for k, v in value.items():
                if value_field.message_type is not None:
                    _to_wire(value_field, v, target[k])
                else:
                    target[k] = v
        elif _is_repeated(pf):
            for v in value:
                if pf.message_type is not None:
                    _to_wire(pf, v, target.add())
                else:
                    target.append(v.value if isinstance(v, enum.Enum) else v)
        elif pf.message_type is not None:
            _to_wire(pf, value, target)
        else:
            setattr(msg, pf.name, value.value if isinstance(value, enum.Enum) else value)
    return msg


def _is_repeated(pf: Any) -> bool:
    if hasattr(pf, "is_repeated"):  # protobuf >= 6; `label` is gone in 7
        return bool(pf.is_repeated)
    return bool(pf.label == pf.LABEL_REPEATED)


def _is_map(pf: Any) -> bool:
    return bool(_is_repeated(pf) and pf.message_type is not None
                and pf.message_type.GetOptions().map_entry)


def _map_value(hint: Any) -> Any:
    args = typing.get_args(hint)
    return args[1] if len(args) == 2 else Any


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a (possibly optional or sequence) hint holds, if any."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_of(arg)
        if found is not None:
            return found
    return None


def _from_wire(pf: Any, value: Any, sub: type | None) -> Any:
    if pf.message_type is None:
        return value
    if pf.message_type.full_name == "google.protobuf.Duration":
        return value.ToNanoseconds() / 1e9
    if sub is not None:
        return message_to_dict(sub, value)
    return value


def _to_wire(pf: Any, value: Any, target: Any) -> None:
    if pf.message_type.full_name == "google.protobuf.Duration":
        target.FromNanoseconds(round(float(value) * 1e9))
    elif dataclasses.is_dataclass(value):
        to_message(value, target)
    else:
        target.CopyFrom(value)


__all__ = ["PARSE", "ErrorFactory", "FieldError", "config_error", "from_dict", "from_message",
           "message_to_dict", "reject_unknown_keys", "replace", "to_dict", "to_message"]
