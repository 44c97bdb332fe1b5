"""guest_agent.records: the run-time NamedTuple stand-in behaves as typing.NamedTuple."""

from __future__ import annotations

import pickle
import typing

import pytest

from guest_agent.records import (
    NamedTuple,
    _NamedTupleMeta,  # type: ignore[attr-defined]
)


class Point(NamedTuple):
    """A point."""

    x: int
    y: int = 0
    tag: str = "p"

    @property
    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)

    def moved(self, dx: int) -> Point:
        return self._replace(x=self.x + dx)


class TypingPoint(typing.NamedTuple):
    x: int
    y: int = 0
    tag: str = "p"


def test_built_by_the_stand_in_not_by_typing() -> None:
    # test modules run with TYPE_CHECKING False: the class comes from the agent's builder
    assert isinstance(NamedTuple, _NamedTupleMeta)
    assert "_tuplegetter" in type(Point.__dict__["x"]).__name__


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((1,), {}),
        ((1, 2), {}),
        ((1, 2, "q"), {}),
        ((), {"x": 3}),
        ((1,), {"tag": "z"}),
        ((), {"y": 5, "x": 4}),
    ],
)
def test_construction_as_typing(args: tuple, kwargs: dict) -> None:
    ours, theirs = Point(*args, **kwargs), TypingPoint(*args, **kwargs)
    assert tuple(ours) == tuple(theirs)
    assert repr(ours) == repr(theirs).replace("TypingPoint", "Point")
    assert ours._asdict() == theirs._asdict()


@pytest.mark.parametrize(
    "args, kwargs",
    [((), {}), ((1, 2, "q", 4), {}), ((1,), {"x": 2}), ((1,), {"z": 2}), ((), {"y": 1})],
)
def test_bad_calls_raise_type_error_as_typing(args: tuple, kwargs: dict) -> None:
    with pytest.raises(TypeError):
        TypingPoint(*args, **kwargs)
    with pytest.raises(TypeError, match=r"Point\(\)"):
        Point(*args, **kwargs)


def test_tuple_behaviour_and_helpers() -> None:
    p = Point(1, 2)
    assert p == (1, 2, "p") and hash(p) == hash((1, 2, "p"))
    assert p.x == 1 and p[1] == 2 and p.tag == "p"
    assert p.norm1 == 3 and p.moved(4) == Point(5, 2)
    assert type(p.moved(4)) is Point
    assert Point._fields == ("x", "y", "tag") == Point.__match_args__
    assert Point._field_defaults == {"y": 0, "tag": "p"}
    assert Point._make([7, 8, "t"]) == Point(7, 8, "t")
    with pytest.raises(TypeError):
        Point._make([1])
    with pytest.raises(ValueError):
        p._replace(z=1)
    with pytest.raises(AttributeError):
        p.x = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        p.other = 5  # type: ignore[attr-defined]
    assert Point.__doc__ == "A point."
    assert Point.__module__ == __name__ and Point.__qualname__ == "Point"
    assert pickle.loads(pickle.dumps(p)) == p
    match p:
        case Point(a, b):
            assert (a, b) == (1, 2)


def test_default_before_required_is_refused() -> None:
    with pytest.raises(TypeError):

        class Bad(NamedTuple):
            a: int = 0
            b: int
