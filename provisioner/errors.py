"""The exception tree of the provisioner: its root and the classes shared across modules.

The whole tree, with the classes that live beside the code raising them (such as
``state.StateLockedError`` or ``parallel.WorkerError``), is drawn in docs/architecture.md,
section "Errors"; tests/test_errors.py keeps the two in step. Code raises a leaf of the tree,
never the root itself.

Every message is meant for the user as is: it says where (file:line, path) and what to do.
No message ever contains a secret value. Each class's ``code`` is the short name a finding
carries for it (``validate``, ``secrets lint``). The command line maps the classes to exit
codes in one place (``cli/__init__.py``): 1 for every class but ``UsageError`` (2) and
``InternalError`` (70).
"""

from __future__ import annotations

from typing import ClassVar


class ProvisionerError(Exception):
    """Root of every error the provisioner raises on purpose."""

    code: ClassVar[str] = "error"


class InventoryError(ProvisionerError):
    """An inventory file is malformed or inconsistent."""

    code: ClassVar[str] = "inventory"

    def __init__(
        self, message: str, *, file: str = "", line: int = 0, column: int = 0, path: str = ""
    ) -> None:
        self.file = file
        self.line = line
        self.column = column
        self.path = path
        super().__init__(message)

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        prefix = f"{where}: " if where else ""
        at = f"{self.path}: " if self.path else ""
        return f"{prefix}{at}{self.args[0]}"


class ResolveError(ProvisionerError):
    """Values could not be resolved (conflicts, group cycles)."""

    code: ClassVar[str] = "resolve"


class VaultError(ProvisionerError):
    """A sealed value, key or identity problem. Never carries plaintext."""

    code: ClassVar[str] = "vault"


class TokenFormatError(VaultError):
    """A token is malformed; found without any key."""

    code: ClassVar[str] = "token-format"


class UnknownKeyError(VaultError):
    """The token's key id is not known, or no identity for it was given."""

    code: ClassVar[str] = "unknown-key"


class MissingIdentityError(UnknownKeyError):
    """The token's key id is in recipients.yaml, but no identity for it was given."""

    code: ClassVar[str] = "no-identity"


class RetiredKeyError(VaultError):
    """The token's key id is retired."""

    code: ClassVar[str] = "retired-key"


class PathMismatchError(VaultError):
    """The token's pathtag does not match the place where it stands."""

    code: ClassVar[str] = "path-mismatch"


class CannotDecryptError(VaultError):
    """Decryption failed after all structure checks; deliberately uninformative."""

    code: ClassVar[str] = "cannot-decrypt"


class PolicyViolationError(VaultError):
    """A plaintext value is not safe to write into microsip.ini."""

    code: ClassVar[str] = "policy"


class IdentityError(VaultError):
    """An identity file cannot be used."""

    code: ClassVar[str] = "identity"


class RecipientsError(VaultError):
    """recipients.yaml is malformed or inconsistent."""

    code: ClassVar[str] = "recipients"


class YamlEditError(ProvisionerError):
    """A YAML file cannot be patched in place without touching more than a token."""

    code: ClassVar[str] = "yaml-edit"


class RenderError(ProvisionerError):
    """A template failed for a target; ``file`` and ``line`` name the template line."""

    code: ClassVar[str] = "template"

    def __init__(self, message: str, *, file: str = "", line: int = 0) -> None:
        self.file = file
        self.line = line
        super().__init__(message)


class LintError(ProvisionerError):
    """Rendered output breaks MicroSIP rules."""

    code: ClassVar[str] = "encoding"


class KeyTableError(ProvisionerError):
    """The key table shipped with the provisioner (data/microsip_keys.toml) is malformed."""

    code: ClassVar[str] = "key-table"


class StateError(ProvisionerError):
    """The state directory cannot be used: unreadable, newer schema, unknown run."""

    code: ClassVar[str] = "state"


class TransportError(ProvisionerError):
    """A workstation could not be reached or answered with an error."""

    code: ClassVar[str] = "transport"
    retryable: bool = False

    def __init__(self, message: str, *, host: str = "") -> None:
        self.host = host
        super().__init__(message)


class ConnectError(TransportError):
    """The connection could not be made; worth retrying."""

    code: ClassVar[str] = "connect"
    retryable = True


class TransportTimeoutError(TransportError):
    """The workstation did not answer in time; worth retrying."""

    code: ClassVar[str] = "timeout"
    retryable = True


class AuthError(TransportError):
    """Credentials were rejected; fatal for that host."""

    code: ClassVar[str] = "auth"


class RemoteError(TransportError):
    """The agent reported an error; fatal for that host."""

    code: ClassVar[str] = "remote"


class CaFileError(ProvisionerError):
    """A CA certificate file (``winrm.ca_trust_path``, ``--ca``) cannot be read, or is too
    large to be one."""

    code: ClassVar[str] = "ca-file"


class LabError(ProvisionerError):
    """The lab cannot be started, reached, stopped or used as its lab file says."""

    code: ClassVar[str] = "lab"


class NotFoundError(ProvisionerError):
    """A user, workstation, account or key named on the command line is not in the inventory
    (or not where it was looked for)."""

    code: ClassVar[str] = "not-found"


class OptionError(ProvisionerError):
    """An option's value, or a combination of options, cannot be used; unlike
    :class:`UsageError`, the command line exits 1."""

    code: ClassVar[str] = "option"


class ConfirmationError(ProvisionerError):
    """A command that writes to workstations was not confirmed (no terminal to ask on and no
    ``--yes``); nothing was written."""

    code: ClassVar[str] = "not-confirmed"


class SavedNotPushedError(ProvisionerError):
    """A change was saved in the inventory, but pushing it right after failed; the message
    says why and how to push it later."""

    code: ClassVar[str] = "not-pushed"


class UsageError(ProvisionerError):
    """A command-line choice cannot be used as given (such as a state folder that git would
    commit); the command line exits 2, as for its other usage errors."""

    code: ClassVar[str] = "usage"


class InternalError(ProvisionerError):
    """Something that should never happen did (a worker process died without a result): the
    command line reports it as an internal error, exit 70, as for any bug."""

    code: ClassVar[str] = "internal"
