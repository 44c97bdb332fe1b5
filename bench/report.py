"""Render the raw results (bench/results.json) as docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import comparable, median


def _ms(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x * 1000:.0f} ms"


def _s(x: float | None) -> str:
    return "–" if x is None or x != x else (f"{x:.2f} s" if x >= 1 else f"{x * 1000:.0f} ms")


def _range(v: list[float]) -> str:
    return "–" if not v else f"{_s(min(v))} – {_s(max(v))}"


def _ok(cond: bool | None) -> str:
    return "–" if cond is None else ("**met**" if cond else "**missed**")


COMPARE_JSON = Path(__file__).with_name("compare.json")  # bench/compare.py --json
COMPARE_TEXT = Path(__file__).with_name("compare.md")
COMPARE_MARK = "<!-- the run: tables rendered from bench/compare.json -->"
NIX_DB_JSON = Path(__file__).with_name("nix_db.json")  # bench/nix_db.py --json
NIX_DB_TEXT = Path(__file__).with_name("nix_db.md")  # its verdict, written by hand
STARTUP_GUEST_JSON = Path(__file__).with_name("startup_guest.json")  # bench/startup_guest.py
MODINDEX_JSON = Path(__file__).with_name("modindex.json")  # bench/modindex.py
BOOT_SMP_JSON = Path(__file__).with_name("boot_smp.json")  # bench/boot_smp.py

#: Why the missed boot-speed targets are out of reach (the numbers: bench/analysis.md).
WHY_WARM_SHELL = (
    "the Python floor alone (interpreter + `os` + `ctypes` + 11 `mount(2)`) is above 2× the "
    "busybox script"
)
WHY_WARM_FLOOR = (
    "imports: a warm run loads 26 of the agent's modules, about as much as all its work; "
    "where each ms goes: findings, issue 11"
)
WHY_COLD = (
    "the interpreter's start and the agent's imports are not in a busybox script; module "
    "loads (the bulk) are the same on both sides and cannot overlap on 1 vCPU"
)
WHY_COLD_SMP = (
    "independent modules now load in parallel (bench/boot_smp.py), but the wall clock "
    "also charges TCG's translation of the interpreter's first run (≈ 0.2 s) and its imports"
)
WHY_STARTUP = "a dry run imports 26 of the agent's modules (a cold run ≈ 33)"


def render(r: dict[str, Any]) -> str:
    out: list[str] = []
    w = out.append
    kernels = r.get("kernels", {})
    w("# Benchmarks\n")
    w(
        "Produced by `python3 bench/run.py` (this file is its output; raw numbers in "
        "`bench/results.json`). Every ratio compares two things measured in the same "
        "run — the same guest boot for the VM benchmarks — alternating between them, "
        "because the machines these run on are shared and noisy. Medians of the "
        "repetitions; absolute times beside each ratio.\n"
    )
    w(
        "Modules are named by their place today: issue 23 moved them into packages "
        "(`syscalls` is now `guest_agent.kernel.syscalls`, and so on; "
        "docs/design.md has the map). The raw JSON keeps the names each run saw.\n"
    )
    _glance(w, r)
    h = r.get("host", {})
    reps = r.get("repetitions", {})
    w(
        f"Run of {r.get('started', '?')}{' (`--quick`)' if r.get('quick') else ''}, agent at commit "
        f"`{h.get('commit', '?')}`: host with "
        f"{h.get('cpus', '?')} CPUs shared with other jobs (load {h.get('load', '?')} at the start), "
        f"{h.get('qemu', 'qemu')}, TCG (no KVM), guests with 1 vCPU and 512 MiB; guest kernels "
        + ", ".join(f"{k} (`{v.get('release', '?')}`)" for k, v in kernels.items())
        + f". Repetitions: start-up {reps.get('startup')}, boot path {reps.get('boot')} rounds, "
        f"reset {reps.get('reset')} per size, throughput {reps.get('throughput')} per variant.\n"
    )
    w(
        "**Timing in the guest.** busybox `date` has no `%N`, so each timed command runs "
        "between two `adjtimex` calls (busybox; it prints the wall clock to the µs). The "
        "interval includes one fork+exec of `adjtimex` (the *null* interval, reported per "
        "boot; a few ms under TCG) on both sides of every ratio.\n"
    )
    w("## Summary\n")
    w(
        "Targets of issue 11 for rows 1 and 2g–2i. *Why* says what a missed target runs into; "
        "the floor analysis is in the findings below.\n"
    )
    w("| # | benchmark | kernel | result | target | | why |")
    w("|---|---|---|---|---|---|---|")
    st = r.get("startup")
    for k, kr in kernels.items():
        b = kr.get("boot")
        if b:
            fr = median([a / f for a, f in zip(b["agent"], b["floor"], strict=True)])
            w(
                f"| 1 | boot path, agent / shell, modules loaded | {k} | **{b['ratio_median']:.1f}×** "
                f"({_s(b['agent_median'])} vs {_s(b['shell_median'])}; Python floor "
                f"{b['floor_ratio_median']:.1f}×) | ≤ 2× | {_ok(b['ratio_median'] <= 2)} | "
                f"{WHY_WARM_SHELL if b['ratio_median'] > 2 else '–'} |"
            )
            w(
                f"| 1 | boot path, agent / Python floor, modules loaded | {k} | **{fr:.2f}×** "
                f"({_s(b['agent_median'])} vs {_s(b['floor_median'])}) | ≤ 1.25× | {_ok(fr <= 1.25)} | "
                f"{WHY_WARM_FLOOR if fr > 1.25 else '–'} |"
            )
            if b.get("cold_boots"):
                cb = b["cold_boots"]
                w(
                    f"| 1 | boot path, agent / shell, cold boots ({len(cb['agent'])} each) | {k} | "
                    f"**{b['cold_ratio']:.2f}×** ({_s(median(cb['agent']))} vs "
                    f"{_s(median(cb['shell']))}) | ≤ 1.0× | {_ok(b['cold_ratio'] <= 1.0)} | "
                    f"{WHY_COLD if b['cold_ratio'] > 1.0 else '–'} |"
                )
            ci = b.get("cold_boots_icount")
            if ci:
                ratio = b["cold_ratio_icount"]
                w(
                    f"| 1 | boot path, agent / shell, cold boots ({len(ci['agent'])} each), "
                    f"`-icount {b['cold_icount']}` | {k} | **{ratio:.2f}×** "
                    f"({_s(median(ci['agent']))} vs {_s(median(ci['shell']))}) | ≤ 1.0× | "
                    f"{_ok(ratio <= 1.0)} | {WHY_COLD if ratio > 1.0 else '–'} |"
                )
    smp = json.loads(BOOT_SMP_JSON.read_text()) if BOOT_SMP_JSON.exists() else []
    for g in smp:
        sec = {side: median(x) for side, x in g["seconds"].items()}
        ratio = g["agent_vs_shell"]
        w(
            f"| 1 | boot path, agent / shell, cold boots ({g['boots']} each), {g['cpus']} vCPUs, "
            f"wall clock | {g['kernel']} | **{ratio:.2f}×** ({_s(sec['agent'])} vs "
            f"{_s(sec['shell'])}; pinned to 1 CPU, i.e. loading one by one: "
            f"{g['agent_1cpu_vs_shell']:.2f}×, so the parallel loads take "
            f"{g['parallel_vs_serial']:.2f}× of it) | ≤ 1.0× | {_ok(ratio <= 1.0)} | "
            f"{WHY_COLD_SMP if ratio > 1.0 else '–'} |"
        )
    sg = json.loads(STARTUP_GUEST_JSON.read_text()) if STARTUP_GUEST_JSON.exists() else []
    for g in sg:
        med = {v: median(x) for v, x in g["seconds"].items()}
        above = med["c-I"] - med["bare-I"]
        clock = f"`-icount {g['icount']}`" if g.get("icount") is not None else "wall"
        w(
            f"| 2g | start-up above a bare interpreter, guest ({clock}) | {g['kernel']} | "
            f"**{_ms(above)}** (`-I -c` entry: {_ms(med['c-I'])} vs `python3 -I -c pass` "
            f"{_ms(med['bare-I'])}) | ≤ 15 ms | {_ok(above <= 0.015)} | "
            + (
                f"{WHY_STARTUP}: an import of an empty module alone costs "
                f"{(med['empty'] - med['bare-I']) / 30 * 1000:.1f} ms here |"
                if above > 0.015
                else "– |"
            )
        )
        w(
            f"| 2h | the integrations' interpreter start, guest ({clock}) | {g['kernel']} | "
            f"`-I -c` {_ms(med['c-I'])}, `-m` {_ms(med['m'])}, console script "
            f"{_ms(med['script'])}, `-I -S -c` {_ms(med['c-I-S'])} | the cheapest that works | "
            f"{_ok(med['c-I'] <= min(med['m'], med['script']) * 1.02)} | "
            f"`-I -c` kept: `-m` pays runpy; `-S` saves {_ms(med['c-I'] - med['c-I-S'])} but needs "
            "the install path written into the hook |"
        )
    mi = json.loads(MODINDEX_JSON.read_text()) if MODINDEX_JSON.exists() else []
    for g in mi:
        m = {v: median(x) for v, x in g["seconds"].items()}
        text, binary = m["text"] - m["bare"], m["binary"] - m["bare"]
        w(
            f"| 2i | a boot's modules from a full module index ({g['sizes']['modules.alias'] / 1e6:.1f} MB "
            f"modules.alias), `-icount {g['icount']}` | {g['kernel']} | binary index **{_ms(binary)}**, "
            f"text {_s(text)} (**{text / binary:.0f}×**) | decide with numbers (libkmod?) | "
            f"{_ok(g['same_answers'] and binary < text)} | depmod's binary index read as kmod "
            "reads it: libkmod was within 1 % (bench/kmod_lib.py), docs/design.md |"
        )
    if st:
        w(
            f"| 2 | start-up above a bare interpreter (host) | – | **{_ms(st['above_bare'])}** "
            f"({_ms(st['agent_median'])} vs {_ms(st['bare_median'])}) | < 40 ms | {_ok(st['above_bare'] < 0.040)} | – |"
        )
    for k, kr in kernels.items():
        rs = kr.get("reset")
        if rs:
            sizes = rs["sizes"]
            a = [median(rs["rows"][str(n)]["agent"]) for n in sizes]
            rm = [median(rs["rows"][str(n)]["rm"]) for n in sizes]
            flat = a[-1] <= max(1.25 * a[0], a[0] + 0.15)
            w(
                f"| 3 | reset at boot, {sizes[0]} → {sizes[-1]:,} files | {k} | agent "
                f"{_s(a[0])} → {_s(a[-1])}; `rm -rf` {_s(rm[0])} → {_s(rm[-1])} | flat vs growing | {_ok(flat and rm[-1] > 2 * a[-1])} | – |"
            )
    for k, kr in kernels.items():
        tp = kr.get("throughput")
        if tp:
            for share, target in (("ro-store", 2.0), ("rw", 1.0)):
                nix = next(
                    (
                        v
                        for v in tp["variants"]
                        if v["share"] == share and v["name"] == "microvm.nix"
                    ),
                    None,
                )
                ag = next(
                    (v for v in tp["variants"] if v["share"] == share and v["name"] == "agent"),
                    None,
                )
                if not nix or not ag:
                    continue
                sp = {
                    m: median(paired(nix[m], ag[m])) for m in ("big1", "big2", "small1", "small2")
                }
                # "never slower": within 5 % (the noise floor of these medians) counts as not slower
                cond = min(sp["big1"], sp["small1"]) >= (target if target == 2 else 0.95)
                w(
                    f"| 4 | {share} share, agent vs microvm.nix (paired medians) | {k} | 64 MiB first read "
                    f"**{sp['big1']:.1f}×** (again {sp['big2']:.1f}×), 1 000 files **{sp['small1']:.1f}×** "
                    f"(again {sp['small2']:.1f}×) | {'≥ 2×' if target == 2 else 'never slower'} | {_ok(cond)} | see section 4 |"
                )
    w("")
    analysis = Path(__file__).with_name("analysis.md")
    if analysis.exists():
        w(analysis.read_text().rstrip() + "\n")
    compared = r.get("compare")
    if compared is None and COMPARE_JSON.exists():
        compared = json.loads(COMPARE_JSON.read_text())
    if compared:
        _compare(w, compared if isinstance(compared, list) else [compared])
    for k, kr in kernels.items():
        if kr.get("boot"):
            _boot(w, k, kr["boot"])
    if st:
        _startup(w, st)
    for k, kr in kernels.items():
        if kr.get("reset"):
            _reset(w, k, kr["reset"])
    for k, kr in kernels.items():
        if kr.get("throughput"):
            _throughput(w, k, kr["throughput"])
    if NIX_DB_JSON.exists():
        _nix_db(w, json.loads(NIX_DB_JSON.read_text()))
    return "\n".join(out) + "\n"


def _glance(w: Any, r: dict[str, Any]) -> None:
    """One screen: each goal, both kernels side by side; the detail follows."""
    kernels = r.get("kernels", {})
    names = list(kernels)
    rows: list[tuple[str, dict[str, str], str]] = []

    def row(goal: str, target: str, cell: Any) -> None:
        cells = {}
        for k in names:
            try:
                cells[k] = cell(k, kernels[k])
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                cells[k] = "–"
        rows.append((goal, cells, target))

    def warm_shell(k: str, kr: dict[str, Any]) -> str:
        return f"{kr['boot']['ratio_median']:.1f}×"

    def warm_floor(k: str, kr: dict[str, Any]) -> str:
        b = kr["boot"]
        return f"{median([a / f for a, f in zip(b['agent'], b['floor'], strict=True)]):.2f}×"

    def cold(k: str, kr: dict[str, Any]) -> str:
        return f"{kr['boot']['cold_ratio_icount']:.2f}×"

    def reset(k: str, kr: dict[str, Any]) -> str:
        rs = kr["reset"]
        n = str(rs["sizes"][-1])
        return f"{_s(median(rs['rows'][n]['agent']))} vs `rm -rf` {_s(median(rs['rows'][n]['rm']))}"

    def share(k: str, kr: dict[str, Any]) -> str:
        v = {x["name"]: x for x in kr["throughput"]["variants"] if x["share"] == "ro-store"}
        return f"{median(paired(v['microvm.nix']['big1'], v['agent']['big1'])):.1f}×"

    sg = {
        g["kernel"]: g
        for g in (json.loads(STARTUP_GUEST_JSON.read_text()) if STARTUP_GUEST_JSON.exists() else [])
    }

    def startup(k: str, kr: dict[str, Any]) -> str:
        med = {v: median(x) for v, x in sg[k]["seconds"].items()}
        return _ms(med["c-I"] - med["bare-I"])

    nix = json.loads(NIX_DB_JSON.read_text()) if NIX_DB_JSON.exists() else {}
    latest = (nix.get("later") or [nix])[-1].get("results", []) if nix else []
    at10k = {x["kernel"]: x for x in latest if x.get("size") == 10000}

    def nix_unchanged(k: str, kr: dict[str, Any]) -> str:
        return _ms(at10k[k]["pair_diff_median"])

    def nix_changed(k: str, kr: dict[str, Any]) -> str:
        return _s(at10k[k]["diff_medians"]["c"])

    row("warm boot path, agent / busybox shell", "≤ 2×", warm_shell)
    row("warm boot path, agent / Python floor", "≤ 1.25×", warm_floor)
    row("cold boots, agent / shell (instructions)", "≤ 1.0×", cold)
    row("start-up above `python3 -I -c pass`, guest", "≤ 15 ms", startup)
    row("reset at boot, 100,000 files in the upper", "flat", reset)
    row("ro-store 9p share, 64 MiB first read, agent vs microvm.nix", "≥ 2×", share)
    agent = (nix.get("later") or [{}])[-1].get("agent", "?") if nix else "?"
    row(
        f"x-nix-db, lower unchanged, 10k paths: above no x-nix-db (agent `{agent}`)",
        "tens of ms",
        nix_unchanged,
    )
    row(
        f"x-nix-db, lower changed, 10k paths: full reconcile (agent `{agent}`)",
        "< 1 s",
        nix_changed,
    )
    w("## At a glance\n")
    w("| goal | " + " | ".join(f"Linux {k}" for k in names) + " | target |")
    w("|---|" + "---:|" * len(names) + "---|")
    for goal, cells, target in rows:
        w(f"| {goal} | " + " | ".join(cells[k] for k in names) + f" | {target} |")
    w(
        "\nGuests under TCG with 1 vCPU on a shared 2-core host; ratios measured side by side "
        "in one run. Which goals are met, and why the others are not: the summary below; "
        "how each number is taken: its section.\n"
    )


def _nix_db(w: Any, raw: dict[str, Any]) -> None:
    """The x-nix-db section: bench/nix_db.py's tables (between its markers) from
    bench/nix_db.json, then the verdict, bench/nix_db.md."""
    from nix_db import BEGIN, END, render

    w(BEGIN)
    w(render(raw["results"], raw.get("growth", [])).rstrip() + "\n")
    for later in raw.get("later", []):  # runs of a later agent, same method
        w(f"### A later run: agent at `{later['agent']}` ({later['date']}), {later['note']}\n")
        tables = render(later["results"], [])
        tables = tables[tables.index("### Linux") :].replace("### Linux", "#### Linux")
        w(tables.rstrip() + "\n")
    w(END + "\n")
    if NIX_DB_TEXT.exists():
        w(NIX_DB_TEXT.read_text().rstrip() + "\n")


def _compare(w: Any, runs: list[dict[str, Any]]) -> None:
    """The before/after section: bench/compare.md (method, then findings, split at
    COMPARE_MARK) around the tables of the runs in bench/compare.json (one run, or a
    list of them: `bench/compare.py --append`)."""
    w("## Before and after the restructure (issue 9)\n")
    text = COMPARE_TEXT.read_text() if COMPARE_TEXT.exists() else ""
    method, _, findings = text.partition(COMPARE_MARK)
    if method.strip():
        w(method.strip() + "\n")
    for res in runs:
        w(compare_section(res))
    if findings.strip():
        w(findings.strip() + "\n")


def _span(v: list[float], unit: str = "ms") -> str:
    if not v:
        return "–"
    if unit == "x":
        return f"{min(v):.2f}× – {max(v):.2f}×"
    return f"{_ms(min(v))} – {_ms(max(v))}"


def compare_section(res: dict[str, Any]) -> str:
    """The tables and notes of one bench/compare.py run (numbers only: the method and the
    findings are bench/compare.md's, written by hand)."""
    b, a = res["before"], res["after"]
    load = " ".join(f"{x:.2f}" for x in res["load"])
    icount = next((g.get("icount") for g in res.get("guest", {}).values()), None)
    out = [
        f"Run of {res['started']} (`bench/compare.py`, HEAD `{res['head']}`): BEFORE = `{b}`, "
        f"AFTER = `{a}` (the agent's tree at HEAD); host with {res['cpus']} CPUs shared with "
        f"other jobs (load {load} at the start)"
        + (
            f"; the guests ran under qemu `-icount shift={icount}`: their clock counts "
            f"instructions ({1 << icount} ns each) while they run, so the guest rows measure "
            "work, not the host's load."
            if icount is not None
            else "; guests on the host's clock (qemu's default)."
        ),
        "",
        "| | BEFORE | AFTER | AFTER / BEFORE (medians) | per-round AFTER / BEFORE: median, range | runs |",
        "|---|---|---|---|---|---|",
    ]
    h = res.get("host")
    if h:
        m, r = h["medians"], h["runs"]
        rr = [x / y for x, y in zip(r["after"], r["before"], strict=True)]
        out.append(
            f"| host start-up, whole process (`-m guest_agent mount-all --dry-run`) | "
            f"{_ms(m['before'])} | {_ms(m['after'])} | **{h['ratio']:.2f}×** | "
            f"{h['ratio_per_round']:.2f}×, {_span(rr, 'x')} | {h['reps']} |"
        )
        out.append(
            f"| host start-up above a bare interpreter ({_ms(m['bare'])}) | "
            f"{_ms(h['above_bare']['before'])} | {_ms(h['above_bare']['after'])} | "
            f"{h['ratio_above_bare']:.2f}× | | |"
        )
    for k, g in res.get("guest", {}).items():
        m, r = g["medians"], g["runs"]
        out.append(
            f"| guest `mount-all`, warm, {k} | {_ms(m['before'])} ({_span(r['before'])}) | "
            f"{_ms(m['after'])} ({_span(r['after'])}) | **{g['ratio']:.2f}×** | "
            f"{g['ratio_per_round']:.2f}×, {_span(g['ratios'], 'x')} | {g['rounds']} |"
        )
        c = g.get("cold")
        if c:
            out.append(
                f"| guest `mount-all`, cold boots, {k} | {_ms(c['medians']['before'])} "
                f"({_span(c['runs']['before'])}) | {_ms(c['medians']['after'])} "
                f"({_span(c['runs']['after'])}) | **{c['ratio']:.2f}×** | | {c['boots']} each |"
            )
    out.append("")
    notes = []
    if h:
        notes.append(
            f"host: both dry runs print the same 11 mounts: **{'yes' if h['same_plan'] else 'no'}**"
        )
    for k, g in res.get("guest", {}).items():
        m = g["medians"]
        rr = [x / y for x, y in zip(g["runs"]["installed"], g["runs"]["after"], strict=True)]
        notes.append(
            f"guest {k} (`{g['release']}`): every run left the same 11 mounts as the first "
            f"(`/proc/self/mountinfo` compared after each): **{'yes' if g['same_mounts'] else 'no'}**; "
            f"failed runs: {len(g['failures'])}; the installed agent (AFTER, no PYTHONPATH) "
            f"{_ms(m['installed'])}, installed / AFTER per round {median(rr):.2f}× (same code: "
            f"the noise floor); cold first run {_ms(g['cold_installed'][0]) if g['cold_installed'] else '–'}; "
            f"null interval {_ms(g['null'])}; the boot took {g['boot_seconds']:.0f} s"
        )
    out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def _when(w: Any, d: dict[str, Any]) -> None:
    m = d.get("measured")
    if m:
        w(
            f"*Measured {m['at']} (agent at `{m['commit']}`), {m['seconds']} s, host load {m['load']} at the end.*\n"
        )


def _same(b: dict[str, Any]) -> bool:
    """Agent and shell left the same 11 mounts (recomputed from the stored rows)."""
    agent, shell = comparable(b["mounts_agent"]), comparable(b["mounts_shell"])
    return agent == shell and len(agent) == 11


def _boot(w: Any, k: str, b: dict[str, Any]) -> None:
    w(f"## 1. Boot path on {k}\n")
    _when(w, b)
    w(
        "One guest boot: 8 shares (5 virtio-9p, 3 virtio-fs), the `ro-store` 9p share, an ext4 "
        "store volume found by `LABEL=` and the `/nix/store` overlay. The agent reads them from "
        "the kernel command line (`guest-agent mount-all`, as at boot); the busybox script below "
        "does the same 11 mounts with `mount`, with the options the agent uses (from its "
        "`--dry-run`). The first run of the boot (the agent, cold) loads every module both sides "
        "need; one untimed shell run and one untimed floor run follow; then each round times the "
        "three, rotating which goes first, unmounting everything in reverse order and `sync`ing "
        "between runs. The *floor* is the least a Python agent can cost: a 30-line script "
        "(`bench/guest_floor.py`) importing only `os` and `ctypes` that calls `mount(2)` for the "
        "same 11 mounts (LABEL resolved beforehand), with no parsing, discovery, module loading, "
        "lock or report. *Cold boots* are separate boots of the same guest in which the agent, or "
        "the script preceded by `modprobe -a` of the modules it needs (and retrying a share whose "
        "channel is not registered yet), is the first thing to mount: one sample per boot, "
        "alternating. "
        f"Both sides left identical mount tables (`/proc/self/mountinfo`, compared): "
        f"**{'yes' if _same(b) else 'NO'}** (an overlay's layers compared by name: the "
        "agent gives them as `/proc/self/fd/N`).\n"
    )
    w("| | median | range | runs |")
    w("|---|---|---|---|")
    w(
        f"| `guest-agent mount-all` | {_s(b['agent_median'])} | {_range(b['agent'])} | {len(b['agent'])} |"
    )
    w(f"| busybox script | {_s(b['shell_median'])} | {_range(b['shell'])} | {len(b['shell'])} |")
    w(
        f"| **ratio agent / shell** (per round) | **{b['ratio_median']:.1f}×** | "
        f"{min(b['ratios']):.1f}× – {max(b['ratios']):.1f}× | {len(b['ratios'])} |"
    )
    if b.get("floor"):
        w(
            f"| Python floor: `os` + `ctypes` `mount(2)` of the same 11 mounts, nothing else | {_s(b['floor_median'])} | {_range(b['floor'])} | {len(b['floor'])} |"
        )
        w(
            f"| ratio floor / shell (per round) | {b['floor_ratio_median']:.1f}× | "
            f"{min(b['floor_ratios']):.1f}× – {max(b['floor_ratios']):.1f}× | {len(b['floor_ratios'])} |"
        )
    w(f"| agent, cold (first run: loads the modules) | {_s(median(b['cold_agent']))} | | 1 |")
    cb = b.get("cold_boots")
    if cb:
        w(
            f"| cold boots: `guest-agent mount-all` as the first thing of a boot | {_s(median(cb['agent']))} | {_range(cb['agent'])} | {len(cb['agent'])} |"
        )
        w(
            f"| cold boots: the script, with `modprobe -a {b.get('cold_modules', 'virtio_blk 9pnet_virtio 9p virtiofs overlay ext4')}` first | {_s(median(cb['shell']))} | {_range(cb['shell'])} | {len(cb['shell'])} |"
        )
        w(f"| **ratio agent / shell, cold** (medians) | **{b['cold_ratio']:.2f}×** | | |")
    ci = b.get("cold_boots_icount")
    if ci:
        shift = b["cold_icount"]
        w(
            f"| cold boots under `-icount shift={shift}`: the agent | {_s(median(ci['agent']))} | "
            f"{_range(ci['agent'])} | {len(ci['agent'])} |"
        )
        w(
            f"| cold boots under `-icount shift={shift}`: the script | {_s(median(ci['shell']))} | "
            f"{_range(ci['shell'])} | {len(ci['shell'])} |"
        )
        w(
            f"| **ratio agent / shell, cold, instructions** (medians) | "
            f"**{b['cold_ratio_icount']:.2f}×** | | |"
        )
    w(f"| null interval | {_ms(b['null'])} | | 5 |")
    w("")
    if b.get("py_bare"):
        w("Where the agent's time goes, in the same guest (diagnostics, not part of the ratio):\n")
        w("| command | median |")
        w("|---|---|")
        w(f"| `python3 -c pass` | {_s(median(b['py_bare']))} |")
        w(
            f"| `python3 -c 'import <every agent module mount-all uses>'` | {_s(median(b['py_imports']))} |"
        )
        if b.get("agent_help"):
            w(f"| `guest-agent --help` | {_s(median(b['agent_help']))} |")
        w(f"| `guest-agent mount-all` (warm) | {_s(b['agent_median'])} |")
        w("")
        runs = b.get("guest_importtime", [])
        if isinstance(runs, str):
            runs = [runs]
        mods = guest_imports(runs)
        if mods:
            total = median([sum(v[0] for v in run_.values()) for run_ in _parse_runs(runs)]) / 1000
            w(
                f"Imports of the guest's `guest-agent mount-all` (its console script under "
                f"`python3 -X importtime`; median of {len(runs)} runs; ms; all imports of the "
                f"process, including the interpreter's own, total {total:.0f} ms):\n"
            )
            w("| module | self | cumulative |")
            w("|---|---|---|")
            for name, (self_ms, cum_ms, depth) in sorted(mods.items(), key=lambda x: -x[1][1])[:30]:
                w(f"| {'· ' * depth}`{name}` | {self_ms:.0f} | {cum_ms:.0f} |")
            w("")
        if b.get("guest_profile"):
            w(
                "<details><summary>cProfile of one warm <code>mount-all</code> in the guest</summary>\n"
            )
            w("```")
            w(b["guest_profile"].strip())
            w("```\n</details>\n")
    w("<details><summary>The busybox script</summary>\n")
    w("```sh")
    w(b["shell_script"].rstrip())
    w("```\n</details>\n")
    if b.get("cold_script"):
        w("<details><summary>The busybox script of the cold boots</summary>\n")
        w("```sh")
        w(b["cold_script"].rstrip())
        w("```\n</details>\n")
    if b.get("floor_script"):
        w(
            "<details><summary>The Python floor (<code>bench/guest_floor.py</code> with the plan filled in)</summary>\n"
        )
        w("```python")
        w(b["floor_script"].rstrip())
        w("```\n</details>\n")


# Issue 23 moved the modules into packages; a run's importtime output names them as they
# were then. Rendered under today's names (bench/*.json keeps the names each run saw).
MOVED = {
    "commands": "cli",
    "commands.mount_all": "cli.mount_all",
    "commands.reset_overlay": "cli.reset_overlay",
    "commands.status": "cli.status",
    "commands.discover": "cli.discover",
    "commands.record": "cli.record",
    "cli": "cli.app",
    "config": "config.merge",
    "config_json": "config.from_json",
    "parsers": "config.parsers",
    "timespan": "config.timespan",
    "inputs": "config.inputs",
    "switches": "config.switches",
    "devices": "devices.discovery",
    "sysfs": "devices.sysfs",
    "uevent": "devices.uevent",
    "probe": "devices.probe",
    "probe_containers": "devices.probe_containers",
    "probe_filesystems": "devices.probe_filesystems",
    "blank": "devices.blank",
    "kmod": "kmod.loader",
    "modresolve": "kmod.resolve",
    "modindex": "kmod.index",
    "modbin": "kmod.binindex",
    "modconf": "kmod.conf",
    "modimage": "kmod.image",
    "fanout": "kmod.fanout",
    "coldplug": "kmod.coldplug",
    "syscalls": "kernel.syscalls",
    "syscalls_legacy": "kernel.syscalls_legacy",
    "mountinfo": "kernel.mountinfo",
    "paths": "kernel.paths",
    "nixcopy": "nixdb.copy",
    "nixdb": "nixdb.database",
    "nixfiles": "nixdb.files",
    "nixlayers": "nixdb.layers",
    "nixrecord": "nixdb.record",
    "nixreg": "nixdb.registration",
    "nixrows": "nixdb.rows",
    "nixschema": "nixdb.schema",
    "nixstate": "nixdb.state",
    "nixstatus": "nixdb.status",
    "nixsteps": "nixdb.steps",
    "nixupper": "nixdb.upper",
}


def today(module: str) -> str:
    """MODULE (dotted) under its name today."""
    parts = module.split(".")
    if parts[0] != "guest_agent":
        return module
    for n in range(len(parts), 1, -1):
        new = MOVED.get(".".join(parts[1:n]))
        if new:
            return ".".join(["guest_agent", new, *parts[n:]])
    return module


def _parse_runs(runs: list[str]) -> list[dict[str, tuple[int, int, int]]]:
    out = []
    for text in runs:
        mods = {}
        for line in text.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[0].split(":")[-1].strip().isdigit():
                name = parts[2].rstrip()
                depth = (len(name) - len(name.lstrip()) - 1) // 2
                mods[today(name.strip())] = (int(parts[0].split(":")[-1]), int(parts[1]), depth)
        if mods:
            out.append(mods)
    return out


def guest_imports(runs: list[str]) -> dict[str, tuple[float, float, int]]:
    """module -> (median self ms, median cumulative ms, depth) over importtime outputs."""
    parsed = _parse_runs(runs)
    names = set().union(*parsed) if parsed else set()
    return {
        n: (
            median(r[n][0] for r in parsed if n in r) / 1000,
            median(r[n][1] for r in parsed if n in r) / 1000,
            next(r[n][2] for r in parsed if n in r),
        )
        for n in names
    }


def paired(base: list[float], other: list[float]) -> list[float]:
    return [b / o for b, o in zip(base, other, strict=False) if o > 0]


def _startup(w: Any, st: dict[str, Any]) -> None:
    w("## 2. Start-up cost (host)\n")
    _when(w, st)
    w(
        f"`{st['python']} -m guest_agent mount-all --dry-run --cmdline FILE --config {st.get('config', 'EMPTY')}` "
        "(FILE: the boot-path command line: 8 shares, ro-store, store volume, overlay) against "
        "`python3 -c pass`, alternating, "
        f"{st['reps']} runs each, wall time from fork to exit; the same with `-X importtime` "
        "for the import breakdown. PYTHONPATH = the repository and click, so the interpreter "
        "is Debian's, as in the guest.\n"
    )
    w("| | median | range |")
    w("|---|---|---|")
    w(f"| `python3 -c pass` | {_ms(st['bare_median'])} | {_range(st['bare'])} |")
    w(f"| agent `mount-all --dry-run` | {_ms(st['agent_median'])} | {_range(st['agent'])} |")
    w(f"| **above bare** (difference of medians) | **{_ms(st['above_bare'])}** | |")
    if st.get("script"):
        w(
            f"| the console script (`{st['entry_point']}`, as in the guest: no runpy) | {_ms(st['script_median'])} | {_range(st['script'])} |"
        )
        w(f"| console script above bare | {_ms(st['script_above_bare'])} | |")
    w(f"| above bare (median of paired differences) | {_ms(st['above_bare_pairs'])} | |")
    w(
        f"| of which imports (sum of self times of the {st['modules_added']} modules a bare interpreter does not import) | {st['added_import_ms']:.0f} ms | |"
    )
    w("")
    w("Heaviest imports (median over the runs; modules a bare interpreter does not import):\n")
    w("| module | cumulative ms | self ms |")
    w("|---|---|---|")
    for name, m in st["heaviest_cum"][:20]:
        w(f"| `{today(name)}` (depth {m['depth']}) | {m['cum_ms']:.1f} | {m['self_ms']:.1f} |")
    w("")


def _reset(w: Any, k: str, rs: dict[str, Any]) -> None:
    w(f"## 3. Reset cost against the size of the upper layer, on {k}\n")
    _when(w, rs)
    w(
        "For each size, a fresh ext4 volume made on the host with `mkfs.ext4 -d` holds the upper "
        "layer `store/` with N empty files (directories of 1 000, like store paths; empty files "
        "are the cheapest case for `rm -rf`), an empty `work/` and a second copy of the same tree, "
        "`copy/`. In one guest boot, for each volume (sizes interleaved): the agent's "
        "`mount-all` with `microvm.reset-overlay` (ro-store 9p share + the volume by `SERIAL=` + "
        "the overlay) is timed; then the time until its background deletion of the moved-aside "
        "tree has finished (polled every 0.1 s; off the boot's critical path); then, once that is "
        "done, `rm -rf copy/` — what a shell fragment does before mounting.\n"
    )
    w(
        "| files | agent `mount-all` + reset (boot-critical) | agent background deletion | `rm -rf` of the same tree | rm / agent |"
    )
    w("|---|---|---|---|---|")
    for n in rs["sizes"]:
        row = rs["rows"][str(n)]
        a, t, rm = median(row["agent"]), median(row["trash"]), median(row["rm"])
        w(
            f"| {n:,} | {_s(a)} ({_range(row['agent'])}) | {_s(t)} | {_s(rm)} ({_range(row['rm'])}) | {rm / a:.1f}× |"
        )
    w(f"\nRepetitions per size: {rs['reps']}; null interval {_ms(rs['null'])}.\n")


def _throughput(w: Any, k: str, tp: dict[str, Any]) -> None:
    w(f"## 4. Share throughput on {k}\n")
    _when(w, tp)
    w(
        "One guest boot, two 9p shares exporting the same content: `ro-store` (exported read-only) "
        "and a read-write share `data`. Each holds a 64 MiB file and a directory of 1 000 files of "
        "4 KiB. Each variant is mounted with busybox `mount`, measured, unmounted; variants are "
        "rotated within each repetition. The agent's options are what it uses itself (its "
        "mount was made first in the same boot and its `/proc/self/mountinfo` compared). "
        "*first*: after `echo 3 > /proc/sys/vm/drop_caches`; *again*: the same read right after "
        "(with `cache=loose` the pages stay, so *again* is a page-cache hit; with no cache or "
        "`cache=mmap`, `read()` goes to the host each time). Small files: `cat` of all 1 000 then "
        "`ls -l` of their directory.\n"
    )
    if tp.get("agent_mountinfo"):
        w("The agent's own mounts in that guest:\n")
        w("```")
        w(tp["agent_mountinfo"].strip())
        w("```\n")
    w(
        "| share | variant | options | 64 MiB first | MiB/s | 64 MiB again | 1 000 files + `ls -l` first | again |"
    )
    w("|---|---|---|---|---|---|---|---|")
    for v in tp["variants"]:
        b1 = median(v["big1"])
        w(
            f"| {v['share']} | {v['name']} | `{v['options']}` | {_s(b1)} | {64 / b1:.0f} | "
            f"{_s(median(v['big2']))} | {_s(median(v['small1']))} | {_s(median(v['small2']))} |"
        )
    w("")
    for share, s in tp["summary"].items():
        w(
            f"- **{share}**: agent vs microvm.nix: 64 MiB first read {s['big_speedup']:.2f}× "
            f"({_s(s['big_nix'])} → {_s(s['big_agent'])}), again {s['big2_speedup']:.2f}×; "
            f"1 000 files {s['small_speedup']:.2f}× ({_s(s['small_nix'])} → {_s(s['small_agent'])}), "
            f"again {s['small2_speedup']:.2f}×."
        )
    w("")
    w(
        "Speed-ups paired by repetition (microvm.nix time / variant time, both measured in the same "
        "repetition, minutes apart at most): median, and range over the repetitions. Above 1: faster "
        "than microvm.nix's options.\n"
    )
    w("| share | variant | 64 MiB first | 64 MiB again | 1 000 files first | 1 000 files again |")
    w("|---|---|---|---|---|---|")
    for share in ("ro-store", "rw"):
        nix = next(
            (v for v in tp["variants"] if v["share"] == share and v["name"] == "microvm.nix"), None
        )
        if nix is None:
            continue
        for v in tp["variants"]:
            if v["share"] != share or v is nix:
                continue
            cells = []
            for m in ("big1", "big2", "small1", "small2"):
                ratios = paired(nix[m], v[m])
                cells.append(
                    f"{median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"
                    if ratios
                    else "–"
                )
            name = f"**{v['name']}**" if v["name"] == "agent" else v["name"]
            w(f"| {share} | {name} | " + " | ".join(cells) + " |")
    w(f"\nRepetitions: {tp['reps']} per variant; null interval {_ms(tp['null'])}.\n")
