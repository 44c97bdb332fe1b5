"""`NamedTuple` for the agent's immutable records, without `typing` or `collections`.

Type checkers see `typing.NamedTuple`. At run time a small stand-in builds a
tuple subclass with the same behaviour (fields from the class's annotations,
defaults from its assignments, `_replace`, `_asdict`, `_make`, `_fields`, the
same repr; methods and properties of the body kept). `typing` pulls in `re`,
`enum` and friends; `collections.namedtuple` imports five modules and compiles
each class's `__new__` from source with `eval`: on an emulated guest's boot path
the agent's 20-odd record types cost ≈ 30 ms that way (bench/analysis.md).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
else:
    from _collections import _tuplegetter  # the field accessor namedtuple uses (C)

    _tuple_new = tuple.__new__

    def _bind(name, fields, defaults, args, kwargs):
        """The field values for NAME(*ARGS, **KWARGS), or TypeError as a function call."""
        if len(args) > len(fields):
            raise TypeError(
                f"{name}() takes {len(fields)} positional arguments but {len(args)} were given"
            )
        values = list(args)
        for field in fields[len(args) :]:
            if field in kwargs:
                values.append(kwargs.pop(field))
            elif field in defaults:
                values.append(defaults[field])
            else:
                raise TypeError(f"{name}() missing required argument: {field!r}")
        for key in kwargs:
            how = (
                "multiple values for argument"
                if key in fields
                else "an unexpected keyword argument"
            )
            raise TypeError(f"{name}() got {how} {key!r}")
        return values

    def _record_methods(name, fields, defaults):
        width = len(fields)

        def __new__(cls, *args, **kwargs):
            if kwargs or len(args) != width:
                args = _bind(name, fields, defaults, args, kwargs)
            return _tuple_new(cls, args)

        @classmethod
        def _make(cls, iterable):
            values = _tuple_new(cls, iterable)
            if len(values) != width:
                raise TypeError(f"Expected {width} arguments, got {len(values)}")
            return values

        def _replace(self, **changes):
            values = [changes.pop(f, v) for f, v in zip(fields, self, strict=True)]
            if changes:
                raise ValueError(f"Got unexpected field names: {list(changes)!r}")
            return _tuple_new(type(self), values)

        def _asdict(self):
            return dict(zip(fields, self, strict=True))

        def __repr__(self):
            inner = ", ".join(f"{f}={v!r}" for f, v in zip(fields, self, strict=True))
            return f"{type(self).__name__}({inner})"

        def __getnewargs__(self):
            return tuple(self)

        return {
            "__new__": __new__,
            "_make": _make,
            "_replace": _replace,
            "_asdict": _asdict,
            "__repr__": __repr__,
            "__getnewargs__": __getnewargs__,
        }

    class _NamedTupleMeta(type):
        def __new__(mcls, name, bases, namespace):
            if not bases:  # the NamedTuple marker class itself
                return super().__new__(mcls, name, bases, namespace)
            fields = tuple(namespace.get("__annotations__", {}))
            defaults = {f: namespace[f] for f in fields if f in namespace}
            if any(f not in defaults for f in fields[len(fields) - len(defaults) :]):
                raise TypeError(f"{name}: a field without a default follows one with a default")
            body = {k: v for k, v in namespace.items() if k not in defaults}
            body.pop("__annotations__", None)
            body.update(_record_methods(name, fields, defaults))
            body.update(
                (f, _tuplegetter(i, f"Alias for field number {i}")) for i, f in enumerate(fields)
            )
            body["__slots__"] = ()
            body["_fields"] = body["__match_args__"] = fields
            body["_field_defaults"] = defaults
            return type.__new__(type, name, (tuple,), body)

    class NamedTuple(metaclass=_NamedTupleMeta):
        """Base class: `class Point(NamedTuple): x: int; y: int = 0`."""


__all__ = ["NamedTuple"]
