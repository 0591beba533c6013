"""Benchmark of fleet rollouts against emulated workstations: wall time, requests, memory.

Three processes, so that the lab's CPU use does not distort the controller's figures:

* this one (the orchestrator) writes an inventory of N workstations with one user each and
  sealed passwords, then starts the two others and prints the figures;
* the lab child starts one emulated workstation per inventory workstation on 127.0.0.N
  (ephemeral ports), injects ``Faults(slow=latency)`` on every host, writes the lab file and
  answers ``stats`` (sum of every host's counters since the last ``stats``) on its stdin; it
  stops by itself on ``stop``, when its stdin closes (the orchestrator died) or after
  ``--max-seconds``;
* the controller child does what ``provisioner rollout --lab FILE --yes`` does: Phase 1
  (build), push lanes (``--processes``, as the CLI chooses them), then ``run_fleet`` with
  ``open_transport``, and reports wall time, statuses, CPU time (its own plus its lanes') and
  memory (peak RSS of each process, and the PSS of all of them summed at the end of the push:
  pages the lanes share with it by fork count once). It runs twice per scenario: first push
  (every workstation changed), then second push (every workstation unchanged).

Lower bound of a rollout = requests per host (measured by the lab) x latency x hosts / forks.

Scenario "latency": 1,000 hosts, Faults(slow=0.02), forks 20. Scenario "memory": 10,000 hosts
without latency. ``--quick`` runs both on 20 hosts. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from provisioner.inventory.model import Secret
from provisioner.secrets import secretstore, vault
from provisioner.secrets.credscope import Scope

REALM = "bench-fleet"
WINRM_USER = "svc-microsip"
WINRM_PASSWORD = "Bench-WinRM-Pw-1"
PER_FILE = 1000

DEFAULTS = """\
defaults:
  settings:
    updatesInterval: never
    EC: 1
    audioCodecs: [opus/48000/2, PCMA/8000/1]
  account:
    transport: tls
  enforced:
    settings:
      updatesInterval: never
  winrm:
    transport: {transport}
    scheme: {scheme}
    username: {user}
    password: {token}
  microsip:
    install_dir: C:\\Program Files\\MicroSIP
"""


# --------------------------------------------------------------------------- inventory


def write_inventory(root: Path, hosts: int, transport: str) -> Path:
    """N workstations ws00001.., one user each, sealed passwords; returns the identity file."""
    identity = vault.generate_identity()
    recipients = vault.new_recipients(REALM, identity.recipient())
    secretstore.write_recipients(root, recipients)
    identity_path = root.parent / f"{root.name}.sipid"
    secretstore.write_identity(identity_path, identity, None, protection="none")
    key = recipients.active_key()

    def seal(value: str, pointer: str, scope: Scope | None = None) -> str:
        return vault.seal(Secret(value), realm=REALM, path=pointer, recipient=key, scope=scope)

    (root / "defaults.yaml").write_text(
        DEFAULTS.format(
            transport=transport,
            scheme="https" if transport == "basic" else "http",
            user=WINRM_USER,
            token=seal(
                WINRM_PASSWORD, "/defaults/winrm/password", Scope.build(["ws*"], "encrypted")
            ),
        )
    )
    for start in range(1, hosts + 1, PER_FILE):
        stations, users = ["workstations:"], ["users:"]
        for i in range(start, min(start + PER_FILE, hosts + 1)):
            name = f"u{i:05d}"
            stations += [f"  ws{i:05d}:", f"    users: [{name}]"]
            users += [
                f"  {name}:",
                f"    windows: ACME\\{name}",
                "    accounts:",
                "      main:",
                f"        sip_uri: {name}@pbx.example.com",
                f"        password: {seal(f'Sip-{i}-pw', f'/users/{name}/accounts/main/password')}",
            ]
        part = (start - 1) // PER_FILE
        (root / f"workstations-{part:03d}.yaml").write_text("\n".join(stations) + "\n")
        (root / f"users-{part:03d}.yaml").write_text("\n".join(users) + "\n")
    return identity_path


def open_keyring(root: Path, identity_path: Path) -> vault.Keyring:
    """The keyring a rollout would use (identity without passphrase)."""
    keyring = vault.Keyring(secretstore.load_recipients(root))
    keyring.add(secretstore.unlock(secretstore.read_identity(identity_path), None))
    return keyring


def cpu_seconds() -> tuple[float, float]:
    """User and system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def peak_rss_mib() -> float:
    """ru_maxrss of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_cpu_seconds() -> float:
    """User plus system CPU time of this process's children reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_mib(pid: int, path: str, key: str) -> float:
    """A ``kB`` figure of ``/proc/PID/PATH`` (such as status VmHWM or smaps_rollup Pss) in MiB."""
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def emit(payload: dict[str, Any]) -> None:
    """One JSON line on stdout (the children's answers)."""
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- lab child


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def lab_child(
    root: Path, identity_path: Path, lab_file: Path, slow: float, max_s: float, profile: str
) -> None:
    """Run the lab until told to stop; answer ``stats`` lines on stdin."""
    from provisioner.inventory.loader import load_inventory
    from provisioner.lab import Faults
    from provisioner.lab.inventory_lab import start_inventory_lab

    profiles: list[Any] = []
    if profile:
        # cProfile sees only the thread that enables it: one profiler per lab thread, each
        # enabled by the thread's first profile event (the lab starts its threads later).
        import cProfile

        def start_profiler(*_: object) -> None:
            profiler = cProfile.Profile()
            profiles.append(profiler)
            profiler.enable()

        threading.setprofile(start_profiler)
    start = time.perf_counter()
    inventory = load_inventory(root)
    hosts = len(inventory.workstations)
    # One listening socket per host, plus connections, files and the selector: leave room.
    nofile = raise_nofile(hosts + 4096)
    running = start_inventory_lab(inventory, open_keyring(root, identity_path), port=0)
    stopped = threading.Event()

    def stop_lab(*_: object) -> None:
        if not stopped.is_set():
            stopped.set()
            running.lab.stop(timeout=10)
            if profiles:
                import pstats

                merged = pstats.Stats(profiles[0])
                for other in profiles[1:]:
                    merged.add(other)
                merged.dump_stats(profile)

    try:
        if slow:
            for host in running.hosts.values():
                host.set_faults(Faults(slow=slow))
        lab_file.write_text(running.lab_map(pid=os.getpid()).dump())
        emit(
            {
                "ready": True,
                "hosts": len(running.hosts),
                "startup_s": time.perf_counter() - start,
                "nofile": list(nofile),
                "rss_mib": peak_rss_mib(),
            }
        )
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        deadline = time.monotonic() + max_s
        cpu_mark = cpu_seconds()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                print("lab child: --max-seconds reached, stopping", file=sys.stderr)
                break
            ready, _, _ = select.select([sys.stdin], [], [], min(left, 5.0))
            if not ready:
                continue
            line = sys.stdin.readline()
            if not line or line.strip() == "stop":
                break
            if line.strip() == "stats":
                emit(lab_stats(running.hosts, cpu_mark))
                cpu_mark = cpu_seconds()
    finally:
        stop_lab()


def lab_stats(hosts: dict[str, Any], cpu_mark: tuple[float, float]) -> dict[str, Any]:
    """Every host's counters summed (then reset), and the lab's CPU time since ``cpu_mark``."""
    operations: Counter[str] = Counter()
    per_host: list[int] = []
    connections = commands = errors = shells = 0
    for host in hosts.values():
        stats = host.stats()
        host.reset_counts()
        operations.update(stats.by_operation)
        per_host.append(stats.requests)
        connections += stats.connections
        commands += stats.commands
        errors += len(host.handler_errors)
        shells += host.open_shells
    user, system = cpu_seconds()
    return {
        "requests": sum(per_host),
        "per_host_min": min(per_host),
        "per_host_max": max(per_host),
        "by_operation": dict(operations),
        "connections": connections,
        "commands": commands,
        "handler_errors": errors,
        "open_shells": shells,
        "cpu_user_s": user - cpu_mark[0],
        "cpu_sys_s": system - cpu_mark[1],
        "rss_mib": peak_rss_mib(),
    }


# --------------------------------------------------------------------------- controller child


def controller_child(
    root: Path,
    identity_path: Path,
    lab_file: Path,
    forks: int,
    canary: str,
    profile: str,
    processes: int,
) -> None:
    """Phase 1, lanes, then run_fleet, as ``provisioner rollout --lab FILE --yes`` does."""
    from provisioner.inventory import resolve
    from provisioner.render import build
    from provisioner.rollout import connections, lanes, runner

    start = time.perf_counter()
    keyring = open_keyring(root, identity_path)
    result = build.build(root, opener_factory=lambda _: keyring)
    if not result.ok or result.inventory is None:
        emit({"error": [str(f) for f in result.findings][:5]})
        return
    files: dict[str, list[build.BuiltFile]] = {}
    for item in result.files:
        files.setdefault(item.target.workstation, []).append(item)
    stations = {name: resolve.resolve_station(result.inventory, name) for name in files}
    lab = connections.LabMap.load(lab_file)
    phase1 = time.perf_counter() - start
    rss_phase1 = peak_rss_mib()

    def transport(plan: resolve.StationPlan) -> Any:
        return connections.open_transport(plan, keyring, lab, timeout=60)

    options = runner.RolloutOptions(forks=forks, canary=canary, max_fail=100.0)
    wanted = lanes.choose_processes(len(stations), forks, processes)
    profiles: list[Any] = []
    if profile:
        wanted = 1  # the profiles are collected in this process only
        # cProfile sees only the thread that enables it: profile each push on its worker.
        import cProfile

        push_one = runner._push_with_retries

        def profiled(*args: Any, **kwargs: Any) -> Any:
            profiler = cProfile.Profile()
            profiler.enable()
            try:
                return push_one(*args, **kwargs)
            finally:
                profiler.disable()
                profiles.append(profiler)

        runner._push_with_retries = profiled
    lanes_cpu_before = children_cpu_seconds()  # Phase 1's workers, if any
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    with runner.executor(stations, files, transport, wanted) as pushers:
        pids = pushers.pids if isinstance(pushers, lanes.Lanes) else []
        run = runner.run_fleet(sorted(stations), pushers, options)
        wall = time.perf_counter() - start
        lane_peaks = [proc_mib(pid, "status", "VmHWM") for pid in pids]
        pss = sum(proc_mib(pid, "smaps_rollup", "Pss") for pid in [os.getpid(), *pids])
    cpu_after = cpu_seconds()
    lanes_cpu = children_cpu_seconds() - lanes_cpu_before
    if profiles:
        import pstats

        merged = pstats.Stats(profiles[0])
        for other in profiles[1:]:
            merged.add(other)
        merged.dump_stats(profile)
    counts = {status.value: n for status, n in run.counts().items() if n}
    durations = sorted(r.duration for r in run.results.values())
    failures = [f"{r.host}: {r.message}" for r in run.results.values() if not r.ok]
    emit(
        {
            "hosts": len(stations),
            "phase1_s": phase1,
            "rss_after_phase1_mib": rss_phase1,
            "wall_s": wall,
            "counts": counts,
            "retried": sum(1 for r in run.results.values() if r.attempts > 1),
            "failures": failures[:5],
            "stopped": run.stopped,
            "cpu_user_s": cpu_after[0] - cpu_before[0],
            "cpu_sys_s": cpu_after[1] - cpu_before[1],
            "host_p50_s": statistics.median(durations) if durations else 0.0,
            "host_p95_s": durations[int(0.95 * (len(durations) - 1))] if durations else 0.0,
            "host_max_s": durations[-1] if durations else 0.0,
            "peak_rss_mib": peak_rss_mib(),
            "threads_peak": threading.active_count(),
            "processes": len(pids),
            "fallback": pushers.fallback,
            "lanes_cpu_s": lanes_cpu,
            "lane_peak_rss_mib": lane_peaks,
            "pss_total_mib": pss,
        }
    )


# --------------------------------------------------------------------------- orchestrator


class LabProcess:
    """The lab child: started, asked for stats, stopped (it also stops by itself)."""

    def __init__(
        self, root: Path, identity: Path, lab_file: Path, slow: float, max_s: float, profile: str
    ):
        self.process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--lab-child",
                str(root),
                str(identity),
                str(lab_file),
                str(slow),
                str(max_s),
                profile,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self._answer(max_s)

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError("the lab child did not answer (see its stderr above)")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stats(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        return self._answer(600)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write("stop\n")
                self.process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_controller(
    root: Path, identity: Path, lab_file: Path, args: argparse.Namespace, prof: str
) -> dict[str, Any]:
    spec = {
        "root": str(root),
        "identity_path": str(identity),
        "lab_file": str(lab_file),
        "forks": args.forks,
        "canary": args.canary,
        "profile": prof,
        "processes": args.processes,
    }
    command = [sys.executable, __file__, "--controller-child", json.dumps(spec)]
    timeout = args.max_seconds
    child = subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)
    if child.stderr.strip():
        print(child.stderr.strip()[-2000:], file=sys.stderr)
    answer: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return answer


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def scenario(
    label: str, hosts: int, slow: float, args: argparse.Namespace, folder: Path
) -> list[dict[str, Any]]:
    """Generate, start the lab, roll out twice, stop the lab; print and return the rows."""
    root = folder / f"inventory-{label}"
    root.mkdir()
    start = time.perf_counter()
    identity = write_inventory(root, hosts, args.transport)
    generated = time.perf_counter() - start
    lab_file = folder / f"lab-{label}.json"
    print(
        f"\n== {label}: {hosts} workstations x 1 user, {args.transport}, latency "
        f"{slow * 1000:g} ms/request, forks {args.forks}, canary {args.canary}, "
        f"--processes {args.processes} "
        f"(inventory written in {generated:.1f}s; load {load_average()})"
    )
    lab_profile = (
        str(Path(args.lab_profile).with_suffix(f".{label}.prof")) if args.lab_profile else ""
    )
    lab = LabProcess(root, identity, lab_file, slow, args.max_seconds, lab_profile)
    rows: list[dict[str, Any]] = []
    try:
        ready = lab.ready
        print(
            f"lab child: {ready['hosts']} hosts up in {ready['startup_s']:.1f}s, "
            f"RLIMIT_NOFILE {ready['nofile'][0]}/{ready['nofile'][1]}, "
            f"RSS {ready['rss_mib']:.0f} MiB"
        )
        lab.stats()  # zero the counters (set_faults, nothing else, ran so far)
        for round_name in ("first push", "second push"):
            prof = ""
            if args.profile:
                prof = str(Path(args.profile).with_suffix(f".{label}.{round_name[0]}.prof"))
            ctl = run_controller(root, identity, lab_file, args, prof)
            if "error" in ctl:
                print(f"Phase 1 failed: {ctl['error']}")
                return rows
            counters = lab.stats()
            per_host = counters["requests"] / hosts
            bound = per_host * slow * hosts / args.forks
            row = {
                "scenario": label,
                "round": round_name,
                "hosts": hosts,
                "latency": slow,
                "forks": args.forks,
                "requests_per_host": per_host,
                "lower_bound_s": bound,
                "load": load_average(),
                "lab": counters,
                **ctl,
            }
            rows.append(row)
            print_row(row)
    finally:
        lab.stop()
    return rows


def controller_cpu(row: dict[str, Any]) -> float:
    """CPU seconds of the controller's push: its own and its lanes'."""
    return float(row["cpu_user_s"] + row["cpu_sys_s"] + row["lanes_cpu_s"])


def print_row(row: dict[str, Any]) -> None:
    lab = row["lab"]
    ratio = f"{row['wall_s'] / row['lower_bound_s']:.2f}x" if row["lower_bound_s"] else "n/a"
    ops = ", ".join(f"{k} {v / row['hosts']:g}" for k, v in sorted(lab["by_operation"].items()))
    cpu = controller_cpu(row)
    lab_cpu = lab["cpu_user_s"] + lab["cpu_sys_s"]
    lanes = (
        f"{row['processes']} push processes (CPU {row['lanes_cpu_s']:.1f}s, peak RSS "
        + ", ".join(f"{mib:.0f}" for mib in row["lane_peak_rss_mib"])
        + " MiB)"
        if row["processes"]
        else f"no push process{' (' + row['fallback'] + ')' if row['fallback'] else ''}"
    )
    print(
        f"  {row['round']}: {row['counts']}, retried {row['retried']}, "
        f"{len(row['failures'])} failure(s) {row['failures'][:2]}\n"
        f"    wall {row['wall_s']:.1f}s vs lower bound {row['lower_bound_s']:.1f}s ({ratio}); "
        f"requests/host {row['requests_per_host']:.2f} (min {lab['per_host_min']}, "
        f"max {lab['per_host_max']}) [{ops}]\n"
        f"    controller: {lanes}; peak RSS {row['peak_rss_mib']:.0f} MiB "
        f"(after Phase 1 {row['rss_after_phase1_mib']:.0f} MiB, Phase 1 {row['phase1_s']:.1f}s), "
        f"PSS of all its processes {row['pss_total_mib']:.0f} MiB, "
        f"CPU {cpu:.1f}s = {cpu / row['wall_s'] * 100:.0f}% of one core, "
        f"{cpu / max(lab['requests'], 1) * 1000:.2f} ms/request; "
        f"push p50 {row['host_p50_s'] * 1000:.0f} ms, p95 {row['host_p95_s'] * 1000:.0f} ms, "
        f"max {row['host_max_s'] * 1000:.0f} ms\n"
        f"    lab: CPU {lab_cpu:.1f}s = {lab_cpu / row['wall_s'] * 100:.0f}% of one core, "
        f"{lab_cpu / max(lab['requests'], 1) * 1000:.2f} ms/request, RSS {lab['rss_mib']:.0f} MiB,"
        f" handler errors {lab['handler_errors']}, shells left open {lab['open_shells']}; "
        f"load {row['load']}"
    )


def summary(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| scenario | round | hosts | latency | forks | processes | req/host | wall "
        "| lower bound | ratio | failed | controller peak RSS | controller PSS | controller CPU "
        "| lab CPU | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['wall_s'] / row['lower_bound_s']:.2f}x" if row["lower_bound_s"] else "n/a"
        failed = sum(v for k, v in row["counts"].items() if k not in ("changed", "unchanged"))
        lab_cpu = row["lab"]["cpu_user_s"] + row["lab"]["cpu_sys_s"]
        print(
            f"| {row['scenario']} | {row['round']} | {row['hosts']} | "
            f"{row['latency'] * 1000:g} ms | {row['forks']} | {max(1, row['processes'])} | "
            f"{row['requests_per_host']:.2f} | "
            f"{row['wall_s']:.1f} s | {row['lower_bound_s']:.1f} s | {ratio} | {failed} | "
            f"{max([row['peak_rss_mib'], *row['lane_peak_rss_mib']]):.0f} MiB | "
            f"{row['pss_total_mib']:.0f} MiB | {controller_cpu(row):.1f} s | "
            f"{lab_cpu:.1f} s | {row['load']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=1000, help="hosts of the latency scenario")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per request")
    parser.add_argument("--memory-hosts", type=int, default=10000, help="0 to skip")
    parser.add_argument("--forks", type=int, default=20)
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="push processes of the controller, as rollout --processes (0: automatic)",
    )
    parser.add_argument("--canary", default="1")
    parser.add_argument("--transport", choices=("ntlm", "basic"), default="ntlm")
    parser.add_argument("--quick", action="store_true", help="20 hosts in each scenario")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="cap per child")
    parser.add_argument("--profile", default="", help="cProfile file stem for the controller")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument(
        "--lab-profile", default="", help="cProfile file stem for the lab (both pushes)"
    )
    parser.add_argument("--lab-child", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--controller-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lab_child:
        root, identity, lab_file, slow, max_s, lab_profile = args.lab_child
        lab_child(
            Path(root), Path(identity), Path(lab_file), float(slow), float(max_s), lab_profile
        )
        return
    if args.controller_child:
        spec = json.loads(args.controller_child)
        for key in ("root", "identity_path", "lab_file"):
            spec[key] = Path(spec[key])
        controller_child(**spec)
        return
    if args.quick:
        args.hosts, args.memory_hosts = 20, 20
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load {load_average()}, "
        f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)}"
    )
    rows: list[dict[str, Any]] = []
    folder = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    try:
        if args.hosts:
            rows += scenario("latency", args.hosts, args.latency, args, folder)
        if args.memory_hosts:
            rows += scenario("memory", args.memory_hosts, 0.0, args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    summary(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
