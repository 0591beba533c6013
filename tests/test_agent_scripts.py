"""The PowerShell agent scripts, checked without Windows (docs/agent-protocol.md).

No PowerShell runs here, so the checks are static: every script parses with
tree-sitter-powershell (with negative controls proving the checker bites), avoids PowerShell 7
syntax and the one-line ``switch`` form the grammar misreads, calls only functions it defines or
known Windows PowerShell 5.1 cmdlets, reads only variables it assigns, and names every field
the contract gives for its answer. The Python side (envelope, answer, CLIXML) is tested for real.

Golden copies: ``tests/golden/agent/`` holds the exact text sent for each op, the bootstrap and
the bootstrap command line, so that any change to what reaches a workstation is deliberate.
After an intended change, refresh them and review the diff::

    UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_agent_scripts.py
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import tree_sitter
import tree_sitter_powershell

from provisioner.errors import RemoteError
from provisioner.transport.agent import scripts
from provisioner.transport.agent.operations import REGISTRY
from tests.agentkit import contract_json_blocks, json_keys

AGENT = Path(scripts.__file__).parent
GOLDEN = Path(__file__).parent / "golden" / "agent"
CONTRACT = Path(__file__).parent.parent / "docs" / "agent-protocol.md"
PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))

SOURCE_FILES = sorted(path.name for path in AGENT.glob("*.ps1"))
# Every text checked: the files as written and the scripts as sent.
TEXTS = {name: (AGENT / name).read_text(encoding="utf-8") for name in SOURCE_FILES} | {
    f"sent:{op}": text for op, text in scripts.SCRIPTS.items()
}


def _nodes(node: tree_sitter.Node) -> Iterator[tree_sitter.Node]:
    yield node
    for child in node.children:
        yield from _nodes(child)


def _syntax_errors(source: str) -> list[str]:
    """Empty when tree-sitter-powershell parses the source cleanly."""
    data = source.encode("utf-8")
    tree = PARSER.parse(data)
    found = [
        f"{node.type} at {node.start_point.row + 1}:{node.start_point.column + 1}: "
        f"{data[node.start_byte : node.end_byte][:60]!r}"
        for node in _nodes(tree.root_node)
        if node.type == "ERROR" or node.is_missing
    ]
    if tree.root_node.has_error and not found:
        # The grammar sometimes flags an error without a node to point at.
        found.append("has_error without an ERROR or MISSING node")
    return found


def _code_only(source: str) -> str:
    """The source with comments blanked (same length), so prose cannot trip the regexes."""
    data = bytearray(source.encode("utf-8"))
    for node in _nodes(PARSER.parse(bytes(data)).root_node):
        if node.type == "comment":
            data[node.start_byte : node.end_byte] = b" " * (node.end_byte - node.start_byte)
    return data.decode("utf-8")


def _texts_of(source: str, node_type: str) -> list[str]:
    data = source.encode("utf-8")
    return [
        data[node.start_byte : node.end_byte].decode("utf-8")
        for node in _nodes(PARSER.parse(data).root_node)
        if node.type == node_type
    ]


# --- the scripts exist and parse ------------------------------------------------------------


def _contract() -> str:
    return CONTRACT.read_text(encoding="utf-8")


def test_every_op_of_the_contract_has_a_script() -> None:
    ops = set(re.findall(r"^## ([a-z]+)$", _contract(), re.MULTILINE))
    assert ops == set(REGISTRY.names) == set(scripts.SCRIPTS)
    for op in REGISTRY:
        assert (AGENT / op.script).is_file()


def test_what_is_sent_is_the_common_helpers_then_the_op_script() -> None:
    common = (AGENT / "common.ps1").read_text(encoding="utf-8")
    for op in REGISTRY:
        assert scripts.SCRIPTS[op.name] == common + (AGENT / op.script).read_text(encoding="utf-8")
    assert (AGENT / "bootstrap.ps1").read_text(encoding="utf-8") == scripts.BOOTSTRAP


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_script_parses_cleanly(name: str) -> None:
    assert _syntax_errors(TEXTS[name]) == []


@pytest.mark.parametrize(
    "broken",
    [
        "function F {\n    if ($a) { 'x'\n}\n",  # unclosed brace
        "$a = 'unterminated\n",
        "$h = @{ a = 1\n",
        "$x = (1 + 2\n",
        "$a =\n",
        "try { $a = [IO.File]::ReadAllBytes($p }\n",
        "switch ($x) { 1 {'a'} 2 {'b'} }\n",  # valid PowerShell the grammar rejects
    ],
)
def test_the_syntax_check_catches_broken_scripts(broken: str) -> None:
    assert _syntax_errors(broken) != []


def test_the_syntax_check_accepts_what_the_scripts_rely_on() -> None:
    sample = (
        "switch ($x) {\n    1 { 'a' }\n    2 { 'b' }\n}\n"
        "$r = [System.Security.AccessControl.FileSystemAccessRule]::new(\n    $a,\n    $b)\n"
        "try { $null = 1 } catch [System.IO.IOException] { throw } finally { }\n"
        "$x = $h.Count -band 0xFFFF\n"
    )
    assert _syntax_errors(sample) == []


# --- Windows PowerShell 5.1 only ------------------------------------------------------------

ONE_LINE_SWITCH = re.compile(r"\bswitch\b[^\n]*\{[^\n]*\}", re.IGNORECASE)
PS7_ONLY = {
    "null-coalescing ??": re.compile(r"\?\?"),
    "null-conditional ?. or ?[": re.compile(r"\?\.|\}\?\[|\w\?\["),
    "ternary ? :": re.compile(r"\s\?\s[^\n]*\s:\s"),
    "pipeline chain &&": re.compile(r"&&"),
    "pipeline chain ||": re.compile(r"\|\|"),
    "-AsHashtable": re.compile(r"-AsHashtable\b", re.IGNORECASE),
    "ForEach-Object -Parallel": re.compile(r"-Parallel\b", re.IGNORECASE),
    "ConvertFrom-Json -Depth": re.compile(r"ConvertFrom-Json\b[^\n]*-Depth\b", re.IGNORECASE),
    "ConvertTo-Json -AsArray": re.compile(r"-AsArray\b", re.IGNORECASE),
    "clean block": re.compile(r"^\s*clean\s*\{", re.IGNORECASE | re.MULTILINE),
}


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_no_one_line_switch(name: str) -> None:
    assert ONE_LINE_SWITCH.findall(_code_only(TEXTS[name])) == []


def test_the_one_line_switch_check_bites() -> None:
    assert ONE_LINE_SWITCH.search("switch ($x) { 1 {'a'} 2 {'b'} }")
    assert not ONE_LINE_SWITCH.search("switch ($x) {\n    1 { 'a' }\n}")


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_no_powershell_7_only_syntax(name: str) -> None:
    code = _code_only(TEXTS[name])
    found = {label: rx.findall(code) for label, rx in PS7_ONLY.items() if rx.search(code)}
    assert found == {}


@pytest.mark.parametrize(
    ("label", "snippet"),
    [
        ("null-coalescing ??", "$a = $b ?? 'x'"),
        ("null-conditional ?. or ?[", "${a}?.Length"),
        ("null-conditional ?. or ?[", "$a?[0]"),
        ("ternary ? :", "$a = $ok ? 'yes' : 'no'"),
        ("pipeline chain &&", "Get-Item x && Remove-Item x"),
        ("pipeline chain ||", "Get-Item x || exit 1"),
        ("-AsHashtable", "$j | ConvertFrom-Json -AsHashtable"),
        ("ForEach-Object -Parallel", "1..3 | ForEach-Object -Parallel { $_ }"),
        ("ConvertFrom-Json -Depth", "$j | ConvertFrom-Json -Depth 5"),
        ("ConvertTo-Json -AsArray", "ConvertTo-Json -AsArray $a"),
    ],
)
def test_the_powershell_7_check_bites(label: str, snippet: str) -> None:
    assert PS7_ONLY[label].search(_code_only(snippet))


@pytest.mark.parametrize("name", SOURCE_FILES)
def test_scripts_are_ascii_with_lf_line_ends(name: str) -> None:
    data = (AGENT / name).read_bytes()
    assert data.isascii(), "non-ASCII text would depend on encodings along the way"
    assert b"\r" not in data
    assert data.endswith(b"\n")


@pytest.mark.parametrize("op", REGISTRY.names)
def test_agent_scripts_write_nothing_but_their_answer(op: str) -> None:
    # The console host writes these straight to stdout, which must carry base64 only.
    code = _code_only(scripts.SCRIPTS[op])
    for forbidden in ("Write-Host", "Write-Warning", "Write-Information", "Out-Host", "[Console]"):
        assert forbidden.lower() not in code.lower(), forbidden


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_null_is_on_the_left_of_comparisons(name: str) -> None:
    # $array -eq $null filters the array instead of testing it.
    assert re.findall(r"-(?:eq|ne)\s+\$null\b", _code_only(TEXTS[name]), re.IGNORECASE) == []


@pytest.mark.parametrize("op", REGISTRY.names)
def test_agent_scripts_run_in_strict_mode_and_stop_on_errors(op: str) -> None:
    code = _code_only(scripts.SCRIPTS[op])
    assert "Set-StrictMode -Version 2" in code
    assert "$ErrorActionPreference = 'Stop'" in code
    assert "$Request = $args[0]" in code


def test_bootstrap_sets_its_preferences() -> None:
    code = _code_only(scripts.BOOTSTRAP)
    for line in (
        "$ErrorActionPreference = 'Stop'",
        "$ProgressPreference = 'SilentlyContinue'",
        "[Console]::In.ReadToEnd()",
        "-Compress -Depth 10",
        "[Console]::Out.Write(",
        "[Console]::Error.WriteLine(",
        "exit 1",
    ):
        assert line in code, line


# Windows PowerShell 5.1 cmdlets the scripts may call; anything else must be defined in them.
KNOWN_CMDLETS = {
    "add-type",
    "convertfrom-json",
    "convertto-json",
    "get-ciminstance",
    "get-childitem",
    "get-item",
    "get-process",
    "invoke-cimmethod",
    "set-strictmode",
    "start-sleep",
    "stop-process",
    "test-path",
}


@pytest.mark.parametrize("name", ["bootstrap.ps1", *(f"sent:{op}" for op in REGISTRY.names)])
def test_every_command_is_defined_or_a_known_cmdlet(name: str) -> None:
    source = TEXTS[name]
    defined = {function.lower() for function in _texts_of(source, "function_name")}
    called = {command.lower() for command in _texts_of(source, "command_name")}
    assert called - defined - KNOWN_CMDLETS == set()


def _called(source: str) -> set[str]:
    return {command.lower() for command in _texts_of(source, "command_name")}


def test_every_helper_is_used() -> None:
    for op in REGISTRY.names:
        own = {f.lower() for f in _texts_of(TEXTS[f"{op}.ps1"], "function_name")}
        assert own - _called(scripts.SCRIPTS[op]) == set(), op
    # The shared ones by at least one op (inspect carries the writing helpers it never calls).
    shared = {f.lower() for f in _texts_of(TEXTS["common.ps1"], "function_name")}
    used = set().union(*(_called(text) for text in scripts.SCRIPTS.values()))
    assert shared - used == set()


AUTOMATIC = {
    "_",
    "args",
    "null",
    "true",
    "false",
    "psversiontable",
    "executioncontext",
    "lastexitcode",
}


def _assigned(source: str) -> set[str]:
    names: set[str] = set()
    data = source.encode("utf-8")
    for node in _nodes(PARSER.parse(data).root_node):
        if node.type in ("left_assignment_expression", "script_parameter"):
            names.update(_texts_of(data[node.start_byte : node.end_byte].decode(), "variable"))
        elif node.type == "foreach_statement":
            first = next(child for child in node.children if child.type == "variable")
            names.add(data[first.start_byte : first.end_byte].decode())
    return {name.lower() for name in names}


def _scopes(source: str) -> dict[str, str]:
    """Each function's text, and the top level with the functions blanked out."""
    data = source.encode("utf-8")
    top = bytearray(data)
    scopes: dict[str, str] = {}
    for node in _nodes(PARSER.parse(data).root_node):
        if node.type == "function_statement":
            name = next(child for child in node.children if child.type == "function_name")
            text = data[node.start_byte : node.end_byte]
            scopes[data[name.start_byte : name.end_byte].decode()] = text.decode()
            top[node.start_byte : node.end_byte] = b" " * len(text)
    scopes["(top level)"] = top.decode()
    return scopes


def _unassigned(source: str) -> set[str]:
    used = {
        variable.lower()
        for variable in _texts_of(source, "variable")
        if ":" not in variable  # $env:X and scoped names
    }
    return used - _assigned(source) - {f"${name}" for name in AUTOMATIC}


@pytest.mark.parametrize("name", ["bootstrap.ps1", *(f"sent:{op}" for op in REGISTRY.names)])
def test_every_variable_read_is_assigned_in_its_own_scope(name: str) -> None:
    # A typo in a variable name is $null in PowerShell, and a function silently reads a
    # variable of its caller when it has none of that name: neither is caught by strict mode
    # version 2 unless that very line runs with the name unset anywhere.
    found = {scope: _unassigned(text) for scope, text in _scopes(TEXTS[name]).items()}
    assert {scope: names for scope, names in found.items() if names} == {}


def test_the_variable_check_bites() -> None:
    source = "function F([string]$Name) { $value = $Name + $x }\n$x = F 'a'\n$y = $vlaue\n"
    found = {scope: _unassigned(text) for scope, text in _scopes(source).items()}
    assert found == {"F": {"$x"}, "(top level)": {"$vlaue"}}


def test_format_operator_is_never_split_by_a_method_call_comma() -> None:
    # Method('{0} {1}' -f $a, $b) passes two arguments; the -f needs its own parentheses.
    for op, text in scripts.SCRIPTS.items():
        assert not re.search(r"::\w+\('[^']*'\s+-f\s", _code_only(text)), op
        assert not re.search(r"\.\w+\('[^']*'\s+-f\s", _code_only(text)), op
    assert not re.search(r"\w\('[^']*'\s+-f\s", _code_only(scripts.BOOTSTRAP))


# --- the fields of the contract ------------------------------------------------------------


def _fields() -> dict[str, tuple[set[str], set[str]]]:
    """op -> (answer fields and values the script must write, request fields it must read)."""
    blocks = contract_json_blocks()
    assert set(blocks) == {
        "inspect request",
        "inspect answer",
        "apply request",
        "apply answer",
        "rollback answer",
    }
    inspect_answer = json_keys(blocks["inspect answer"])
    apply_answer = json_keys(blocks["apply answer"])
    rollback_answer = json_keys(blocks["rollback answer"])
    # The agent has no use for the user's inventory name in apply; the controller keeps it.
    apply_request = json_keys(blocks["apply request"]) - {"user"}
    rollback_request = {"op", "protocol", "if_running", "files", "kind", "sid", "path", "process"}
    io_codes = {"locked", "read-only", "disk-full", "internal"}
    return {
        "inspect": (
            inspect_answer
            | {"no-profile", "no-account", "not-installed", "inventory", "registry"}
            | {"msi"}
            | io_codes,
            json_keys(blocks["inspect request"]),
        ),
        "apply": (
            apply_answer | {"written", "busy", "conflict", "error", "verify-failed"} | io_codes,
            apply_request,
        ),
        "rollback": (
            rollback_answer
            | {"restored", "removed", "unchanged", "busy", "error", "no-backup", "unsafe-path"}
            | io_codes,
            rollback_request,
        ),
    }


@pytest.mark.parametrize("op", REGISTRY.names)
def test_every_field_the_contract_names_is_in_the_script(op: str) -> None:
    answer, request = _fields()[op]
    code = _code_only(scripts.SCRIPTS[op])
    missing = sorted(
        field
        for field in answer | request
        if not re.search(rf"(?<![\w-]){re.escape(field)}(?![\w-])", code)
    )
    assert missing == []


def test_the_state_folder_layout_is_the_contracts() -> None:
    sent = scripts.SCRIPTS
    for op in REGISTRY.names:
        assert "'MicroSIP-provisioner'" in sent[op] and "'CommonApplicationData'" in sent[op]
        assert "'users', $Sid, $Name" in sent[op] and "'machine', $Name" in sent[op]
    items = ("'applied'", "'backup.1'", '"backup.$n"', "'rolled-back'", "'.provisioner'")
    for name in (*items, "'history'", "'created'", "'replaced'"):
        assert name in sent["apply"] + sent["rollback"], name
    for sid in ("'S-1-5-18'", "'S-1-5-32-544'", "'S-1-5-32-545'"):
        assert sid in sent["apply"]
    assert "SetAccessRuleProtection($true, $false)" in sent["apply"]
    assert "[IO.File]::Replace($Temp, $Path, $old)" in sent["apply"]
    assert "[IO.File]::Move(" in sent["apply"]


def _body(op: str, function: str) -> str:
    code = _code_only(scripts.SCRIPTS[op])
    start = code.index(f"function {function}")
    following = code.find("\nfunction ", start + 1)
    return code[start : following if following > 0 else len(code)]


def test_nothing_is_touched_before_the_path_is_checked_for_links() -> None:
    # The order the contract gives (docs/agent-protocol.md, apply steps 1-6).
    prelude = _body("apply", "Initialize-ManagedFile")
    order = [
        "Assert-OwnPath $path $Checked.sid",
        "Lock-Folders $path $start $null",
        "Open-StateFolder $state",
        "Restore-Interrupted $Checked $state",
        "Remove-StaleFiles ([IO.Path]::GetDirectoryName($path))",
        "Move-LegacyState $path $start $state",
        "Remove-StaleFiles $state $item",
        "Resolve-PendingBackup $state $path",
        "[IO.FileAttributes]::ReadOnly",
    ]
    assert [prelude.index(step) for step in order] == sorted(prelude.index(s) for s in order)
    # Lock-Folders checks the path before it takes a lock, and again with every lock held,
    # then reads each lock back through its path.
    lock = _body("apply", "Lock-Folders")
    checks = [m.start() for m in re.finditer(re.escape("Assert-SafePath $Path $Start"), lock)]
    taken = lock.index("[IO.FileOptions]::DeleteOnClose")
    assert len(checks) == 2 and checks[0] < taken < checks[1] < lock.index("$lock.nonce")
    # The cleanup pattern must match what New-TempPath creates, and nothing wider.
    code = _code_only(scripts.SCRIPTS["apply"])
    [digits] = re.findall(r"ToString\('N'\)\.Substring\(0, (\d+)\)", code)
    assert "('.{0}.{1}.{2}' -f $Name, $random, $Suffix)" in code
    [pattern] = re.findall(r"\$pattern = '\^\\\.' \+ \[regex\]::Escape\(\$Name\) \+ '(.*)'", code)
    assert pattern == rf"\.[0-9a-f]{{{digits}}}\.(' + $alternatives + ')$"


def test_no_dotnet_string_parameter_is_handed_a_literal_null() -> None:
    # PowerShell turns $null into '' for a .NET string parameter (File.Replace then refuses
    # its backup name): a real null is [NullString]::Value.
    for name in SOURCE_FILES:
        code = _code_only((AGENT / name).read_text(encoding="utf-8"))
        assert not re.search(r"::\w+\([^()]*\$null", code), name


def test_the_link_checks_read_no_swallowing_property() -> None:
    # Get-Item's LinkType swallows a failure to open the file and says "plain file".
    for name in SOURCE_FILES:
        assert ".LinkType" not in _code_only((AGENT / name).read_text(encoding="utf-8")), name


def test_microsip_is_stopped_only_once_the_file_will_be_written() -> None:
    outer = _body("apply", "Invoke-ApplyFile")
    assert outer.index("Initialize-ManagedFile") < outer.index("Invoke-PreparedApply")
    assert outer.index("Invoke-PreparedApply") < outer.index("Unlock-Folders $prepared.locks")
    apply = _body("apply", "Invoke-PreparedApply")
    assert (
        apply.index("'conflict'")
        < apply.index("Invoke-RunningPolicy")
        < apply.index("Write-ManagedFile")
    )
    restore = _body("rollback", "Invoke-PreparedRestore")
    assert restore.index("'no-backup'") < restore.index("Invoke-RunningPolicy")
    assert restore.index("$Write.before") < restore.index("Invoke-RunningPolicy")
    # A file the user put in place of the created one is refused before MicroSIP is stopped,
    # and checked again through the handle its content is read with before it goes.
    removal = _body("rollback", "Invoke-PreparedRemoval")
    checks = [m.start() for m in re.finditer(re.escape("Read-OwnFile $path"), removal)]
    assert len(checks) == 2
    assert checks[0] < removal.index("Invoke-RunningPolicy") < checks[1]
    assert checks[1] < removal.index("Assert-SafePath $path") < removal.index("[IO.File]::Delete")
    owned = _body("rollback", "Read-OwnFile")
    assert owned.index("Open-PlainFile") < owned.index("GetOwner(") < owned.index("Read-Stream")


def test_the_final_acl_is_set_before_the_replace_and_checked_after() -> None:
    write = _body("apply", "Write-ManagedFile")
    first = write.index("$held.SetAccessControl($acl)")
    assert first < write.index("Invoke-ReplaceFile $temp $path") < write.index("GetAccessControl()")
    assert "Write-NewFile $temp $Content $acl" in write


def test_a_users_file_is_changed_and_read_only_through_a_handle() -> None:
    # By name, a swapped name would redirect an ACL change or a read; through a handle held
    # without sharing delete, after the name was checked, it cannot.
    for name in SOURCE_FILES:
        code = _code_only((AGENT / name).read_text(encoding="utf-8"))
        assert "[IO.File]::SetAccessControl" not in code, name
        assert "[IO.File]::GetAccessControl" not in code, name
        # Only the agent's own state files (SYSTEM and Administrators) are read by name.
        for argument in re.findall(r"\[IO\.File\]::ReadAllBytes\((\$\w+)\)", code):
            assert argument in {"$path", "$pending", "$Backup", "$backup1"}, (name, argument)
    assert "[IO.File]::ReadAllBytes($path)" in _body("apply", "Read-StateFile")


def test_backups_rotate_only_after_the_verify() -> None:
    body = _body("apply", "Invoke-PreparedApply")
    pending = body.index("Write-StateFile $state 'backup.new' $old")
    write = body.index("Write-ManagedFile $Checked $Content $backup")
    verify = body.index("'verify-failed'")
    rotations = [m.start() for m in re.finditer(r"Move-BackupsDown \$state", body)]
    assert len(rotations) == 1 and pending < write < verify < rotations[0]
    assert "Move-BackupsUp" not in body
    # A backup.new left by an agent that died is settled first.
    assert "Resolve-PendingBackup $state $path" in _body("apply", "Initialize-ManagedFile")


def _caseless_history_comparisons(code: str) -> list[str]:
    """Comparisons of a run, an action or a hash with PowerShell's case-insensitive operators."""
    operand = re.compile(r"(?i)(\.run|\$run|\.action|\$action|\.before|\$before|\$fields\[)\b")
    found = []
    for match in re.finditer(
        r"(\S+)\s+-(?:i)?(eq|ne|match|notmatch|contains|notcontains)\s+(\S+)", code, re.IGNORECASE
    ):
        left, right = match.group(1), match.group(3)
        if left.lower().lstrip("(") != "$null" and (operand.search(left) or operand.search(right)):
            found.append(match.group(0))
    return found


@pytest.mark.parametrize("op", ["apply", "rollback"])
def test_runs_actions_and_hashes_of_the_history_compare_case_sensitively(op: str) -> None:
    # The lab compares them as Python does; -eq, -match and -contains ignore case (and -match's
    # [A-Za-z] then takes the Kelvin sign for a k). "Created" or "RUN-A" is another value.
    assert _caseless_history_comparisons(_code_only(scripts.SCRIPTS[op])) == []


def test_the_case_check_bites() -> None:
    assert _caseless_history_comparisons("if ($write.run -ne $Run) { }") != []
    assert _caseless_history_comparisons("if (@('a') -notcontains $fields[2]) { }") != []
    assert _caseless_history_comparisons("if ($run -notmatch '^x$') { }") != []
    assert _caseless_history_comparisons("if ($null -eq $write -or $write.run -cne $Run) { }") == []


def test_history_ticks_are_ascii_digits_that_fit_a_long() -> None:
    # TryParse's default also takes a sign and spaces (the lab: [0-9]+, at most long.MaxValue).
    body = _body("apply", "ConvertFrom-WriteHistory")
    assert (
        "[long]::TryParse($fields[0], [Globalization.NumberStyles]::None, "
        "[Globalization.CultureInfo]::InvariantCulture, [ref]$ticks)"
    ) in body
    assert "$fields[1] -cnotmatch '^[0-9A-Za-z_-]{1,64}\\z'" in body


def test_no_state_file_is_read_before_its_folders_owners_are_checked() -> None:
    # Every read of the state (a rollback's history, inspect's merge base, a backup) goes
    # through Read-StateFile, which checks the folders' owners first.
    body = _body("rollback", "Read-StateFile")
    assert body.index("Assert-StateOwned $Folder") < body.index("ReadAllBytes")
    assert "Read-StateFile $State 'history'" in _body("rollback", "Get-WriteHistory")
    assert "Assert-StateOwned $Folder" in _body("apply", "Open-StateFolder")


def test_a_file_a_user_made_starts_its_history_anew() -> None:
    # The lab's is_user_made: owned by anybody but SYSTEM, Administrators or the agent.
    body = _body("apply", "Invoke-PreparedApply")
    assert body.index("Test-UserMade $path") < body.index("Write-StateFile $state 'backup.new'")
    assert "Add-WriteRecord $state $Run $current $path $userMade" in body
    assert "-not $UserMade" in _body("apply", "Add-WriteRecord")


# --- the bootstrap command line ------------------------------------------------------------


def test_bootstrap_command_line_is_well_under_the_cmd_limit() -> None:
    command, arguments = scripts.bootstrap_command()
    assert command == "powershell.exe"
    assert arguments[:-1] == [
        "-NoLogo",
        "-NoProfile",
        "-NonInteractive",
        "-ExecutionPolicy",
        "Bypass",
        "-EncodedCommand",
    ]
    encoded = arguments[-1]
    assert base64.b64decode(encoded).decode("utf-16-le") == scripts.BOOTSTRAP
    assert len(encoded) < 3500
    assert len(scripts.command_line()) < scripts.CMD_LINE_LIMIT
    assert scripts.command_line() == " ".join([command, *arguments])


def test_the_request_reaches_no_cmdlet_module_logging_would_record() -> None:
    # Module Logging (event 4103) writes cmdlet parameters to the event log: the request, which
    # carries SIP passwords, must only pass through method calls.
    code = _code_only(scripts.BOOTSTRAP)
    assert "ConvertFrom-Json" not in code and "$parser.DeserializeObject(" in code
    assert "$parser.MaxJsonLength = [int]::MaxValue" in code


# --- golden copies -------------------------------------------------------------------------


def _golden_files() -> dict[str, bytes]:
    files = {f"{op}.ps1": text.encode("utf-8") for op, text in scripts.SCRIPTS.items()}
    files["bootstrap.ps1"] = scripts.BOOTSTRAP.encode("utf-8")
    files["bootstrap_command.txt"] = scripts.command_line().encode("ascii")
    return files


def test_golden_copies_match_byte_for_byte() -> None:
    expected = _golden_files()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name, data in expected.items():
            (GOLDEN / name).write_bytes(data)
    present = {path.name for path in GOLDEN.iterdir()} if GOLDEN.is_dir() else set()
    assert present == set(expected), "refresh with UPDATE_GOLDEN=1 (see the module docstring)"
    changed = [name for name, data in expected.items() if (GOLDEN / name).read_bytes() != data]
    assert changed == [], "refresh with UPDATE_GOLDEN=1 after reviewing the change"


def test_scripts_load_from_the_file_when_package_data_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unavailable(package: str) -> object:
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(scripts.resources, "files", unavailable)
    assert scripts._read_script("apply.ps1") == (AGENT / "apply.ps1").read_text(encoding="utf-8")


# --- envelope and answer -------------------------------------------------------------------


def test_envelope_round_trip_carries_the_exact_script() -> None:
    request = {
        "op": "apply",
        "protocol": 1,
        "if_running": "skip",
        "files": [
            {"kind": "microsip", "path": "C:\\Users\\zoë\\AppData\\Roaming\\MicroSIP\\x.ini"}
        ],
    }
    envelope = scripts.make_envelope("apply", request)
    assert envelope.isascii()
    decoded = json.loads(base64.b64decode(envelope, validate=True).decode("utf-8"))
    assert decoded == {"script": scripts.SCRIPTS["apply"], "request": request}


def test_envelope_refuses_an_unknown_or_mismatched_op() -> None:
    with pytest.raises(ValueError, match="unknown agent op"):
        scripts.make_envelope("format-disk", {"op": "format-disk", "protocol": 1})
    with pytest.raises(ValueError, match="'rollback'"):
        scripts.make_envelope("apply", {"op": "rollback", "protocol": 1})


def _answer_bytes(answer: object) -> bytes:
    # What the bootstrap writes: ConvertTo-Json -Compress, UTF-8, base64, no newline.
    return base64.b64encode(json.dumps(answer, separators=(",", ":")).encode("utf-8"))


def test_parse_answer_decodes_the_bootstrap_output() -> None:
    answer = {"protocol": 1, "op": "inspect", "ok": True, "users": [{"name": "zoë"}]}
    assert scripts.parse_answer(_answer_bytes(answer)) == answer
    # Trailing newline, wrapped base64 or a byte order mark do not matter.
    wrapped = _answer_bytes(answer)
    assert (
        scripts.parse_answer(b"\xef\xbb\xbf" + wrapped[:10] + b"\r\n" + wrapped[10:] + b"\r\n")
        == answer
    )


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        (b"", "no answer"),
        (b"   \r\n", "no answer"),
        (b"WARNING: something\r\n", "not base64"),
        (b"abc", "not base64"),
        (base64.b64encode(b"\xff\xfe{"), "not UTF-8 JSON"),
        (base64.b64encode(b"{not json"), "not UTF-8 JSON"),
        (base64.b64encode(b"[1, 2]"), "JSON list, not an object"),
        (base64.b64encode(b'{"protocol": 2, "ok": true}'), "protocol 2"),
    ],
)
def test_parse_answer_raises_remote_error_on_garbage(stdout: bytes, message: str) -> None:
    with pytest.raises(RemoteError, match=message) as info:
        scripts.parse_answer(stdout, host="ber-ws-001")
    assert info.value.host == "ber-ws-001"


def test_parse_answer_never_quotes_stdout() -> None:
    secret = b"password=Hunter2"
    with pytest.raises(RemoteError) as info:
        scripts.parse_answer(base64.b64encode(secret))
    assert "Hunter2" not in str(info.value)


# --- CLIXML on stderr ----------------------------------------------------------------------

# Captured from Windows (as recorded in pywinrm's tests/test_session.py): progress records for
# module loading, then one error record split into one string per line.
CAPTURED_WINDOWS = (
    b'#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/200'
    b'4/04"><Obj S="progress" RefId="0"><TN RefId="0"><T>System.Management.Automation.PSCus'
    b'tomObject</T><T>System.Object</T></TN><MS><I64 N="SourceId">1</I64><PR '
    b'N="Record"><AV>Preparing modules for first use.</AV><AI>0</AI><Nil /><PI>'
    b"-1</PI><PC>-1</PC><T>Completed</T><SR>-1</SR><SD> </SD></PR></MS></Obj>"
    b'<Obj S="progress" RefId="1"><TNRef RefId="0" /><MS><I64 N="SourceId">1</I64>'
    b'<PR N="Record"><AV>Preparing modules for first use.</AV><AI>0</AI><Nil '
    b"/><PI>-1</PI><PC>-1</PC><T>Completed</T><SR>-1</SR><SD> </SD></PR></MS>"
    b"</Obj><S S=\"Error\">fake : The term 'fake' is not recognized as the name "
    b"of a cmdlet, function, script file, or operable program. Check _x000D__x000A_</S>"
    b'<S S="Error">the spelling of the name, or if a path was included, verify '
    b'that the path is correct and try again._x000D__x000A_</S><S S="Error">'
    b'At line:1 char:1_x000D__x000A_</S><S S="Error">+ fake cmdlet_x000D__x000A_</S>'
    b'<S S="Error">+ ~~~~_x000D__x000A_</S><S S="Error">    + CategoryInfo  '
    b"        : ObjectNotFound: (fake:String) [], CommandNotFoundException_x000D__x000A_</S"
    b'><S S="Error">    + FullyQualifiedErrorId : CommandNotFoundException_x000D__x000A_</S'
    b'><S S="Error"> _x000D__x000A_</S></Objs>'
)


def test_decode_clixml_of_a_stream_captured_on_windows() -> None:
    assert scripts.decode_clixml(CAPTURED_WINDOWS) == (
        "fake : The term 'fake' is not recognized as the name of a cmdlet, function, script file,"
        " or operable program. Check \nthe spelling of the name, or if a path was included, verify"
        " that the path is correct and try again.\nAt line:1 char:1\n+ fake cmdlet\n+ ~~~~\n"
        "    + CategoryInfo          : ObjectNotFound: (fake:String) [], CommandNotFoundException\n"
        "    + FullyQualifiedErrorId : CommandNotFoundException"
    )


@pytest.mark.parametrize(
    ("stderr", "text"),
    [
        (
            b'#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/'
            b'2004/04"><S S="Error">Cannot find path \'C:\\x\' because it does not exist.'
            b"_x000D__x000A_</S></Objs>",
            "Cannot find path 'C:\\x' because it does not exist.",
        ),
        # Plain text (what the bootstrap itself writes) passes through.
        (b"Access to the path is denied. (line 12)\r\n", "Access to the path is denied. (line 12)"),
        # Progress only: nothing to say.
        (CAPTURED_WINDOWS.split(b"<S S=")[0] + b"</Objs>", ""),
        # Two blocks after a repeated header.
        (
            b'#< CLIXML\r\n#< CLIXML\r\n<Objs Version="1.1.0.1"><S S="Error">Error 1</S></Objs>'
            b'<Objs Version="1.1.0.1"><S S="Warning">ignored</S><S S="Error">Error 2</S></Objs>',
            "Error 1\nError 2",
        ),
        # XML entities, then PowerShell's own escapes, a surrogate pair and an escaped "_x".
        (
            b'#< CLIXML\r\n<Objs><S S="Error">a &lt;b&gt; &amp; &quot;c&quot; _x0009_tab '
            b"_xD83C__xDFB5_ _x005F_x000A_ _x005f_</S></Objs>",
            'a <b> & "c" \ttab \U0001f3b5 _x000A_ _',
        ),
        # Numeric references, one out of Unicode's range (kept as written).
        (b'#< CLIXML\r\n<Objs><S S="Error">&#65;&#x42; &#x110000;</S></Objs>', "AB &#x110000;"),
        # Text around the CLIXML is kept.
        (
            b'before\r\n#< CLIXML\r\n<Objs><S S="Error">inside</S></Objs>\r\nafter',
            "before\ninside\nafter",
        ),
        # A UTF-8 message (the shell runs with code page 65001).
        (
            '#< CLIXML\r\n<Objs><S S="Error">Zugriff verweigert: Müller</S></Objs>'.encode(),
            "Zugriff verweigert: Müller",
        ),
    ],
)
def test_decode_clixml(stderr: bytes, text: str) -> None:
    assert scripts.decode_clixml(stderr) == text
