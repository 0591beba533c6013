"""``doctor``: check every step between the controller and a workstation's MicroSIP files.

Each check says what it found and, when it fails, the fix to try. Checks stop at the first
failure of the network path (no point testing auth when the port is closed). The credential's
scope comes first: outside it, doctor opens no connection at all. Settings that push refuses
(``server_cert_validation: ignore``, ``message_encryption: never``, basic without TLS) are
reported, and doctor still connects with them when the scope allows it.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from provisioner.errors import AuthError, ProvisionerError, TransportError
from provisioner.inventory.resolve import StationPlan
from provisioner.render.build import BuiltFile
from provisioner.rollout.push import below_minimum, inspect_request, microsip_versions
from provisioner.transport.agent.messages import InspectReply
from provisioner.transport.base import Transport
from provisioner.transport.winrm import WinrmOptions, policy_problems, scope_problem

MIN_FREE_BYTES = 50 * 1024 * 1024
SETUP = "see docs/windows-setup.md"
REMOTESHELLS_NOT_ALLOWED = "2150859180"
"""The WS-Management fault of a shell refused by policy (ERROR_WSMAN_REMOTESHELLS_NOT_ALLOWED)."""
CONSTRAINED = "constrained-language:"
"""How the bootstrap's refusal to run outside FullLanguage mode begins."""
TOO_OLD = "powershell-version:"
"""How the bootstrap's refusal to run below PowerShell 5 begins."""

USER_FIXES = {
    "no-profile": "the user must log on once so that Windows creates the profile",
    "no-account": "check the user's windows account name",
    "unsafe-path": (
        "a junction, symbolic or hard link, or an AppData folder outside the user's profile is "
        "in the way: the agent will not write through it; look at the folder with the user"
    ),
    "redirected": "if that share is your Folder Redirection, allow it with microsip.appdata_roots",
    "mode-mismatch": (
        "MicroSIP decides installed or portable itself: set microsip.mode to what it decided, or "
        "fix the registry value or MSI install location it reads"
    ),
    "locked": "another program held the file or the user's registry hive: try again",
}


@dataclass(frozen=True)
class Check:
    """One doctor check: its name, whether it passed, what was seen and what to do.

    ``blocks_connecting``: when it fails, doctor goes no further towards the workstation.
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""
    blocks_connecting: bool = True
    warning: bool = False
    """Passed, but worth a look (shown as a warning, with its fix; not counted as failed)."""


def may_connect(checks: Sequence[Check]) -> bool:
    """True unless a check that blocks connecting failed."""
    return all(c.ok or not c.blocks_connecting for c in checks)


def before_connecting(host: str, options: WinrmOptions) -> tuple[list[Check], bool]:
    """The credential checks, then the network checks, and whether doctor may connect.

    Outside the credential's scope nothing is contacted, not even DNS or the port.
    """
    checks = credential_checks(host, options)
    if may_connect(checks):
        checks += network_checks(options)
    return checks, may_connect(checks)


def credential_checks(host: str, options: WinrmOptions) -> list[Check]:
    """The credential's scope (a failure stops doctor before any connection) and the settings
    push and rollout refuse."""
    problem = scope_problem(host, options)
    if problem is not None:
        return [
            Check(
                "scope",
                False,
                problem,
                "check the workstation's address and winrm options; if they are right, an "
                "admin seals the password again with a wider scope (docs/secrets.md)",
            )
        ]
    assert options.scope is not None  # noqa: S101 - scope_problem refuses a missing scope
    target = options.lab_for or options.address
    checks = [Check("scope", True, f"{target} is within {options.scope}")]
    problems = policy_problems(options)
    if problems:
        checks.append(
            Check(
                "winrm settings",
                False,
                "; ".join(problems),
                "push and rollout refuse these settings; doctor connects with them only to "
                f"diagnose; {SETUP}",
                blocks_connecting=False,
            )
        )
    return checks


def network_checks(options: WinrmOptions, timeout: float = 5.0) -> list[Check]:
    """DNS, TCP and (for https) TLS with certificate validation, to where a push connects."""
    checks: list[Check] = []
    host, port = options.connect_to
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = sorted({str(i[4][0]) for i in infos})
        checks.append(Check("dns", True, f"{host} -> {', '.join(addresses)}"))
    except socket.gaierror as exc:
        checks.append(
            Check(
                "dns",
                False,
                f"{host}: {exc.strerror}",
                "fix the name in DNS, or set the workstation's address to its IP",
            )
        )
        return checks
    try:
        with socket.create_connection((host, port), timeout=timeout):
            checks.append(Check("port", True, f"TCP {port} open"))
    except OSError as exc:
        checks.append(
            Check(
                "port",
                False,
                f"TCP {port}: {exc.strerror or exc}",
                f"is the WinRM listener on {port} and the firewall open? On the workstation run "
                f"'winrm quickconfig' (http) or create an HTTPS listener; {SETUP}",
            )
        )
        return checks
    if options.effective_scheme == "https":
        checks.append(_tls_check(options, host, port, timeout))
    return checks


def _tls_check(options: WinrmOptions, host: str, port: int, timeout: float) -> Check:
    context = ssl.create_default_context(cafile=options.ca_trust_path)
    if options.server_cert_validation == "ignore":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            cert: Any = tls.getpeercert() or {}
            expires = cert.get("notAfter", "?")
            return Check("tls", True, f"{tls.version()}, certificate valid until {expires}")
    except ssl.SSLCertVerificationError as exc:
        return Check(
            "tls",
            False,
            f"certificate rejected: {exc.verify_message}",
            "the listener's certificate must be issued by a CA in ca_trust_path and "
            f"name {host} (subject or SAN); {SETUP}",
        )
    except (ssl.SSLError, OSError) as exc:
        return Check(
            "tls",
            False,
            f"TLS handshake failed: {exc}",
            f"is port {port} an HTTPS listener? {SETUP}",
        )


# A workstation that let the account in but refused the agent: the text that tells, the check
# it fails, what that check says (None: the text after the marker), and how to fix it.
_REFUSALS: tuple[tuple[str, str, str | None, str], ...] = (
    (
        REMOTESHELLS_NOT_ALLOWED,
        "winrs",
        "remote shells are disabled on the workstation by policy",
        "enable Computer Configuration > Administrative Templates > Windows Components > "
        "Windows Remote Shell > Allow Remote Shell Access (AllowRemoteShellAccess=1)",
    ),
    (
        TOO_OLD,
        "powershell",
        None,
        "install Windows Management Framework 5.1 (Windows 7 SP1, 8.1, Server 2008 R2 SP1 to "
        "2012 R2; later Windows have it)",
    ),
    (
        CONSTRAINED,
        "powershell",
        None,
        "the agent needs FullLanguage mode: under WDAC (Device Guard) every unsigned command "
        "runs constrained, so exempt these workstations or the WinRM account from the policy; "
        "AppLocker's default rule lets Administrators run",
    ),
)


def _refusal_check(text: str) -> Check | None:
    """The failed check a known refusal of the agent's start stands for, if ``text`` is one."""
    for marker, name, said, fix in _REFUSALS:
        if marker in text:
            what = said if said is not None else text.split(marker, 1)[1].strip()
            return Check(name, False, what, f"{fix}; {SETUP}")
    return None


def remote_checks(
    station: StationPlan,
    files: Sequence[BuiltFile],
    transport: Transport,
    options: WinrmOptions,
) -> list[Check]:
    """Authentication, encryption, PowerShell, MicroSIP install, profiles and free disk."""
    checks: list[Check] = []
    try:
        answer = transport.request(inspect_request(station, files))
    except AuthError as exc:
        return [
            Check(
                "auth",
                False,
                str(exc),
                "check winrm.username and winrm.password; NTLM with a local account "
                "needs LocalAccountTokenFilterPolicy=1; basic needs Basic=true on the "
                f"service; {SETUP}",
            )
        ]
    except TransportError as exc:
        refusal = _refusal_check(str(exc))
        if refusal is not None:
            return [Check("auth", True, f"{options.transport} as {options.username}"), refusal]
        return [Check("auth", False, str(exc), f"run the checks above first; {SETUP}")]
    except ProvisionerError as exc:
        return [Check("agent", False, str(exc), "")]
    finally:
        transport.close()
    checks.append(Check("auth", True, f"{options.transport} as {options.username}"))
    encrypted = options.effective_scheme == "https" or (
        options.transport in ("ntlm", "kerberos", "credssp")
        and options.message_encryption != "never"
    )
    checks.append(
        Check(
            "encryption",
            encrypted,
            "TLS"
            if options.effective_scheme == "https"
            else "message encryption"
            if encrypted
            else "NONE: traffic and passwords in clear text",
            "" if encrypted else "use https, or ntlm/kerberos with message encryption",
        )
    )
    host = answer.host
    version = host.ps_version or "?"
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    checks.append(
        Check(
            "powershell",
            major_minor >= (5, 1),
            f"PowerShell {version}, {host.language_mode or 'FullLanguage'}",
            "install Windows Management Framework 5.1",
        )
    )
    install = answer.install
    if install.found:
        checks.append(
            Check(
                "microsip",
                True,
                f"{install.exe_path} (found by {install.source})",
            )
        )
    else:
        checks.append(
            Check(
                "microsip",
                False,
                f"not found in {station.install.install_dir}, nor by registry or MSI",
                "install MicroSIP, or set microsip.install_dir and microsip.exe",
            )
        )
    checks += _version_checks(station, answer)
    for user in answer.users:
        error = user.error
        if error:
            checks.append(
                Check(
                    f"profile {user.name}",
                    False,
                    f"{error.code}: {error.message}",
                    USER_FIXES.get(error.code, ""),
                )
            )
        else:
            # Which of MicroSIP's own rules decided where it reads its ini (settings.cpp).
            mode = f"{user.mode}, decided by {user.mode_rule}"
            checks.append(Check(f"profile {user.name}", True, f"{user.path} ({mode})"))
    free = host.free_bytes or 0
    checks.append(
        Check(
            "disk",
            free >= MIN_FREE_BYTES,
            f"{free / 1024 / 1024:,.0f} MiB free",
            "free some disk space on the system drive",
        )
    )
    return checks


def _version_checks(station: StationPlan, answer: InspectReply) -> list[Check]:
    """The file version of each MicroSIP exe found, against ``microsip.min_version``."""
    versions = microsip_versions(answer)
    if not versions:
        return []
    detail = f"MicroSIP {', '.join(versions)}"
    minimum = station.install.min_version
    warning = below_minimum(versions, minimum)
    if warning is not None:
        fix = f"update MicroSIP to {minimum} or later (microsip.min_version)"
        return [Check("version", True, warning, fix, warning=True)]
    if minimum is not None:
        detail += f" (microsip.min_version {minimum})"
    return [Check("version", True, detail)]
