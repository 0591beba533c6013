"""The exception tree of the provisioner.

::

    ProvisionerError
    ├── InventoryError        file, line, column, key path
    ├── ResolveError          key, layers involved
    ├── VaultError            never carries plaintext
    │   ├── TokenFormatError      structure of a token (checked without any key)
    │   ├── UnknownKeyError       kid not in recipients.yaml
    │   │   └── MissingIdentityError  kid known, but no identity for it was given
    │   ├── RetiredKeyError       kid is retired
    │   ├── PathMismatchError     pathtag differs from the token's location
    │   ├── CannotDecryptError    uniform failure after the structure checks (no oracle)
    │   ├── PolicyViolationError  plaintext is not ini-safe
    │   ├── IdentityError         identity file unreadable, weakened, or wrong passphrase
    │   └── RecipientsError       recipients.yaml malformed
    ├── YamlEditError         a YAML file cannot be patched in place
    ├── RenderError           target, template, line, snippet
    ├── LintError             findings
    ├── StateError            the state folder: unreadable, newer schema, unknown run
    │   └── StateLockedError      another run holds the lock (state.py: who holds it)
    ├── TransportError        host
    └── UsageError            an option's value cannot be used as given (exit 2)

Every message is meant for the user as is: it says where (file:line, path) and what to do.
No message ever contains a secret value. Each class's ``code`` is the short name a finding
carries for it (``validate``, ``secrets lint``).
"""

from __future__ import annotations

from typing import ClassVar


class ProvisionerError(Exception):
    """Root of every error the provisioner raises on purpose."""

    code: ClassVar[str] = "error"


class InventoryError(ProvisionerError):
    """An inventory file is malformed or inconsistent."""

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


class RecipientsError(VaultError):
    """recipients.yaml is malformed or inconsistent."""


class YamlEditError(ProvisionerError):
    """A YAML file cannot be patched in place without touching more than a token."""


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


class StateError(ProvisionerError):
    """The state directory cannot be used: unreadable, newer schema, unknown run."""


class TransportError(ProvisionerError):
    """A workstation could not be reached or answered with an error."""

    retryable: bool = False

    def __init__(self, message: str, *, host: str = "") -> None:
        self.host = host
        super().__init__(message)


class ConnectError(TransportError):
    """The connection could not be made; worth retrying."""

    retryable = True


class TransportTimeoutError(TransportError):
    """The workstation did not answer in time; worth retrying."""

    retryable = True


class AuthError(TransportError):
    """Credentials were rejected; fatal for that host."""


class RemoteError(TransportError):
    """The agent reported an error; fatal for that host."""


class UsageError(ProvisionerError):
    """A command-line choice cannot be used as given (such as a state folder that git would
    commit); the command line exits 2, as for its other usage errors."""
