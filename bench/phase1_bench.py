"""Benchmark of Phase 1 (load, resolve, open, render, lint) on synthetic inventories.

For each size, a child process builds the inventory with real decryption and reports wall
time per phase and its peak memory (ru_maxrss). Beside it, in the same run, a *floor*: one
plain process that loads the same YAML with ruamel's C safe loader and renders the same two
files per user with unsandboxed Jinja2, encoded UTF-16LE (no decryption, no checks, no lint);
Phase 1's wall and CPU time are printed as ratios to it.

``--compare`` runs variants with one piece of Phase 1's parallel machinery switched off (see
VARIANTS), each in alternating pairs with its baseline (``--rounds`` pairs: A B, B A, A B ...),
and prints medians and spreads of the absolute figures and of the ratios of each pair.

With --ansible, the same template is rendered by ansible-playbook's template module for the
same hosts on connection: local. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from provisioner.inventory.model import Secret
from provisioner.microsip import ini
from provisioner.secrets import secretstore, vault

REALM = "bench-realm"
PASSPHRASE = b"bench passphrase, not secret"
USERS_PER_FILE = 1000


def generate(root: Path, users: int) -> Path:
    """Write an inventory of ``users`` users, one workstation each, with sealed passwords."""
    identity = vault.generate_identity()
    recipients = vault.new_recipients(REALM, identity.recipient())
    secretstore.write_recipients(root, recipients)
    identity_path = root.parent / "bench.sipid"
    secretstore.write_identity(identity_path, identity, None, protection="none")
    key = recipients.active_key()
    sites = [f"site-{i:02d}" for i in range(10)]
    departments = [f"dept-{i:02d}" for i in range(20)]
    lines = [
        "defaults:",
        "  settings:",
        "    updatesInterval: never",
        "    enableLocalAccount: 0",
        "    audioCodecs: [opus/48000/2, PCMA/8000/1]",
        "  account:",
        "    registerRefresh: 300",
        "  enforced:",
        "    settings:",
        "      updatesInterval: never",
        "groups:",
    ]
    for site in sites:
        lines += [
            f"  {site}:",
            "    account:",
            f"      server: pbx-{site}.example.com",
            "      transport: tls",
            "      SRTP: mandatory",
        ]
    for index, dept in enumerate(departments):
        lines += [
            f"  {dept}:",
            f"    parents: [{sites[index % len(sites)]}]",
            "    settings:",
            f"      autoAnswerDelay: {index % 5}",
        ]
    (root / "groups.yaml").write_text("\n".join(lines) + "\n")
    for start in range(0, users, USERS_PER_FILE):
        user_lines = ["users:"]
        station_lines = ["workstations:"]
        for i in range(start, min(start + USERS_PER_FILE, users)):
            name = f"u{i:06d}"
            path = f"/users/{name}/accounts/main/password"
            token = vault.seal(Secret(f"pw-{i}-x"), realm=REALM, path=path, recipient=key)
            user_lines += [
                f"  {name}:",
                f"    windows: ACME\\{name}",
                f'    display_name: "User {i}"',
                f"    groups: [{departments[i % len(departments)]}]",
                "    accounts:",
                "      main:",
                f"        sip_uri: {100000 + i}@pbx.example.com",
                f'        displayName: "User {i}"',
                f"        password: {token}",
            ]
            station_lines += [
                f"  ws-{i:06d}:",
                f"    address: ws-{i:06d}.corp.example.com",
                f"    groups: [{sites[i % len(sites)]}]",
                f"    users: [{name}]",
            ]
        (root / f"users-{start // USERS_PER_FILE:04d}.yaml").write_text(
            "\n".join(user_lines) + "\n"
        )
        (root / f"workstations-{start // USERS_PER_FILE:04d}.yaml").write_text(
            "\n".join(station_lines) + "\n"
        )
    return identity_path


# What a variant switches off, each compared with its baseline. Switches are applied in the
# benchmark's child only: through the engine's own parameters where it has one, else by
# replacing one module attribute before the build.
VARIANTS: dict[str, tuple[str, str]] = {
    "shipped": ("", "Phase 1 as the commands run it"),
    "build-serial": ("shipped", "no build workers, the YAML still composed ahead by workers"),
    "compose-serial": ("shipped", "no composing workers: every YAML file composed in this process"),
    "one-part": ("shipped", "a build worker sends its files in one part at its end, not streamed"),
    "small-pipe": ("shipped", "workers' pipes of the default size (64 KiB) instead of 1 MiB"),
    "gc-on": ("shipped", "the garbage collector left on during the load and the build"),
    "serial": ("shipped", "one process: build(workers=1)"),
    "serial-gc-on": ("serial", "one process, the garbage collector left on"),
    "floor": ("shipped", "ruamel's C safe loader and plain Jinja2, UTF-16LE: no checks"),
}
# Enough of anything that a constant of "so much per worker" means one process.
_NEVER = 10**15


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (forked workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _switch_off(variant: str) -> int | None:
    """Apply ``variant``'s switches in this process; the build's ``workers`` argument for it."""
    from provisioner import gcpause
    from provisioner.inventory import loader
    from provisioner.parallel import workers as parallel_workers
    from provisioner.render import build

    if variant == "small-pipe":
        parallel_workers.PIPE_BYTES = 64 * 1024
    if variant == "one-part":
        build.TARGETS_PER_PART = _NEVER
    if variant == "build-serial":
        build.TARGETS_PER_WORKER = _NEVER
    if variant == "compose-serial":
        loader.BYTES_PER_COMPOSE_WORKER = _NEVER
    if variant in ("gc-on", "serial-gc-on"):
        gcpause.paused_gc = contextlib.nullcontext  # type: ignore[assignment]
    return 1 if variant in ("serial", "serial-gc-on") else None


def run_child(
    root: Path, identity_path: Path, workers: int | None, variant: str = "shipped"
) -> dict[str, object]:
    """Build with real decryption in this process; report timings and peak memory.

    With several workers, the per-phase figures are summed over the processes (CPU-like
    seconds) while ``total`` is wall time; ``child_peak_rss_mib`` is the largest worker's peak
    (its pages are mostly shared with this process, copy-on-write). ``collect``: one full
    collection after the build, which the command's next steps (or its exit) would meet.
    """
    from provisioner.render import build

    variant_workers = _switch_off(variant)

    def opener(recipients: vault.Recipients) -> vault.Opener:
        keyring = vault.Keyring(recipients)
        keyring.add(secretstore.unlock(secretstore.read_identity(identity_path), None))
        return keyring

    cpu = _cpu_seconds()
    start = time.perf_counter()
    result = build.build(root, opener_factory=opener, workers=workers or variant_workers)
    total = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    collect = time.perf_counter()
    gc.collect()
    collect = time.perf_counter() - collect
    return {
        "total": total,
        "cpu": cpu,
        "collect": collect,
        "workers": result.workers,
        "timings": result.timings,
        "files": len(result.files),
        "errors": sum(1 for f in result.findings if f.severity == "error"),
        "digest": _digest((f.relative_path, ini.decode_ini_bytes(f.data)) for f in result.files),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "child_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _digest(files: Iterable[tuple[str, str]]) -> str:
    """What two runs must agree on: each file's path and lines, in any order, passwords left
    out (the floor writes the sealed token)."""
    digest = hashlib.sha256()
    for path, text in sorted(files):
        lines = sorted(line for line in text.splitlines() if not line.startswith("password="))
        digest.update("\0".join([path, *lines]).encode() + b"\1")
    return digest.hexdigest()[:16]


def _ini_text(value: object) -> str:
    """The floor's ``ini`` filter: what the real one writes for ordinary values."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return " ".join(_ini_text(v) for v in value)
    return "" if value is None else str(value)


def _chain(groups: dict[str, Any], names: Iterable[str], chain: list[str]) -> list[str]:
    """Groups after their parents, no repeats (as the engine orders them)."""
    for name in names:
        if name not in chain:
            _chain(groups, groups[name].get("parents") or (), chain)
            chain.append(name)
    return chain


def _merged(layers: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    return merged


def run_floor(root: Path) -> dict[str, object]:
    """The floor: the same YAML and templates, the least work that produces the same files.

    ruamel's C safe loader (plain dicts, no positions, no checks), the layers merged with
    dict.update, the templates rendered by an unsandboxed Jinja2 environment, each file
    encoded as UTF-16LE with its BOM and CRLF; the sealed token is written as the password
    (no decryption), and nothing is linted.
    """
    import jinja2
    from ruamel.yaml import YAML

    cpu = _cpu_seconds()
    start = time.perf_counter()
    yaml = YAML(typ="safe", pure=False)
    data: dict[str, dict[str, Any]] = {"defaults": {}, "groups": {}, "workstations": {}}
    data["users"] = {}
    for path in sorted(root.glob("*.yaml")):
        if path.name != "recipients.yaml":
            for section, entries in (yaml.load(path) or {}).items():
                data[section].update(entries or {})
    loaded = time.perf_counter() - start
    folder = root / "templates"
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(
            [str(folder if folder.is_dir() else Path(__file__).parent.parent / "templates")]
        ),
        autoescape=False,  # noqa: S701 - INI text, not HTML
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters["ini"] = _ini_text
    microsip = env.get_template("microsip.ini.j2")
    override = env.get_template("override.ini.j2")
    defaults, groups, users = data["defaults"], data["groups"], data["users"]
    install = {
        "mode": "installed",
        "install_dir": r"C:\Program Files\MicroSIP",
        "exe": "microsip.exe",
        "ini_name": "microsip.ini",
    }
    files: list[tuple[str, bytes]] = []

    def encoded(text: str) -> bytes:
        return b"\xff\xfe" + text.replace("\n", "\r\n").encode("utf-16-le")

    for name, station in data["workstations"].items():
        station_groups = _chain(groups, station.get("groups") or (), [])
        station_layers = [groups[g] for g in station_groups] + [station]
        enforced = _merged(
            [defaults.get("enforced", {}).get("settings")]
            + [layer.get("enforced", {}).get("settings") for layer in station_layers]
        )
        workstation = {
            "name": name,
            "address": station.get("address", name),
            "groups": station_groups,
            "description": station.get("description", ""),
        }
        context = {
            "workstation": workstation,
            "install": install,
            "enforced": enforced,
            "users": station.get("users") or [],
        }
        files.append((f"{name}/override.ini", encoded(override.render(context))))
        for user_name in station.get("users") or ():
            user = users[user_name]
            user_groups = _chain(groups, [*station_groups, *(user.get("groups") or ())], [])
            layers = [defaults, *(groups[g] for g in user_groups), station, user]
            settings = _merged([*(layer.get("settings") for layer in layers), enforced])
            settings.pop("accountId", None)
            accounts = []
            shared = _merged(layer.get("account") for layer in layers)
            if user.get("display_name"):
                shared.setdefault("displayName", user["display_name"])
            for index, (account_id, account) in enumerate(user["accounts"].items(), start=1):
                fields = dict(shared)
                number, _, domain = str(account.get("sip_uri", "")).partition("@")
                fields.update(username=number, domain=domain)
                fields.update((k, v) for k, v in account.items() if k not in ("sip_uri", "active"))
                accounts.append(
                    {"index": index, "id": account_id, "active": True, "fields": fields}
                )
            context = {
                "workstation": workstation,
                "install": install,
                "user": {
                    "name": user_name,
                    "windows": user.get("windows", f".\\{user_name}"),
                    "display_name": user.get("display_name", ""),
                    "groups": user_groups,
                },
                "settings": settings,
                "accounts": accounts,
                "active_account": 1,
                "enforced": enforced,
            }
            relative = f"{name}/{user_name}/microsip.ini"
            files.append((relative, encoded(microsip.render(context))))
    total = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    collect = time.perf_counter()
    gc.collect()
    collect = time.perf_counter() - collect
    return {
        "total": total,
        "cpu": cpu,
        "collect": collect,
        "workers": 1,
        "timings": {"load": loaded, "merge+render+encode": total - loaded},
        "files": len(files),
        "errors": 0,
        "digest": _digest(
            (relative, content[2:].decode("utf-16-le")) for relative, content in files
        ),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "child_peak_rss_mib": 0.0,
    }


def _pss_mib(pid: int) -> float:
    """Proportional set size of one process: shared pages counted once across processes."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pids
    for child in children:
        pids += _tree(int(child))
    return pids


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_sampled(command: list[str]) -> tuple[str, float, float]:
    """Run the child; return its stdout, the peak summed PSS of it and its workers, and the CPU
    seconds they used (less sensitive than wall time to other work on a shared machine)."""
    peak = 0.0
    cpu_before = _children_cpu()
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.25):
                peak = max(peak, sum(_pss_mib(pid) for pid in _tree(child.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, _ = child.communicate(timeout=3600)
        done.set()
        sampler.join()
    if child.returncode:
        raise SystemExit(f"benchmark child failed with exit code {child.returncode}")
    return stdout, peak, _children_cpu() - cpu_before


ANSIBLE_PLAYBOOK = """\
- hosts: all
  connection: local
  gather_facts: false
  tasks:
    - name: render microsip.ini
      ansible.builtin.template:
        src: {template}
        dest: "{out}/{{{{ inventory_hostname }}}}.ini"
        newline_sequence: "\\r\\n"
        output_encoding: utf-16
"""

ANSIBLE_TEMPLATE = """\
[Settings]
accountId=1
updatesInterval=never
enableLocalAccount=0
[Account1]
server={{ server }}
domain=pbx.example.com
username={{ username }}
password={{ password }}
displayName={{ display_name }}
transport=tls
"""


def bench_ansible(hosts: int, forks: int) -> float | None:
    """Wall time of ansible-playbook rendering one template per host on connection: local."""
    playbook_bin = shutil.which("ansible-playbook") or str(
        Path(sys.executable).parent / "ansible-playbook"
    )
    if not Path(playbook_bin).exists():
        print("ansible-playbook not installed: pip install -e '.[bench]'")
        return None
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "microsip.ini.j2").write_text(ANSIBLE_TEMPLATE)
        out = root / "out"
        out.mkdir()
        (root / "play.yml").write_text(
            ANSIBLE_PLAYBOOK.format(template=root / "microsip.ini.j2", out=out)
        )
        lines = ["all:", "  vars:", f"    ansible_python_interpreter: {sys.executable}", "  hosts:"]
        for i in range(hosts):
            lines += [
                f"    ws-{i:06d}:",
                f"      server: pbx-site-{i % 10:02d}.example.com",
                f"      username: {100000 + i}",
                f"      password: pw-{i}-x",
                f'      display_name: "User {i}"',
            ]
        (root / "hosts.yml").write_text("\n".join(lines) + "\n")
        env = dict(
            os.environ,
            ANSIBLE_FORKS=str(forks),
            ANSIBLE_HOST_KEY_CHECKING="False",
            ANSIBLE_LOCALHOST_WARNING="False",
            ANSIBLE_INVENTORY_UNPARSED_WARNING="False",
        )
        start = time.perf_counter()
        done = subprocess.run(
            [playbook_bin, "-i", str(root / "hosts.yml"), str(root / "play.yml")],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            print(f"ansible-playbook failed ({done.returncode}):\n{done.stdout[-2000:]}")
            return None
        assert len(list(out.iterdir())) == hosts
        return elapsed


def _spread(values: list[float], digits: int = 2) -> str:
    """Median, then min-max when there are several values."""
    median = f"{statistics.median(values):.{digits}f}"
    if len(values) == 1:
        return median
    return f"{median} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _load_average() -> float:
    """The machine's load average over the last minute (how busy the shared cores were)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def _run(root: Path, identity: Path, variant: str, workers: int) -> dict[str, Any]:
    """One benchmark child: its report, with the peak PSS of its process tree added."""
    command = [sys.executable, __file__, "--child", str(root), str(identity)]
    command += ["--variant", variant]
    if workers and variant == "shipped":
        command += ["--workers", str(workers)]
    load = _load_average()
    stdout, tree_peak, _ = run_sampled(command)
    report: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    report["variant"], report["tree_peak_mib"], report["load"] = variant, tree_peak, load
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in report["timings"].items())
    print(
        f"  {variant:>16}: total {report['total']:.2f}s with {report['workers']} process(es), "
        f"CPU {report['cpu']:.2f}s{f' ({phases})' if phases else ''}; then a full collection "
        f"{report['collect']:.2f}s; {report['files']} files, {report['errors']} errors, peak "
        f"RSS {report['peak_rss_mib']:.0f} MiB, largest worker "
        f"{report['child_peak_rss_mib']:.0f} MiB, peak PSS of all processes {tree_peak:.0f} MiB; "
        f"load average {load:.1f} before",
        flush=True,
    )
    return report


def compare(
    root: Path, identity: Path, variants: list[str], rounds: int, workers: int
) -> list[str]:
    """Each variant in ``rounds`` alternating pairs with its baseline; summary lines."""
    runs: dict[str, list[dict[str, Any]]] = {}
    pairs: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {v: [] for v in variants}
    for round_ in range(rounds):
        for variant in variants:
            baseline = VARIANTS[variant][0]
            order = [baseline, variant] if round_ % 2 == 0 else [variant, baseline]
            done = {name: _run(root, identity, name, workers) for name in order}
            for name, report in done.items():
                runs.setdefault(name, []).append(report)
            pairs[variant].append((done[baseline], done[variant]))
    lines = [
        "| variant | runs | wall s | CPU s | full collection after, s | peak PSS MiB "
        "| load average | wall ratio | CPU ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, reports in runs.items():
        ratios = ""
        if name in pairs:
            baseline = VARIANTS[name][0]
            # The floor is the denominator: how many times the floor Phase 1 takes.
            flip = name == "floor"
            wall = [
                (b["total"] / v["total"]) if flip else (v["total"] / b["total"])
                for b, v in pairs[name]
            ]
            cpu = [(b["cpu"] / v["cpu"]) if flip else (v["cpu"] / b["cpu"]) for b, v in pairs[name]]
            what = f"{baseline} / floor" if flip else f"/ {baseline}"
            ratios = f" | {what}: {_spread(wall, 3)} | {_spread(cpu, 3)}"
        else:
            ratios = " | | "
        lines.append(
            f"| {name} | {len(reports)} | {_spread([r['total'] for r in reports])} "
            f"| {_spread([r['cpu'] for r in reports])} "
            f"| {_spread([r['collect'] for r in reports])} "
            f"| {_spread([r['tree_peak_mib'] for r in reports], 0)} "
            f"| {_spread([r['load'] for r in reports], 1)}{ratios} |"
        )
    digests = {r["digest"] for reports in runs.values() for r in reports}
    agree = "the same files" if len(digests) == 1 else f"DIFFERENT files ({len(digests)} kinds)"
    lines.append(f"Every run wrote {agree} (paths and lines, passwords left out).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--ansible", type=int, default=0, help="hosts for the Ansible run")
    parser.add_argument("--forks", type=int, default=20)
    parser.add_argument(
        "--workers", type=int, default=0, help="Phase 1 processes (0: the tool's default)"
    )
    parser.add_argument(
        "--keep", default="", help="generate into (or reuse) this folder instead of a temp one"
    )
    parser.add_argument(
        "--compare",
        default="floor",
        help="variants run in pairs with their baselines: "
        + "; ".join(f"{name}: {what}" for name, (_, what) in VARIANTS.items() if name != "shipped"),
    )
    parser.add_argument("--rounds", type=int, default=1, help="pairs per variant")
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "IDENTITY"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="shipped", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, identity = Path(args.child[0]), Path(args.child[1])
        if args.variant == "floor":
            print(json.dumps(run_floor(root)))
        else:
            print(json.dumps(run_child(root, identity, args.workers or None, args.variant)))
        return
    variants = [v.strip() for v in args.compare.split(",") if v.strip()]
    for variant in variants:
        if variant not in VARIANTS or variant == "shipped":
            parser.error(f"unknown variant {variant!r}; one of {', '.join(list(VARIANTS)[1:])}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            base = Path(args.keep) / str(size) if args.keep else Path(folder)
            root = base / "inventory"
            identity = base / "bench.sipid"
            start = time.perf_counter()
            if not identity.exists():
                root.mkdir(parents=True)
                identity = generate(root, size)
            print(f"{size} users (generated in {time.perf_counter() - start:.1f}s):", flush=True)
            for line in compare(root, identity, variants, max(1, args.rounds), args.workers):
                print(line)
    if args.ansible:
        elapsed = bench_ansible(args.ansible, args.forks)
        if elapsed is not None:
            print(
                f"ansible-playbook template, {args.ansible} hosts, forks {args.forks}, "
                f"connection local: {elapsed:.1f}s ({elapsed / args.ansible * 1000:.1f} ms/host)"
            )


if __name__ == "__main__":
    main()
