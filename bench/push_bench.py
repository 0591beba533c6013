"""Benchmark of one push: a workstation with three users, on loopback, through real pywinrm.

For basic over HTTPS (the lab CA as ca_trust_path) and NTLM over HTTP with message encryption:

* HTTP requests per push, read from the lab host's counters (``stats().by_operation``): the
  first push (files created), a push that changes every file, a push that changes nothing;
* median and p95 wall time of ``push_host`` (transport opened, pushed, closed) over N
  repetitions, changed and unchanged. "Changed" pushes alternate between two renders of the
  inventory (``EC`` and the enforced ``updatesInterval`` flipped), so each one merges and
  rewrites all four files (three microsip.ini and the override.ini);
* the comparison with Ansible's ``win_template``/``win_copy`` per-file cost as documented in
  ``../shared/docs/user-expectations.md``: about five remote commands per changed file (query,
  temp dir, put_file, copy, remove temp dir), one (the query) per unchanged file, each a WinRM
  Command/Send/Receive/Signal exchange (4 requests at least) and a fresh powershell.exe; the
  shell (Create/Delete) and the NTLM handshake are counted once per workstation.

With ``--rds``: a 40-user RDS host whose users each have a 100 KiB ``microsip.ini`` (a long call
history), pushed once (every file changes) and again (nothing changes): requests, Sends, the
sizes of the largest request envelope and answer, and wall time; then 50 sessions all running
MicroSIP, inspected once: the process queries and owner lookups the agent made (one query per
request; one ``GetOwnerSid`` per MicroSIP process), against one query per user as before.

The lab runs in this process (a single push is sequential: the client waits while the lab
answers, so they do not compete for the GIL); wall times therefore include the lab's own work
but no PowerShell start-up, which the lab does not emulate. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

USERS = 3
REPEATS = 50
ANSIBLE_COMMANDS_CHANGED = 5
ANSIBLE_COMMANDS_UNCHANGED = 1
ANSIBLE_REQUESTS_PER_COMMAND = 4  # Command, Send, Receive, Signal
SHELL_REQUESTS = 2  # Create and Delete, once per workstation
NTLM_LEGS = 3
WAN_RTT = 0.02  # the fleet benchmark's injected latency

FLIPS = (
    ("    EC: 1\n", "    EC: 0\n"),
    ("updatesInterval: never", "updatesInterval: monthly"),
)


def load_labkit() -> Any:
    """``tests/labkit.py`` of this repository (the push tests' inventory and lab)."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("tests.labkit")


def flip(kit: Any, forward: bool) -> None:
    """Switch the inventory to the other render and run Phase 1 again."""
    path = kit.root / "inventory.yaml"
    text = path.read_text()
    for old, new in FLIPS:
        text = text.replace(old, new) if forward else text.replace(new, old)
    path.write_text(text)
    kit.rebuild()


def timed_push(kit: Any, host: Any) -> tuple[float, Any, Any]:
    """One push of ws01 with fresh counters: (seconds, HostResult, HostStats)."""
    host.reset_counts()
    start = time.perf_counter()
    result = kit.push("ws01")
    elapsed = time.perf_counter() - start
    return elapsed, result, host.stats()


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def ops(stats: Any) -> str:
    order = ("auth", "Create", "Command", "Send", "Receive", "Signal", "Delete")
    found = stats.by_operation
    return " ".join(f"{k} {found[k]}" for k in order if found.get(k)) + "".join(
        f" {k} {v}" for k, v in found.items() if k not in order
    )


def bench_transport(labkit: Any, transport: str, repeats: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as folder,
        labkit.lab_kit(
            Path(folder), transport=transport, workstations=1, users_per_ws=USERS
        ) as kit,
    ):
        host = kit.lab.hosts["ws01"]
        files = len(kit.files("ws01"))
        first_s, first, first_stats = timed_push(kit, host)
        changed: list[float] = []
        unchanged: list[float] = []
        requests: dict[str, Counter[int]] = {"changed": Counter(), "unchanged": Counter()}
        statuses: Counter[str] = Counter()
        changed_stats = unchanged_stats = first_stats
        for i in range(repeats):
            flip(kit, forward=i % 2 == 0)
            elapsed, result, stats = timed_push(kit, host)
            files_changed = sum(1 for f in result.files if f.status.value == "changed")
            statuses[f"changed push: {result.status.value}, {files_changed} files"] += 1
            changed.append(elapsed)
            requests["changed"][stats.requests] += 1
            changed_stats = stats
            elapsed, result, stats = timed_push(kit, host)
            statuses[f"unchanged push: {result.status.value}"] += 1
            unchanged.append(elapsed)
            requests["unchanged"][stats.requests] += 1
            unchanged_stats = stats
    return {
        "transport": transport,
        "files": files,
        "first_s": first_s,
        "first_status": first.status.value,
        "first_stats": first_stats,
        "changed": changed,
        "unchanged": unchanged,
        "requests": requests,
        "statuses": statuses,
        "changed_stats": changed_stats,
        "unchanged_stats": unchanged_stats,
    }


def ansible_requests(files: int, commands_per_file: int, ntlm: bool) -> int:
    return (
        files * commands_per_file * ANSIBLE_REQUESTS_PER_COMMAND
        + SHELL_REQUESTS
        + (NTLM_LEGS if ntlm else 0)
    )


def report(row: dict[str, Any]) -> None:
    label = (
        "basic over HTTPS (ca_trust_path = lab CA)"
        if row["transport"] == "basic"
        else "NTLM over HTTP, message encryption"
    )
    changed, unchanged = row["changed"], row["unchanged"]
    print(f"\n== {label}: 1 workstation, {USERS} users, {row['files']} files")
    print(
        f"  first push ({row['first_status']}, files created): "
        f"{row['first_stats'].requests} requests [{ops(row['first_stats'])}], "
        f"{row['first_s'] * 1000:.1f} ms"
    )
    for name, stats in (("changed", row["changed_stats"]), ("unchanged", row["unchanged_stats"])):
        seen = ", ".join(f"{n} requests x{c}" for n, c in sorted(row["requests"][name].items()))
        print(
            f"  {name} push: {stats.requests} requests [{ops(stats)}], "
            f"{stats.commands} command(s), {stats.connections} connection(s); over all "
            f"repetitions: {seen}"
        )
    print(f"  outcomes: {dict(row['statuses'])}")
    print(
        f"  wall over {len(changed)} repetitions: changed median "
        f"{statistics.median(changed) * 1000:.1f} ms, p95 {p95(changed) * 1000:.1f} ms; "
        f"unchanged median {statistics.median(unchanged) * 1000:.1f} ms, "
        f"p95 {p95(unchanged) * 1000:.1f} ms"
    )
    ntlm = row["transport"] == "ntlm"
    files = row["files"]
    ours_changed = row["changed_stats"].requests
    ours_unchanged = row["unchanged_stats"].requests
    ans_changed = ansible_requests(files, ANSIBLE_COMMANDS_CHANGED, ntlm)
    ans_unchanged = ansible_requests(files, ANSIBLE_COMMANDS_UNCHANGED, ntlm)
    print(
        f"  Ansible win_template, {files} files, documented cost: changed "
        f"{files * ANSIBLE_COMMANDS_CHANGED} commands = {ans_changed} requests "
        f"(ours: 2 commands, {ours_changed} requests, {ans_changed / ours_changed:.1f}x fewer); "
        f"unchanged {files * ANSIBLE_COMMANDS_UNCHANGED} commands = {ans_unchanged} requests "
        f"(ours: 1 command, {ours_unchanged} requests, {ans_unchanged / ours_unchanged:.1f}x "
        f"fewer); powershell.exe starts {files * ANSIBLE_COMMANDS_CHANGED} vs 2 changed, "
        f"{files * ANSIBLE_COMMANDS_UNCHANGED} vs 1 unchanged"
    )
    print(
        f"  at {WAN_RTT * 1000:g} ms per request round trip (network only, no CPU, no process "
        f"start): ours {ours_changed * WAN_RTT * 1000:.0f} ms changed, "
        f"{ours_unchanged * WAN_RTT * 1000:.0f} ms unchanged; Ansible "
        f"{ans_changed * WAN_RTT * 1000:.0f} ms changed, {ans_unchanged * WAN_RTT * 1000:.0f} ms "
        "unchanged"
    )


RDS_USERS = 40
RDS_KIB = 100
SESSIONS = 50


def bench_rds(labkit: Any) -> None:
    from provisioner.microsip import ini
    from provisioner.rollout.push import inspect_request
    from provisioner.transport.agent import scripts
    from provisioner.transport.agent.operations import INSPECT

    with (
        tempfile.TemporaryDirectory() as folder,
        labkit.lab_kit(Path(folder), workstations=1, users_per_ws=RDS_USERS) as kit,
    ):
        ws, host = kit.lab.workstations["ws01"], kit.lab.hosts["ws01"]
        calls = "".join(
            f"call{n}=2026-12-01 10:{n % 60:02d} +4930{n:07d} 42\r\n" for n in range(RDS_KIB * 17)
        )
        for user in ws.users:
            data = ini.encode_ini(f"[Settings]\r\naccountId=1\r\n[Calls]\r\n{calls}")
            ws.put(ws.ini_path(user), data, owner=user.sid)
        size = len(ws.read(ws.ini_path(ws.users[0])) or b"")
        request = inspect_request(kit.station("ws01"), kit.files("ws01"))
        print(
            f"\n== RDS host: {RDS_USERS} users, microsip.ini of {size / 1024:.0f} KiB each, "
            "NTLM over HTTP"
        )
        envelope = scripts.make_envelope(INSPECT.name, INSPECT.wire(request))
        print(f"  inspect request envelope: {len(envelope):,} B")
        for label in ("first push (every file changes)", "second push (nothing changes)"):
            elapsed, result, stats = timed_push(kit, host)
            changed = sum(1 for f in result.files if f.status.value == "changed")
            print(
                f"  {label}: {result.status.value}, {changed} files changed, "
                f"{stats.requests} requests [{ops(stats)}], {elapsed:.2f} s"
            )
    with (
        tempfile.TemporaryDirectory() as folder,
        labkit.lab_kit(Path(folder), workstations=1, users_per_ws=SESSIONS) as kit,
    ):
        ws = kit.lab.workstations["ws01"]
        for user in ws.users:
            user.hive_loaded = True
            ws.start_microsip(user)
        start = time.perf_counter()
        kit.transport("ws01").request(inspect_request(kit.station("ws01"), kit.files("ws01")))
        elapsed = time.perf_counter() - start
        queries = ws.process_queries
        print(
            f"\n== {SESSIONS} sessions, each running MicroSIP: one inspect made "
            f"{queries.queries} process query(ies) and {queries.owner_lookups} owner lookups "
            f"({elapsed:.2f} s in the lab, which does not emulate a CIM call's cost); one query "
            f"per user, as before, is {SESSIONS} queries and {SESSIONS * SESSIONS:,} lookups"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--transports", default="basic,ntlm")
    parser.add_argument("--quick", action="store_true", help="5 repetitions")
    parser.add_argument("--rds", action="store_true", help="the RDS host cases too")
    args = parser.parse_args()
    repeats = 5 if args.quick else args.repeats
    one, five, fifteen = os.getloadavg()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load {one:.2f} {five:.2f} "
        f"{fifteen:.2f}"
    )
    labkit = load_labkit()
    for transport in args.transports.split(","):
        report(bench_transport(labkit, transport.strip(), repeats))
    if args.rds:
        bench_rds(labkit)
    one, five, fifteen = os.getloadavg()
    print(f"\nload at the end {one:.2f} {five:.2f} {fifteen:.2f}")


if __name__ == "__main__":
    main()
