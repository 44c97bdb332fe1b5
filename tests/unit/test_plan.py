"""The planner: a dependency graph of mount points, checks made before anything is mounted."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest_agent.config.merge import merge, parse_cmdline
from guest_agent.plan import Step, in_rounds, is_within, owner_of, plan
from guest_agent.spec import Config, Problem


def config_of(cmdline: str) -> Config:
    config, problems = merge([parse_cmdline(cmdline)])
    assert problems == ()
    return config


def wheres(steps: list[Step]) -> list[str]:
    return [s.where for s in steps]


MICROVM = (
    "microvm.share=ro-store:/nix/.ro-store:9p "
    "microvm.volume=LABEL=nix-store:/nix/.rw-store:ext4 "
    "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
)


def test_is_within() -> None:
    assert is_within("/a/b", "/a")
    assert is_within("/a", "/a")
    assert is_within("/a", "/")
    assert not is_within("/ab", "/a")
    assert not is_within("/a", "/a/b")


def test_parents_before_children_whatever_the_order() -> None:
    specs = [
        "microvm.volume=tmpfs:/srv/outer/inner/deep:tmpfs",
        "microvm.volume=tmpfs:/srv/outer/inner:tmpfs",
        "microvm.volume=tmpfs:/srv/outer:tmpfs",
    ]
    for order in itertools.permutations(specs):
        steps, problems = plan(config_of(" ".join(order)))
        assert problems == []
        assert wheres(steps) == ["/srv/outer", "/srv/outer/inner", "/srv/outer/inner/deep"]
        assert [s.after for s in steps] == [(), ("/srv/outer",), ("/srv/outer/inner",)]


def test_a_sibling_with_a_common_prefix_is_not_a_parent() -> None:
    steps, _ = plan(
        config_of("microvm.volume=tmpfs:/srv/ab:tmpfs microvm.volume=tmpfs:/srv/a:tmpfs")
    )
    assert {s.where: s.after for s in steps} == {"/srv/a": (), "/srv/ab": ()}


def test_only_the_nearest_parent_is_a_dependency() -> None:
    steps, _ = plan(
        config_of(
            "microvm.volume=tmpfs:/a:tmpfs microvm.volume=tmpfs:/a/b/c/d:tmpfs "
            "microvm.volume=tmpfs:/a/b:tmpfs"
        )
    )
    assert {s.where: s.after for s in steps} == {"/a": (), "/a/b": ("/a",), "/a/b/c/d": ("/a/b",)}


def test_overlay_after_its_layers() -> None:
    # overlay first on the command line, layers last
    cmd = (
        "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store "
        "microvm.volume=LABEL=nix-store:/nix/.rw-store:ext4 "
        "microvm.share=ro-store:/nix/.ro-store:9p"
    )
    steps, problems = plan(config_of(cmd))
    assert problems == []
    assert wheres(steps)[-1] == "/nix/store"
    assert steps[-1].after == ("/nix/.ro-store", "/nix/.rw-store")


def test_overlay_depends_on_the_holders_of_its_layers() -> None:
    steps, _ = plan(
        config_of(
            "microvm.share=store:/srv/images:virtiofs "
            "microvm.volume=LABEL=rw:/var/lib/rw:ext4 "
            "microvm.store-overlay=/srv/images/store:/var/lib/rw/overlay"
        )
    )
    overlay = steps[-1]
    assert overlay.where == "/nix/store"
    assert overlay.after == ("/srv/images", "/var/lib/rw")


def test_overlay_with_layers_on_the_root_has_no_dependencies() -> None:
    steps, problems = plan(config_of("microvm.store-overlay=/lower:/rw"))
    assert problems == []
    assert [(s.where, s.after, s.store_lower) for s in steps] == [("/nix/store", (), False)]


def test_overlay_under_a_nix_mount_waits_for_it() -> None:
    steps, _ = plan(config_of(MICROVM + " microvm.volume=tmpfs:/nix:tmpfs"))
    assert wheres(steps)[0] == "/nix"
    by = {s.where: s.after for s in steps}
    assert by["/nix/store"] == ("/nix", "/nix/.ro-store", "/nix/.rw-store")
    assert by["/nix/.ro-store"] == ("/nix",)


def test_mounts_on_or_beneath_rw_come_before_the_overlay() -> None:
    # issue 8, item 13: a volume at RW/store was mounted over the live upper layer
    steps, problems = plan(
        config_of(
            "microvm.volume=tmpfs:/nix/.rw-store/work/x:tmpfs "
            "microvm.volume=LABEL=up:/nix/.rw-store/store:ext4 " + MICROVM
        )
    )
    assert problems == []
    assert wheres(steps)[-1] == "/nix/store"
    assert steps[-1].after == (
        "/nix/.ro-store",
        "/nix/.rw-store",
        "/nix/.rw-store/store",
        "/nix/.rw-store/work/x",
    )


def test_a_volume_at_rw_store_with_rw_on_the_root() -> None:
    steps, _ = plan(
        config_of("microvm.volume=LABEL=up:/rw/store:ext4 microvm.store-overlay=/lo:/rw")
    )
    assert [(s.where, s.after) for s in steps] == [
        ("/rw/store", ()),
        ("/nix/store", ("/rw/store",)),
    ]


def test_mounts_beneath_lower_or_beside_rw_are_not_dependencies() -> None:
    steps, _ = plan(
        config_of(
            MICROVM + " microvm.volume=tmpfs:/nix/.ro-store/x:tmpfs "
            "microvm.volume=tmpfs:/nix/.rw-storex:tmpfs"
        )
    )
    assert {s.where: s.after for s in steps}["/nix/store"] == ("/nix/.ro-store", "/nix/.rw-store")


def test_store_lower_marks_only_the_lower_holder() -> None:
    steps, _ = plan(config_of(MICROVM))
    assert {s.where: s.store_lower for s in steps} == {
        "/nix/.ro-store": True,
        "/nix/.rw-store": False,
        "/nix/store": False,
    }


def test_upper_on_9p_is_refused_before_mounting() -> None:
    cmd = (
        "microvm.share=ro-store:/nix/.ro-store:9p microvm.share=rw:/nix/.rw-store:9p "
        "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
    )
    steps, problems = plan(config_of(cmd))
    assert problems == [
        Problem(
            "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store",
            "the upper layer /nix/.rw-store is on 9p (microvm.share=rw:/nix/.rw-store:9p): "
            "overlayfs cannot keep whiteouts on 9p, so every delete or rename of a store path "
            "would fail later",
            "put RW on a block volume (microvm.volume=) or a virtiofs share",
        )
    ]
    # the overlay is left out; its layers are still mounted
    assert wheres(steps) == ["/nix/.ro-store", "/nix/.rw-store"]


def test_upper_on_9p_subdirectory_is_refused_too() -> None:
    steps, problems = plan(
        config_of("microvm.share=rw:/srv:9p microvm.store-overlay=/lower:/srv/rw/overlay")
    )
    assert len(problems) == 1 and "is on 9p" in problems[0].reason
    assert wheres(steps) == ["/srv"]


def test_upper_on_a_9p_share_at_rw_store_is_refused_too() -> None:
    steps, problems = plan(config_of(MICROVM + " microvm.share=up:/nix/.rw-store/store:9p"))
    assert [p.spec for p in problems] == ["microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"]
    assert "(microvm.share=up:/nix/.rw-store/store:9p)" in problems[0].reason
    assert "/nix/store" not in wheres(steps)


@pytest.mark.parametrize("proto", ["virtiofs", "auto"])
def test_upper_on_virtiofs_or_auto_share_is_not_refused_by_the_planner(proto: str) -> None:
    _, problems = plan(
        config_of(f"microvm.share=rw:/srv:{proto} microvm.store-overlay=/lower:/srv/rw")
    )
    assert problems == []


def test_upper_on_9p_under_a_volume_mounted_deeper_is_fine() -> None:
    _, problems = plan(
        config_of(
            "microvm.share=rw:/srv:9p microvm.volume=LABEL=x:/srv/vol "
            "microvm.store-overlay=/lower:/srv/vol/rw"
        )
    )
    assert problems == []


def test_a_9p_tag_mounts_once() -> None:
    steps, problems = plan(
        config_of(
            "microvm.share=data:/a:9p microvm.share=data:/b:auto microvm.share=data:/a/c:virtiofs"
        )
    )
    assert [str(p) for p in problems] == [
        "microvm.share=data:/b:auto: tag 'data' is already mounted at /a by "
        "microvm.share=data:/a:9p: a 9p channel mounts once "
        "(hint: bind-mount a subdirectory instead, or export a second tag)",
        "microvm.share=data:/a/c:virtiofs: tag 'data' is already mounted at /a by "
        "microvm.share=data:/a:9p: a 9p channel mounts once "
        "(hint: bind-mount a subdirectory instead, or export a second tag)",
    ]
    assert wheres(steps) == ["/a"]


def test_the_same_virtiofs_tag_may_mount_twice() -> None:
    steps, problems = plan(config_of("microvm.share=fs:/a:virtiofs microvm.share=fs:/b:virtiofs"))
    assert problems == []
    assert wheres(steps) == ["/a", "/b"]


def test_a_refused_spec_leaves_its_children_planned_with_the_dependency() -> None:
    # the child stays in the plan and names the parent: the executor skips it
    steps, problems = plan(
        config_of("microvm.share=d:/a:9p microvm.share=d:/b:9p microvm.volume=tmpfs:/b/c:tmpfs")
    )
    assert len(problems) == 1
    assert {s.where: s.after for s in steps} == {"/a": (), "/b/c": ("/b",)}


def test_owner_of() -> None:
    config = config_of(MICROVM + " microvm.volume=tmpfs:/nix:tmpfs")
    owner = owner_of("/nix/.rw-store/store", config.mounts)
    assert owner is not None and owner.where == "/nix/.rw-store"
    owner = owner_of("/nix/other", config.mounts)
    assert owner is not None and owner.where == "/nix"
    assert owner_of("/etc", config.mounts) is None
    # the overlay itself never owns a path
    owner = owner_of("/nix/store/abc", config.mounts)
    assert owner is not None and owner.where == "/nix"


def test_empty_plan() -> None:
    assert plan(Config()) == ([], [])


def test_plan_is_deterministic() -> None:
    cmd = " ".join(f"microvm.volume=tmpfs:/m{i}:tmpfs" for i in (3, 1, 2))
    assert wheres(plan(config_of(cmd))[0]) == ["/m1", "/m2", "/m3"]


def _graphlib_rounds(deps: dict[str, set[str]]) -> list[str]:
    """What plan ordered with before: graphlib's rounds, each shallowest path first."""
    from graphlib import TopologicalSorter

    sorter = TopologicalSorter(deps)
    order: list[str] = []
    sorter.prepare()
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda w: (w.count("/"), w))
        order.extend(ready)
        sorter.done(*ready)
    return order


@settings(database=None, max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["/a", "/a/b", "/c", "/c/d/e", "/f", "/g/h", "/i"]), unique=True),
    st.data(),
)
def test_in_rounds_orders_as_graphlib_did(wheres: list[str], data: st.DataObject) -> None:
    deps: dict[str, set[str]] = {}
    for i, where in enumerate(wheres):  # edges only to earlier keys: no cycle
        deps[where] = (
            set(data.draw(st.lists(st.sampled_from(wheres[:i]), unique=True))) if i else set()
        )
    assert in_rounds(deps) == _graphlib_rounds(deps)


def test_keys_on_a_cycle_come_last_in_path_order() -> None:
    deps = {"/x": set(), "/x/y": {"/x", "/z"}, "/z": {"/x/y"}, "/w": {"/x"}}
    assert in_rounds(deps) == ["/x", "/w", "/z", "/x/y"]
