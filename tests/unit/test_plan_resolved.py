"""Ordering by resolved target (issue 8, item 7): a symlink in the root moves a WHERE."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from guest_agent.config.merge import merge, parse_cmdline
from guest_agent.plan import Step, is_within, order_by_resolved, plan


def steps_of(*wheres: str) -> list[Step]:
    config, problems = merge(
        [parse_cmdline(" ".join(f"microvm.volume=tmpfs:{w}:tmpfs" for w in wheres))]
    )
    assert problems == ()
    steps, problems = plan(config)
    assert problems == []
    return steps


def order(steps: list[Step]) -> list[tuple[str, tuple[str, ...]]]:
    return [(s.where, s.after) for s in steps]


def test_silverblue_home_symlink() -> None:
    # /home -> var/home in the root: /home/alice lands beneath /var/home
    steps = steps_of("/var/home", "/home/alice")
    assert [s.where for s in steps] == ["/home/alice", "/var/home"]  # as written
    resolved = {"/home/alice": "/var/home/alice", "/var/home": "/var/home"}
    assert order(order_by_resolved(steps, resolved)) == [
        ("/var/home", ()),
        ("/home/alice", ("/var/home",)),
    ]


def test_nothing_resolved_keeps_the_plan() -> None:
    steps = steps_of("/a", "/a/b", "/c", "/c/d/e")
    assert order_by_resolved(steps, {}) == steps
    assert order_by_resolved(steps, {s.where: s.where for s in steps}) == steps
    assert order_by_resolved([], {}) == []


def test_unrelated_steps_keep_plan_order() -> None:
    steps = steps_of("/a", "/b", "/c", "/z/y/x")
    assert [s.where for s in steps] == ["/a", "/b", "/c", "/z/y/x"]
    # /b resolves beneath /z/y/x: only it moves, right after /z/y/x
    got = order_by_resolved(steps, {"/b": "/z/y/x/b"})
    assert order(got) == [("/a", ()), ("/c", ()), ("/z/y/x", ()), ("/b", ("/z/y/x",))]
    # already after its resolved parent: nothing moves, the dependency is added
    got = order_by_resolved(steps, {"/z/y/x": "/b/x"})
    assert order(got) == [("/a", ()), ("/b", ()), ("/c", ()), ("/z/y/x", ("/b",))]


def test_a_chain_through_symlinks() -> None:
    # /l1 -> /srv, /l2 -> /srv/data: written flat, resolved nested three deep
    steps = steps_of("/l2/deep", "/l1/data", "/srv")
    assert [s.where for s in steps] == ["/srv", "/l1/data", "/l2/deep"]
    shuffled = [steps[2], steps[1], steps[0]]
    resolved = {"/l1/data": "/srv/data", "/l2/deep": "/srv/data/deep"}
    for permutation in itertools.permutations(shuffled):
        got = order_by_resolved(list(permutation), resolved)
        assert order(got) == [
            ("/srv", ()),
            ("/l1/data", ("/srv",)),
            ("/l2/deep", ("/l1/data",)),
        ]


def test_only_the_deepest_resolved_parent_is_added() -> None:
    steps = steps_of("/a", "/a/b", "/x")
    got = order_by_resolved(steps, {"/x": "/a/b/x"})
    assert order(got) == [("/a", ()), ("/a/b", ("/a",)), ("/x", ("/a/b",))]


def test_a_step_waits_for_its_written_parent_when_that_was_held_back() -> None:
    # /c is held back behind /z (it resolves beneath it); /c/d, its written child,
    # must still come after /c
    steps = steps_of("/c", "/c/d", "/z")
    assert [s.where for s in steps] == ["/c", "/z", "/c/d"]
    got = order_by_resolved(steps, {"/c": "/z/c", "/c/d": "/z/c/d"})
    assert order(got) == [("/z", ()), ("/c", ("/z",)), ("/c/d", ("/c",))]


def test_two_steps_resolving_to_the_same_path_keep_plan_order() -> None:
    steps = steps_of("/home", "/var/home", "/home/alice")
    resolved = {"/home": "/var/home", "/home/alice": "/var/home/alice"}
    got = order_by_resolved(steps, resolved)
    # neither /home nor /var/home is beneath the other; the child waits for the first
    assert order(got) == [("/home", ()), ("/var/home", ()), ("/home/alice", ("/home",))]


def test_a_target_resolving_to_the_root_is_no_parent() -> None:
    steps = steps_of("/a", "/evil", "/b")
    got = order_by_resolved(steps, {"/evil": "/"})
    assert got == steps


def test_a_parent_resolving_beneath_its_child_goes_last_and_is_skipped() -> None:
    # /a -> /x/y and /a/b -> /x: the written parent /a lands beneath its child /a/b
    steps = steps_of("/a", "/a/b", "/c")
    got = order_by_resolved(steps, {"/a": "/x/y", "/a/b": "/x"})
    assert order(got) == [("/c", ()), ("/a", ("/a/b",)), ("/a/b", ("/a",))]


def test_unnormalised_targets_are_normalised() -> None:
    steps = steps_of("/var/home", "/home/alice")
    got = order_by_resolved(steps, {"/home/alice": "//var/./home/alice/"})
    assert [s.where for s in got] == ["/var/home", "/home/alice"]


# --- properties ------------------------------------------------------------------------

names = st.sampled_from(["a", "b", "c"])
paths = st.lists(names, min_size=1, max_size=4).map(lambda p: "/" + "/".join(p))


@settings(database=None, max_examples=500, deadline=None)
@given(st.lists(paths, min_size=1, max_size=8, unique=True), st.data())
def test_resolved_parents_come_first(wheres: list[str], data: st.DataObject) -> None:
    steps = steps_of(*wheres)
    resolved = {w: data.draw(paths, label=w) for w in wheres if data.draw(st.booleans())}
    got = order_by_resolved(steps, resolved)
    assert sorted(s.where for s in got) == sorted(wheres)
    position = {s.where: i for i, s in enumerate(got)}
    target = {s.where: resolved.get(s.where, s.where) for s in steps}
    planned = {s.where: s.after for s in steps}
    for step in got:
        # the plan's dependencies are kept; the resolved parent is added: the first
        # step in plan order at the deepest target strictly above this one's
        above = [o for o in steps if target[o.where] != target[step.where]
                 and is_within(target[step.where], target[o.where])]  # fmt: skip
        deepest = max((len(target[o.where]) for o in above), default=0)
        parent = next((o.where for o in above if len(target[o.where]) == deepest), None)
        assert set(step.after) == set(planned[step.where]) | ({parent} if parent else set())
        assert list(step.after) == sorted(step.after)
    # every step comes after what it needs, but for a tail of steps that cannot
    # (a parent resolving beneath its child), each of which needs one not mounted yet
    ok = [all(position[d] < position[s.where] for d in s.after) for s in got]
    tail = ok.index(False) if False in ok else len(ok)
    assert all(ok[:tail])
    for step in got[tail:]:
        assert any(position[d] >= tail for d in step.after)
    if tail < len(got):  # only a resolved parent can close such a loop
        assert any(
            position[d] >= tail and target[d] != target[s.where]
            and is_within(target[s.where], target[d])
            for s in got[tail:] for d in s.after
        )  # fmt: skip
