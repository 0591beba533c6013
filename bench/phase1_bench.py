"""Benchmark of Phase 1 (load, resolve, open, render, lint) on synthetic inventories.

For each size, a child process builds the inventory with real decryption and reports wall
time per phase and its peak memory (ru_maxrss). With --ansible, the same template is rendered
by ansible-playbook's template module for the same hosts on connection: local.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from provisioner import secretstore, vault
from provisioner.model import Secret

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


def run_child(root: Path, identity_path: Path, workers: int | None) -> dict[str, object]:
    """Build with real decryption in this process; report timings and peak memory.

    With several workers, the per-phase figures are summed over the processes (CPU-like
    seconds) while ``total`` is wall time; ``child_peak_rss_mib`` is the largest worker's peak
    (its pages are mostly shared with this process, copy-on-write).
    """
    from provisioner import build

    def opener(recipients: vault.Recipients) -> vault.Opener:
        keyring = vault.Keyring(recipients)
        keyring.add(secretstore.unlock(secretstore.read_identity(identity_path), None))
        return keyring

    start = time.perf_counter()
    result = build.build(root, opener_factory=opener, workers=workers)
    total = time.perf_counter() - start
    return {
        "total": total,
        "workers": result.workers,
        "timings": result.timings,
        "files": len(result.files),
        "errors": sum(1 for f in result.findings if f.severity == "error"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "child_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
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
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "IDENTITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    workers = args.workers or None
    if args.child:
        print(json.dumps(run_child(Path(args.child[0]), Path(args.child[1]), workers)))
        return
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
            generated = time.perf_counter() - start
            command = [sys.executable, __file__, "--child", str(root), str(identity)]
            if args.workers:
                command[2:2] = ["--workers", str(args.workers)]
            stdout, tree_peak, cpu = run_sampled(command)
            report = json.loads(stdout.strip().splitlines()[-1])
            phases = ", ".join(f"{k} {v:.2f}s" for k, v in report["timings"].items())
            print(
                f"{size:>7} users: total {report['total']:.2f}s with {report['workers']} "
                f"process(es), CPU {cpu:.2f}s ({phases}); {report['files']} files, "
                f"{report['errors']} errors, "
                f"peak RSS {report['peak_rss_mib']:.0f} MiB, largest worker "
                f"{report['child_peak_rss_mib']:.0f} MiB, peak PSS of all processes "
                f"{tree_peak:.0f} MiB (generation {generated:.1f}s)"
            )
    if args.ansible:
        elapsed = bench_ansible(args.ansible, args.forks)
        if elapsed is not None:
            print(
                f"ansible-playbook template, {args.ansible} hosts, forks {args.forks}, "
                f"connection local: {elapsed:.1f}s ({elapsed / args.ansible * 1000:.1f} ms/host)"
            )


if __name__ == "__main__":
    main()
