"""Every command that reads an inventory, on hostile YAML files: exit status, time, peak memory.

Each hostile file is added to a copy of the example inventory; each command runs in a child
process whose address space is limited (``--memory``, 2 GB by default: the files below used
to take all of a 24 GB machine's memory), so a regression cannot take the machine down. For
each run: the exit status (1 is the expected input error; 70 an internal error; a negative
number the signal that killed it), wall time, the child's peak RSS, and where the message
points. Prints figures; asserts nothing.

    python bench/hostile_bench.py                 # every file, every command
    python bench/hostile_bench.py --files laughs --commands validate,"secrets lint"
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "inventory"
USER, WORKSTATION = "alice", "ber-ws-001"


def billion_laughs() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


# name -> (what it is, text)
FILES: dict[str, tuple[str, str]] = {
    "laughs": ("nested aliases, 10**12 values once expanded", billion_laughs()),
    "recursive-alias": ("an alias inside its own anchor", "users: &u\n  u9: *u\n"),
    "deep-flow-4k": ("2,000 nested [ (C composer, then refused)", "x: " + "[" * 2000 + "\n"),
    "deep-flow-200k": (
        "100,000 nested [ (crashed the C composer)",
        "x: " + "[" * 100_000 + "]" * 100_000 + "\n",
    ),
    "deep-block-4k": ("2,000 nested - (block sequences)", "- " * 2000 + "x\n"),
    "deep-flow-fallback": (
        "5,000 nested [ after a line libyaml refuses (pure-Python parser)",
        "a: {b: c:d}\nx: " + "[" * 5000 + "\n",
    ),
    "oversized": ("17 MiB of comments", "users:\n" + "# padding\n" * (17 * 1024 * 1024 // 10)),
}

COMMANDS: dict[str, tuple[str, ...]] = {
    "validate": ("validate", "{inv}"),
    "render": ("render", "{inv}", "--out", "{out}"),
    "explain": ("explain", USER, "-i", "{inv}"),
    "inventory list": ("inventory", "list", "-i", "{inv}"),
    "inventory graph": ("inventory", "graph", "-i", "{inv}"),
    "user show": ("user", "show", USER, "-i", "{inv}"),
    "secrets lint": ("secrets", "lint", "-i", "{inv}"),
    "secrets verify": ("secrets", "verify", "-i", "{inv}", "{keys}"),
    "keys list": ("keys", "list", "-i", "{inv}"),
    "validate (real keys)": ("validate", "{inv}", "{keys}"),
    "rollout --check": ("rollout", "--check", "-i", "{inv}", "{keys}"),
    "diff": ("diff", WORKSTATION, "-i", "{inv}", "{keys}"),
}


def run(args: list[str], cwd: Path, limit: int, timeout: float) -> tuple[int, float, float, str]:
    """Exit status, wall seconds, peak RSS (MiB) and output of the CLI in a limited child."""
    start_code = (
        "import resource, runpy, sys;"
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}));"
        "sys.argv = ['provisioner', *sys.argv[1:]];"
        "runpy.run_module('provisioner.cli', run_name='__main__')"
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "XDG_CONFIG_HOME": str(cwd / "config"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    output = cwd / "output.txt"
    with output.open("wb") as sink:
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", start_code, *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
        )
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 1024**2
    return child.returncode, wall, peak, output.read_text(encoding="utf-8", errors="replace")


def where(output: str, name: str) -> str:
    """The place the message names in the hostile file, or what went wrong instead."""
    found = re.search(rf"{re.escape(name)}\.yaml(:\d+(?::\d+)?)?", output)
    if found:
        return f"{name}.yaml{found.group(1) or ''}"
    if "Traceback" in output or "MemoryError" in output:
        return "traceback: " + output.strip().splitlines()[-1][:60]
    return output.strip().splitlines()[-1][:70] if output.strip() else "(no output)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", default=",".join(FILES))
    parser.add_argument("--commands", default=",".join(COMMANDS))
    parser.add_argument("--memory", type=int, default=2_000_000_000, help="address-space bytes")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    args = parser.parse_args()
    files = [f.strip() for f in args.files.split(",") if f.strip()]
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, limit {args.memory:,} B")
    worst: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        identity = base / "demo-only.sipid"
        shutil.copyfile(EXAMPLE / ".demo-key" / "demo-only.sipid", identity)
        identity.chmod(0o600)
        keys = ["--identity", str(identity), "--passphrase-file"]
        keys.append(str(EXAMPLE / ".demo-key" / "demo-only.passphrase"))
        print(f"{'file':20} {'command':22} {'exit':>5} {'wall s':>7} {'peak MiB':>9}  message")
        for name in files:
            described, text = FILES[name]
            work = base / name
            inventory = work / "inventory"
            shutil.copytree(EXAMPLE, inventory, ignore=shutil.ignore_patterns(".demo-key"))
            (inventory / f"{name}.yaml").write_text(text, encoding="utf-8")
            size = len(text.encode("utf-8"))
            print(f"# {name}: {described}, {size:,} bytes")
            for command in commands:
                argv: list[str] = []
                for part in COMMANDS[command]:
                    if part == "{keys}":
                        argv += keys
                    else:
                        argv.append(part.format(inv=inventory, out=work / "out"))
                code, wall, peak, output = run(argv, work, args.memory, args.timeout)
                slowest, largest = worst.get(name, (0.0, 0.0))
                worst[name] = (max(slowest, wall), max(largest, peak))
                print(
                    f"{name:20} {command:22} {code:>5} {wall:>7.2f} {peak:>9.0f}  "
                    f"{where(output, name)}"
                )
    print("# worst per file: wall s, peak MiB")
    for name, (slowest, largest) in worst.items():
        print(f"{name:20} {slowest:.2f} s, {largest:.0f} MiB")


if __name__ == "__main__":
    main()
