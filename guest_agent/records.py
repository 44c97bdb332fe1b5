"""`NamedTuple` for the agent's immutable records, without importing `typing` at run time.

Type checkers see `typing.NamedTuple`. At run time a small stand-in builds the
same kind of class on `collections.namedtuple`: `typing` pulls in `re`,
`enum` and friends, which an emulated guest pays for on every boot (see
docs/benchmarks.md). Fields come from the class's annotations, defaults from
its assignments; methods and properties defined in the body are kept.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
else:
    from collections import namedtuple

    class _NamedTupleMeta(type):
        def __new__(mcls, name, bases, namespace):
            if not bases:  # the NamedTuple marker class itself
                return super().__new__(mcls, name, bases, namespace)
            fields = list(namespace.get("__annotations__", {}))
            defaults = [namespace[f] for f in fields if f in namespace]
            base = namedtuple(name, fields, defaults=defaults, module=namespace["__module__"])
            body = {
                key: value
                for key, value in namespace.items()
                if key not in fields and key != "__annotations__"
            }
            body["__slots__"] = ()
            return type(name, (base,), body)

    class NamedTuple(metaclass=_NamedTupleMeta):
        """Base class: `class Point(NamedTuple): x: int; y: int = 0`."""


__all__ = ["NamedTuple"]
