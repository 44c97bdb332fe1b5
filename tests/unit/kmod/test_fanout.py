"""Work on a dependency graph on several threads (guest_agent.kmod.fanout): order, failures, limits."""

from __future__ import annotations

import threading
from graphlib import CycleError

import pytest

from guest_agent.kmod.fanout import run_graph

# ext4-like: a needs b and c; b needs d; e stands alone.
GRAPH = {"a": ["b", "c"], "b": ["d"], "c": [], "d": [], "e": []}


class Log:
    def __init__(
        self, fail: frozenset[str] = frozenset(), raises: frozenset[str] = frozenset()
    ) -> None:
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.finished: list[str] = []
        self.running = 0
        self.most = 0
        self.fail = fail
        self.raises = raises

    def work(self, item: str) -> bool:
        with self.lock:
            self.started.append(item)
            self.running += 1
            self.most = max(self.most, self.running)
        if item in self.raises:
            raise RuntimeError(item)
        with self.lock:
            self.running -= 1
            self.finished.append(item)
        return item not in self.fail


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_each_item_after_what_it_needs(workers: int) -> None:
    log = Log()
    assert run_graph(GRAPH, log.work, workers) == set(GRAPH)
    assert sorted(log.started) == sorted(GRAPH)
    for item, needs in GRAPH.items():
        for need in needs:
            assert log.finished.index(need) < log.started.index(item)
    assert log.most <= workers


def test_independent_items_run_at_the_same_time() -> None:
    # Each of the two waits for the other: only a parallel run gets both past the barrier.
    barrier = threading.Barrier(2, timeout=10)

    def work(_item: str) -> bool:
        barrier.wait()
        return True

    assert run_graph({"x": [], "y": []}, work, 2) == {"x", "y"}


def test_a_failure_stops_what_needs_it_and_nothing_else() -> None:
    log = Log(fail=frozenset({"d"}))
    assert run_graph(GRAPH, log.work, 2) == {"c", "e"}
    assert "b" not in log.started and "a" not in log.started  # a needs b, which needs d


def test_an_exception_counts_as_a_failure() -> None:
    log = Log(raises=frozenset({"c"}))
    assert run_graph(GRAPH, log.work, 3) == {"b", "d", "e"}
    assert "a" not in log.started


def test_needs_outside_the_graph_count_as_met() -> None:
    log = Log()
    assert run_graph({"a": ["loaded-already"]}, log.work, 2) == {"a"}


def test_a_cycle_is_refused_before_any_work() -> None:
    log = Log()
    with pytest.raises(CycleError):
        run_graph({"a": ["b"], "b": ["a"], "c": []}, log.work, 2)
    assert log.started == []


def test_an_optional_need_that_fails_stops_nothing() -> None:
    log = Log(fail=frozenset({"c", "d"}))
    assert run_graph(GRAPH, log.work, 2, optional={"c"}) == {"e"}  # a still needs b (d failed)
    log = Log(fail=frozenset({"c"}))
    assert run_graph(GRAPH, log.work, 2, optional={"c"}) == {"a", "b", "d", "e"}
    assert log.finished.index("c") < log.started.index("a")  # still loaded first


def test_the_costliest_chain_starts_first() -> None:
    # ext4's chain (crc -> jbd2 -> ext4) outweighs the small leaves: with one worker the
    # order shows the choice; each pick is the ready item heading the costliest chain.
    graph = {"ext4": ["jbd2"], "jbd2": ["crc"], "crc": [], "small1": [], "small2": [], "big": []}
    cost = {"ext4": 10.0, "jbd2": 2.0, "crc": 1.0, "big": 5.0}
    log = Log()
    assert run_graph(graph, log.work, 1, cost=cost) == set(graph)
    assert log.started[:4] == ["crc", "jbd2", "ext4", "big"]
    log = Log()
    run_graph(graph, log.work, 1)  # by default each costs 1: the longest chain first
    assert log.started[:3] == ["crc", "jbd2", "ext4"]
