"""The planner at scale (issue 8): tens of thousands of specs, planned in near-linear time.

No timing here (performance is measured by bench/plan_scale.py); these check that the
trie-based lookups give the same answers as the obvious quadratic scan, and that a
40 000-spec plan is correct.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from guest_agent.config.merge import merge, parse_cmdline
from guest_agent.plan import Holders, is_within, plan
from guest_agent.spec import OverlaySpec


def nearest_by_scan(path: str, wheres: list[str], *, strict: bool) -> str | None:
    """The planner's former lookup: every WHERE compared with PATH."""
    best = None
    for where in wheres:
        if where == path and strict:
            continue
        if is_within(path, where) and (best is None or len(where) > len(best)):
            best = where
    return best


components = st.sampled_from(["a", "b", "ab", "a.b", "c d", "é"])
abs_paths = st.lists(components, min_size=1, max_size=5).map(lambda p: "/" + "/".join(p))
queries = abs_paths | st.sampled_from(["/", "/a/", "//a", "/a//b", "/ab/", "a", ""])


@settings(database=None, max_examples=500, deadline=None)
@given(st.lists(abs_paths, max_size=12, unique=True), queries, st.booleans())
def test_holders_agree_with_a_scan(wheres: list[str], path: str, strict: bool) -> None:
    assert Holders(wheres).holder(path, strict=strict) == nearest_by_scan(
        path, wheres, strict=strict
    )


def test_the_first_where_added_at_a_point_is_kept() -> None:
    holders = Holders(["/a", "/a/"])
    assert holders.holder("/a/b") == "/a"


def big_cmdline(groups: int) -> tuple[str, dict[str, tuple[str, ...]]]:
    """About 40 specs a group, flat and nested, shares and volumes; and each WHERE's
    expected dependencies."""
    tokens = [
        "microvm.share=ro-store:/nix/.ro-store:9p",
        "microvm.volume=LABEL=rw:/nix/.rw-store:ext4",
        "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store",
    ]
    expected = {
        "/nix/.ro-store": (),
        "/nix/.rw-store": (),
        "/nix/store": ("/nix/.ro-store", "/nix/.rw-store"),
    }
    for g in range(groups):
        group = f"/data/g{g}"
        tokens.append(f"microvm.volume=tmpfs:{group}:tmpfs")
        expected[group] = ()
        for k in range(13):
            flat, sub = f"/srv/f{g}-{k}", f"{group}/s{k}"
            deep, deeper = f"{sub}/a/deep", f"{sub}/a/deep/er"
            tokens += [
                f"microvm.share=flat{g}-{k}:{flat}:virtiofs",
                f"microvm.share=sub{g}-{k}:{sub}:9p",
                f"microvm.volume=SERIAL=d{g}-{k}:{deep}:ext4",
                f"microvm.volume=tmpfs:{deeper}:tmpfs",
            ]
            expected.update({flat: (), sub: (group,), deep: (sub,), deeper: (deep,)})
    # in reverse, so that no child is already after its parent on the command line
    return " ".join(reversed(tokens)), expected


def test_plan_of_40000_specs_is_correct() -> None:
    text, expected = big_cmdline(770)
    config, problems = merge([parse_cmdline(text)])
    assert problems == ()
    assert len(config.mounts) == len(expected) > 40_000

    steps, problems = plan(config)
    assert problems == []
    assert {s.where: s.after for s in steps} == expected
    position = {s.where: i for i, s in enumerate(steps)}
    assert len(position) == len(steps) == len(expected)
    for step in steps:
        assert all(position[d] < position[step.where] for d in step.after), step
    assert [s.where for s in steps if s.store_lower] == ["/nix/.ro-store"]
    assert isinstance(steps[position["/nix/store"]].spec, OverlaySpec)
    # ready steps run in batches, shallow paths first, then by name
    keys = [(s.where.count("/"), s.where) for s in steps[:10]]
    assert keys == sorted(keys)
