"""A template author as an attacker: reading a password, or hanging or filling up CI.

Templates are code that people who may not read passwords write (contributors, CI). Inside
the sandbox a password is an opaque value whose only way out is the ``ini`` filter writing it
whole into a ``password`` key; anything else is a render error that names the template line
and never the value. Every render has a budget of CPU time, output and memory.

The passwords here are real ones (sealed and opened with a key), so that a leak would show.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from provisioner.inventory.model import Secret
from provisioner.render import build
from provisioner.render.budget import CLOCK, RenderBudget, expanded_size, stop_clock
from provisioner.secrets import vault
from tests.hostilekit import run_limited
from tests.phase1kit import (
    BASE,
    REALM,
    build_files,
    real_opener,
    recipients,
    secret_for,
    write_inventory,
)

POINTER = "/users/u1/accounts/main/password"
PASSWORD = secret_for(POINTER)  # what SEAL stands for in the test inventories
TEMPLATE_HEAD = "[Settings]\naccountId={{ active_account }}\n"
TEMPLATE_ACCOUNT = (
    "[Account1]\ndomain=x.example.com\nusername=u\n"
    "password={{ accounts[0].fields.password | ini }}\n"
)
PW = "accounts[0].fields.password"


def _forms(text: str) -> list[str]:
    """The password as an attacker would reshape it to get it past a check."""
    return [text, text[::-1], text.upper(), text.lower(), text[1:], text[:-1], ",".join(text)]


def _build(tmp_path: Path, template: str) -> build.BuildResult:
    files = {"templates/microsip.ini.j2": template}
    _, result = build_files(tmp_path / "inv", files, opener_factory=real_opener)
    return result


def _assert_nothing_leaked(result: build.BuildResult) -> None:
    texts = [str(f) for f in result.findings] + [repr(f) for f in result.findings]
    for built in result.files:
        if built.target.kind == "override":
            texts.append(built.data.decode("utf-16-le", "replace"))
    joined = "\n".join(texts)
    for form in _forms(PASSWORD):
        assert form not in joined


# Each line 3 of a template tries to get the password, or anything about it, out.
ATTACKS = [
    f"userAgent={{{{ {PW}.reveal() }}}}",
    f"userAgent={{{{ {PW}.reveal }}}}",
    f"userAgent={{{{ {PW}.matches_text('pw') }}}}",
    f"userAgent={{{{ {PW}.occurs_in('pw-users-u1') }}}}",
    f"userAgent={{{{ {PW}['reveal']() }}}}",
    f"userAgent={{{{ {PW}|ini }}}}",
    f"userAgent={{{{ {PW}|ini|reverse }}}}",
    f"userAgent={{{{ ({PW}|ini)[::-1] }}}}",
    f"userAgent={{{{ ({PW}|ini)|list|join(',') }}}}",
    f"userAgent={{{{ {PW}|ini|length }}}}",
    f"userAgent={{{{ {PW}|ini|replace('0', '1') }}}}",
    f"userAgent={{{{ {PW}|string }}}}",
    f"userAgent={{{{ {PW}|list }}}}",
    f"userAgent={{{{ {PW}|reverse }}}}",
    f"userAgent={{{{ {PW}|length }}}}",
    f"userAgent={{{{ {PW}|first }}}}",
    f"userAgent={{{{ {PW}|pprint }}}}",
    f"userAgent={{{{ {PW}|replace('a', 'b') }}}}",
    f"userAgent={{{{ {PW}|join }}}}",
    f"userAgent={{{{ {PW}|map('upper')|join }}}}",
    f"userAgent={{{{ {PW}|quoted }}}}",
    f"userAgent={{{{ {PW}|bool01 }}}}",
    f"userAgent={{{{ {PW}|default('x') }}}}",
    f"userAgent={{{{ [{PW}]|ini }}}}",
    "userAgent={{ accounts|map(attribute='fields.password')|map('reverse')|list }}",
    f"userAgent={{{{ {PW} ~ '' }}}}",
    f"userAgent={{{{ {PW} + 'x' }}}}",
    f"userAgent={{{{ 'x' + {PW} }}}}",
    f"userAgent={{{{ '%s' % {PW} }}}}",
    f"userAgent={{{{ '{{}}'.format({PW}) }}}}",
    f"userAgent={{{{ '%s'|format({PW}) }}}}",
    f"userAgent={{{{ {PW} == 'guess' }}}}",
    f"userAgent={{{{ {PW} == accounts[0].fields.password }}}}",
    f"userAgent={{{{ 'p' in {PW} }}}}",
    f"userAgent={{{{ {PW} in ['guess'] }}}}",
    f"userAgent={{{{ {PW} > 'p' }}}}",
    f"userAgent={{{{ {PW} is eq 'guess' }}}}",
    f"userAgent={{{{ {PW} is lower }}}}",
    f"userAgent={{{{ {PW} }}}}",
    f"userAgent={{% for c in {PW} %}}{{{{ c }}}}{{% endfor %}}",
    f"userAgent={{% if {PW}|length > 8 %}}long{{% endif %}}",
    f"{{% set x = {PW} %}}userAgent={{{{ x.reveal() }}}}",
    f"{{% macro m(v) %}}{{{{ v.reveal() }}}}{{% endmacro %}}userAgent={{{{ m({PW}) }}}}",
    f"{{% set ns = namespace(v={PW}) %}}userAgent={{{{ ns.v|string }}}}",
    f"{{% filter reverse %}}password={{{{ {PW}|ini }}}}{{% endfilter %}}",
    f"userAgent={{{{ {PW}|attr('reveal') }}}}",
    f"userAgent={{{{ {PW}|ini|truncate(5) }}}}",
    f"userAgent={{{{ {PW}|ini|urlencode }}}}",
    f"userAgent={{{{ {PW}|ini|wordcount }}}}",
    "userAgent={% for a in accounts %}{{ loop.cycle(a.fields.password) }}{% endfor %}",
    f"{{% macro w(v) %}}{{{{ caller(v) }}}}{{% endmacro %}}"
    f"userAgent={{% call(x) w({PW}) %}}{{{{ x.reveal() }}}}{{% endcall %}}",
    f"{{{{ {PW}|ini }}}}=1",
    f"; {{{{ {PW}|ini }}}}",
    f"[{{{{ {PW}|ini }}}}]",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_template_cannot_get_a_password_out(tmp_path: Path, attack: str) -> None:
    result = _build(tmp_path, TEMPLATE_HEAD + attack + "\n" + TEMPLATE_ACCOUNT)
    _assert_nothing_leaked(result)
    [finding] = [f for f in result.findings if f.file == "ws1/u1/microsip.ini"]
    assert finding.code == "template", finding
    template = tmp_path / "inv" / "templates" / "microsip.ini.j2"
    assert finding.message.startswith(f"{template}:3: "), finding.message
    assert finding.source is not None and finding.source.line == 3
    assert not [f for f in result.files if f.target.kind == "microsip"]


def test_a_password_written_twice_or_into_another_account_is_refused(tmp_path: Path) -> None:
    twice = (
        TEMPLATE_HEAD + "{% set p = accounts[0].fields.password | ini %}\n"
        "[Account1]\ndomain=x.example.com\nusername=u\npassword={{ p }}\n"
        "[Account2]\ndomain=x.example.com\nusername=v\npassword={{ p }}\n"
    )
    result = _build(tmp_path / "a", twice)
    _assert_nothing_leaked(result)
    [finding] = [f for f in result.findings if f.file == "ws1/u1/microsip.ini"]
    assert finding.code == "template" and ":3: " in finding.message


@pytest.mark.parametrize(
    "template",
    [
        TEMPLATE_HEAD + TEMPLATE_ACCOUNT,
        TEMPLATE_HEAD + "[Account1]\ndomain=x.example.com\nusername=u\n"
        "{% set p = accounts[0].fields.password %}"
        "{% if p and p is not none %}PASSWORD = {{ p | ini }}{% endif %}\n",
        "{% macro secret(v) %}password={{ v | ini }}{% endmacro %}"
        + TEMPLATE_HEAD
        + "[Account1]\ndomain=x.example.com\nusername=u\n"
        "{{ secret(accounts[0].fields.password) }}\n",
        TEMPLATE_HEAD + "[Account1]\ndomain=x.example.com\nusername=u\n"
        "{% for key, value in accounts[0].fields.items() if key == 'password' %}"
        "{{ key }}={{ value | ini }}{% endfor %}\n",
    ],
)
def test_templates_write_passwords_whole_into_their_key(tmp_path: Path, template: str) -> None:
    result = _build(tmp_path, template)
    assert [f for f in result.findings if f.severity == "error"] == []
    [built] = [f for f in result.files if f.target.kind == "microsip"]
    assert built.data.decode("utf-16-le").count(PASSWORD) == 1
    assert built.document.get("Account1", "password") == PASSWORD


# --------------------------------------------------------------------------- messages (item 5)


def test_lint_never_quotes_a_line_that_holds_a_password(tmp_path: Path) -> None:
    # A template that writes a right guess of the password (or the inventory's text that
    # happens to equal it) into keys whose lint messages quote their value, as a key, and as
    # a section name: each line is a secret-misplaced error and no message quotes it.
    template = (
        TEMPLATE_HEAD
        + f"transport={PASSWORD}\n"  # bad-enum would quote it
        + f"{PASSWORD}=1\n"  # unknown-key would quote it
        + f"[{PASSWORD}]\nx=1\n"  # unknown-section would quote it
        + "[Account1]\ndomain=x.example.com\nusername=u\n"
        + f"registerRefresh={PASSWORD}\n"  # bad-int would quote it
        + "password={{ accounts[0].fields.password | ini }}\n"
    )
    result = _build(tmp_path, template)
    _assert_nothing_leaked(result)
    misplaced = sorted(
        (f.line, f.message.split(";")[0])
        for f in result.findings
        if f.file == "ws1/u1/microsip.ini" and f.code == "secret-misplaced"
    )
    assert misplaced == [
        (3, "[Settings] transport holds a password (or contains one)"),
        (4, "a key holds a password (or contains one)"),
        (5, "a section name holds a password (or contains one)"),
        (10, "[Account1] registerRefresh holds a password (or contains one)"),
    ]
    others = [
        f for f in result.findings if f.line in (3, 4, 5, 6, 10) and f.code != "secret-misplaced"
    ]
    assert others == []


def test_a_short_password_in_a_lint_message_is_not_quoted(tmp_path: Path) -> None:
    # A four-digit PIN equal to a value lint rejects: the line is the PIN, whole.
    key = recipients().active_key()
    token = vault.seal(Secret("7"), realm=REALM, path=POINTER, recipient=key)
    account = f"{{sip_uri: 1001@x.example.com, password: {token}}}"
    users = f"users:\n  u1:\n    accounts:\n      main: {account}\n"
    template = (
        TEMPLATE_HEAD + "autoAnswer=7\n"  # bad-enum: 'autoAnswer' must be one of ... not '7'
        "[Account1]\ndomain=x.example.com\nusername=u\n"
        "password={{ accounts[0].fields.password | ini }}\n"
    )
    files = {"users.yaml": users, "templates/microsip.ini.j2": template}
    _, result = build_files(tmp_path / "inv", files, opener_factory=real_opener)
    lines = [str(f) for f in result.findings]
    assert [f.code for f in result.findings] == ["secret-misplaced"], lines
    assert not any("'7'" in line for line in lines)


# --------------------------------------------------------------------------- budget (item 6)


def test_a_template_that_includes_itself_is_a_render_error(tmp_path: Path) -> None:
    result = _build(tmp_path, TEMPLATE_HEAD + "{% include 'microsip.ini.j2' %}\n")
    [finding] = [f for f in result.findings if f.file == "ws1/u1/microsip.ini"]
    assert finding.code == "template"
    assert "include or call each other without end" in finding.message


@pytest.mark.parametrize(
    "line",
    [
        "userAgent={{ " + "[" * 300 + "1" + "]" * 300 + " }}",
        "userAgent={{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
        "{% if 1 %}" * 3000 + "x" + "{% endif %}" * 3000,
    ],
)
def test_a_template_nested_too_deeply_is_a_template_error(tmp_path: Path, line: str) -> None:
    result = _build(tmp_path, TEMPLATE_HEAD + line + "\n" + TEMPLATE_ACCOUNT)
    [finding] = [f for f in result.findings if f.code == "template"]
    assert finding.message == "microsip.ini.j2: nested too deeply (while compiling it)"
    assert not [f for f in result.files if f.target.kind == "microsip"]


@pytest.mark.parametrize("expression", ["1 / 0", "10.0 ** 400", "'%d' % 'x'", "[1][5]"])
def test_arithmetic_and_lookup_errors_are_render_errors(tmp_path: Path, expression: str) -> None:
    result = _build(tmp_path, TEMPLATE_HEAD + f"userAgent={{{{ {expression} }}}}\n")
    [finding] = [f for f in result.findings if f.file == "ws1/u1/microsip.ini"]
    assert finding.code == "template" and ":3: " in finding.message


# Each runs in a child process under a memory limit: before the budget, these hung CI for
# hours or took all its memory.
HOSTILE_TEMPLATES = {
    "loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "output": "{% for i in range(100000) %}{{ 'x' * 99 }}\n{% endfor %}",
    "repeat": "{{ 'x' * 10 ** 10 }}",
    "power": "{{ 7 ** 123456789 }}",
    "center": "{{ 'x' | center(10 ** 10) }}",
    "method": "{{ 'x'.ljust(10 ** 10) }}",
    "percent": "{{ '%0999999999d' % 1 }}",
    "format": "{{ '{:>9999999999}'.format(1) }}",
    "replace": "{{ ('x' * 1000000).replace('x', 'y' * 1000) }}",
    "join": "{{ range(100000) | join('x' * 100000) }}",
    "double": "{% set ns = namespace(s='x') %}"
    "{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "sum": "{{ ([[0] * 1000000] * 1000) | sum(start=[]) | length }}",
    "macro": "{% macro m() %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "xxxxxxxxxx{% endfor %}{% endfor %}{% endmacro %}{{ m() }}",
    # Each comparison is one C call of seconds: the clock's signal is handled once, after it.
    "long-calls": "{% set a = [[0] * 1000000] * 2000 %}{% set b = [[0] * 1000000] * 2000 %}"
    "{% for i in range(6) %}{{ a == b }}{% endfor %}",
    # A list of a million references to a list of a million: one item each, 10**12 inside.
    "nested-repeat": "{{ [[0] * 1000000] * 1000000 == [[0] * 1000000] * 1000000 }}",
    # json's C encoder writes 3 GB without ever letting the clock look: there is no tojson.
    "tojson": "{{ ([[0] * 1000000] * 1000) | tojson }}",
    # The same with lists grown by a method or written out.
    "append-references": "{% set x = [0] * 1000000 %}{% set y = [0] * 1000000 %}"
    "{% set a = [] %}{% set b = [] %}"
    "{% for i in range(2000) %}{{ a.append(x) }}{{ b.append(y) }}{% endfor %}{{ a == b }}",
    "literal-references": "{% set x = [0] * 1000000 %}{% set y = [0] * 1000000 %}"
    "{{ [" + "x, " * 2000 + "] == [" + "y, " * 2000 + "] }}",
    # Python's sum() of 90,000 short lists copies the growing result each time, in one C call.
    "sum-lists": "{{ range(90000) | map('string') | map('list') | list | sum(start=[]) | length }}",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_a_render_stays_within_its_budget(tmp_path: Path, name: str) -> None:
    template = TEMPLATE_HEAD + "userAgent=" + HOSTILE_TEMPLATES[name] + "\n" + TEMPLATE_ACCOUNT
    root = write_inventory(tmp_path / "inv", {**BASE, "templates/microsip.ini.j2": template})
    result = run_limited("validate", "-i", str(root), "--format", "json", cwd=tmp_path)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    [finding] = [f for f in json.loads(result.stdout)["findings"] if f["code"] == "template"]
    path = root / "templates" / "microsip.ini.j2"
    assert finding["message"].startswith(f"{path}:3: "), finding["message"]
    expected = ("No filter named 'tojson'",) if name == "tojson" else ("budget", "more than")
    assert any(words in finding["message"] for words in expected), finding["message"]


# 100 macro calls deep, each holding a string of 4 MB: 400 MB if nothing stops it.
MEMORY_HOG = (
    "{% macro m(n) %}{% set s = '\U0001f600' * 1000000 %}{% if n %}{{ m(n - 1) }}{% endif %}"
    "{{ s | length }}{% endmacro %}{{ m(100) }}"
)


@pytest.mark.slow
def test_every_render_has_its_own_memory_budget(tmp_path: Path) -> None:
    # Measured against the process's peak, the first render to be stopped left the next ones
    # room up to that peak and 256 MiB more (five users took 1.8 GiB, each "over budget").
    names = [f"u{i}" for i in range(5)]
    users = "".join(
        f"  {name}:\n    accounts:\n      main: {{sip_uri: 1{i}@pbx.example.com, password: SEAL}}\n"
        for i, name in enumerate(names)
    )
    template = TEMPLATE_HEAD + "userAgent=" + MEMORY_HOG + "\n" + TEMPLATE_ACCOUNT
    files = {
        **BASE,
        "users.yaml": "users:\n" + users,
        "workstations.yaml": f"workstations:\n  ws1:\n    users: [{', '.join(names)}]\n",
        "templates/microsip.ini.j2": template,
    }
    root = write_inventory(tmp_path / "inv", files)
    result = run_limited("validate", "-i", str(root), "--format", "json", cwd=tmp_path)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    findings = [f for f in json.loads(result.stdout)["findings"] if f["code"] == "template"]
    assert sorted(f["file"] for f in findings) == [f"ws1/{name}/microsip.ini" for name in names]
    for finding in findings:
        assert "the template used more than 256 MiB of memory" in finding["message"]


def test_the_budget_holds_in_forked_workers_and_no_timer_outlives_a_build(
    tmp_path: Path,
) -> None:
    users = "".join(
        f"  u{i}:\n    accounts:\n      main: {{sip_uri: 100{i}@pbx.example.com, password: SEAL}}\n"
        for i in range(4)
    )
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    template = (
        TEMPLATE_HEAD + "{% if user.name == 'u3' %}" + endless + "{% endif %}\n" + TEMPLATE_ACCOUNT
    )
    files = {
        "users.yaml": "users:\n" + users,
        "workstations.yaml": "workstations:\n  ws1:\n    users: [u0, u1, u2, u3]\n",
        "templates/microsip.ini.j2": template,
    }
    budget = RenderBudget(seconds=0.3)
    _, result = build_files(tmp_path / "inv", files, workers=2, budget=budget)
    assert result.workers == 2  # u3 is rendered in the forked worker
    [finding] = result.findings
    assert finding.file == "ws1/u3/microsip.ini"
    assert "ran for more than 0.3 s of CPU time" in finding.message
    assert len(result.files) == 4  # the other users and the override
    # The timer renders leave running between files is stopped when the build ends: at exit,
    # Python gives SIGPROF back its default action, which ends the process.
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


# Every command imports yamldoc and the budget; a Windows controller has no ``resource``.
WITHOUT_RESOURCE = """\
import runpy, sys
sys.modules["resource"] = None  # import resource raises ImportError, as on Windows
from provisioner.render import budget
from provisioner.inventory import yamldoc
from provisioner.errors import InventoryError
print("composer-safe", yamldoc._COMPOSER_SAFE)
try:
    yamldoc.compose_tree("a: " + "[" * 2_000 + "]" * 2_000 + "\\n", "deep.yaml")
except InventoryError as exc:
    print(exc)
sys.argv = ["provisioner", *sys.argv[1:]]
runpy.run_module("provisioner.cli", run_name="__main__")
"""


@pytest.mark.slow
def test_without_the_resource_module_commands_run_and_the_cpu_budget_holds(
    tmp_path: Path,
) -> None:
    template = TEMPLATE_HEAD + "userAgent=" + HOSTILE_TEMPLATES["loop"] + "\n" + TEMPLATE_ACCOUNT
    root = write_inventory(tmp_path / "inv", {**BASE, "templates/microsip.ini.j2": template})
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_RESOURCE, "validate", "-i", str(root)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    assert lines[0] == "composer-safe 1000"
    assert lines[1].startswith("deep.yaml:1:") and "nested too deeply" in lines[1]
    path = root / "templates" / "microsip.ini.j2"
    assert f"{path}:3: the template ran for more than 1 s of CPU time" in result.stdout


def test_the_clock_charges_a_render_with_its_own_thread_s_cpu_time() -> None:
    # Threads hash (without the GIL) while the rendering thread sleeps: the timer ticks for
    # their CPU time, none of which is the render's.
    stop = threading.Event()

    def hash_until_stopped() -> None:
        data = bytes(1 << 20)
        while not stop.is_set():
            hashlib.sha256(data)

    workers = [threading.Thread(target=hash_until_stopped) for _ in range(2)]
    assert CLOCK.start(RenderBudget(seconds=0.3))
    try:
        for worker in workers:
            worker.start()
        started, deadline = time.process_time(), time.monotonic() + 30
        while time.process_time() - started < 1.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert time.process_time() - started >= 1.0  # the timer had reason to tick 20 times
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        stop_clock()


def test_the_expanded_size_counts_each_reference_and_stops_past_the_limit() -> None:
    inner = [0] * 1000
    assert expanded_size([inner, inner, "abc", 10**30], 10**6) == 2000 + 3 + 31
    assert expanded_size({"k": inner}, 10**6) == 1 + 1000
    assert expanded_size([[0] * 10] * 10**6, 100) == 101
    holds_itself: list[object] = []
    holds_itself.append(holds_itself)
    assert expanded_size(holds_itself, 100) == 1


def test_tuples_unpacked_in_a_loop_are_not_checked_as_values(tmp_path: Path) -> None:
    template = (
        TEMPLATE_HEAD + "userAgent={% for a, b in [(1, 'x'), (2, 'y')] %}{{ a }}{{ b }}"
        "{% endfor %}\n\n" + TEMPLATE_ACCOUNT  # the block's own line break is trimmed
    )
    result = _build(tmp_path, template)
    [built] = [f for f in result.files if f.target.kind == "microsip"]
    assert built.document.get("Settings", "userAgent") == "1x2y"
