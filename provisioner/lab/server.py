"""The lab: a fleet of emulated WinRM hosts on loopback addresses, in one process.

Every host listens on its own address of 127.0.0.0/8 (from the lab's base address on: by
default 127.0.0.2, 127.0.0.3, ... then 127.0.1.1 and so on; Linux routes the whole block to
loopback) and port (5985 for http, 5986 for https, or an ephemeral one). All hosts share one
selector thread and two bounded worker pools (connections and command handlers), so a thousand
hosts cost a thousand listening sockets, not a thousand threads. ``stop()`` closes every
socket and joins every thread within its timeout.

Typical use::

    with Lab(handler) as lab:
        host = lab.add_host(HostConfig(credentials={"admin": "pw"}, scheme="https", port=0))
        winrm.protocol.Protocol(host.url, transport="basic", username="admin",
                                password="pw", ca_trust_path=str(lab.ca_path))
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import tempfile
import threading
from pathlib import Path
from types import TracebackType

from provisioner.lab import ntlmusers
from provisioner.lab.certs import CertAuthority
from provisioner.lab.handler import CommandHandler
from provisioner.lab.host import HostConfig, LabHost
from provisioner.lab.pool import WorkerPool
from provisioner.lab.reactor import Reactor

DEFAULT_BASE_ADDRESS = "127.0.0.2"
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_LAST = int(ipaddress.IPv4Address("127.255.255.254"))


class NoAddressLeft(RuntimeError):
    """Every loopback address from the lab's base address up to 127.255.255.254 is taken."""


def check_base_address(text: str) -> str:
    """``text`` as the first address of a lab; ValueError says why it cannot be one."""
    try:
        address = ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 address (like 127.0.0.2)") from None
    if address not in _LOOPBACK:
        raise ValueError(f"{address} is outside 127.0.0.0/8: the lab listens on loopback only")
    if int(address) > _LAST:
        raise ValueError(f"{address} is the loopback broadcast address")
    return str(address)


class Lab:
    """Starts, holds and stops emulated hosts that share ``handler``."""

    def __init__(
        self,
        handler: CommandHandler,
        *,
        folder: Path | None = None,
        workers: int = 64,
        handler_workers: int = 32,
        io_timeout: float = 30.0,
        idle_timeout: float = 120.0,
        base_address: str = DEFAULT_BASE_ADDRESS,
    ) -> None:
        """``base_address``: where the addresses the lab chooses for its hosts begin."""
        self._next = int(ipaddress.IPv4Address(check_base_address(base_address)))
        self._handler = handler
        self._own_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="microsip-lab-")) if folder is None else folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._handler_pool = WorkerPool(handler_workers, "lab-handler")
        self._reactor = Reactor(
            WorkerPool(workers, "lab-conn"), io_timeout=io_timeout, idle_timeout=idle_timeout
        )
        self._hosts: dict[str, LabHost] = {}
        self._addresses: set[str] = set()
        self._ca: CertAuthority | None = None
        self._ntlm_tokens: list[int] = []
        self._stopped = False

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def ca_path(self) -> Path:
        """The CA certificate (PEM) that signs every https host: pywinrm's ``ca_trust_path``."""
        with self._lock:
            return self._authority().ca_path

    @property
    def hosts(self) -> list[LabHost]:
        """Every host, in the order they were added."""
        with self._lock:
            return list(self._hosts.values())

    @property
    def connections(self) -> int:
        """Open client connections over all hosts."""
        return self._reactor.connections

    def host(self, name: str) -> LabHost:
        """The host called ``name``."""
        with self._lock:
            return self._hosts[name]

    def add_host(self, config: HostConfig) -> LabHost:
        """Start one host; empty ``name``/``address`` are filled in by the lab."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the lab is stopped")
            address = config.address or self._free_address()
            name = config.name or "lab-" + address.replace(".", "-")
            if name in self._hosts:
                raise ValueError(f"a lab host is already called {name!r}")
            config = dataclasses.replace(config, name=name, address=address)
            cert = self._authority().issue(name, address) if config.scheme == "https" else None
            token = ntlmusers.register(config.credentials) if "ntlm" in config.auth else None
            try:
                host = LabHost(
                    config,
                    reactor=self._reactor,
                    handler=self._handler,
                    handler_pool=self._handler_pool,
                    stopping=self._stopping,
                    cert=cert,
                )
            except BaseException:
                if token is not None:
                    ntlmusers.release(token)
                raise
            if token is not None:
                self._ntlm_tokens.append(token)
            self._hosts[name] = host
            self._addresses.add(address)
            return host

    def add_hosts(self, count: int, config: HostConfig) -> list[LabHost]:
        """Start ``count`` hosts like ``config``, each on the next free loopback address."""
        if config.name or config.address:
            raise ValueError("add_hosts chooses names and addresses; leave them empty")
        return [self.add_host(config) for _ in range(count)]

    def stop(self, timeout: float = 5.0) -> None:
        """Close every listener and connection, join every thread (bounded by ``timeout``).

        Raises RuntimeError if a thread is still alive afterwards (a handler that never
        returns); the sockets are closed anyway.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            tokens, self._ntlm_tokens = self._ntlm_tokens, []
        self._stopping.set()
        leaked = self._reactor.stop(timeout / 2)
        leaked += self._handler_pool.shutdown(timeout / 2)
        for token in tokens:
            ntlmusers.release(token)
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        if leaked:
            names = ", ".join(thread.name for thread in leaked)
            raise RuntimeError(f"lab threads still running after stop: {names}")

    def _authority(self) -> CertAuthority:
        if self._ca is None:
            self._ca = CertAuthority(self.folder / "tls")
        return self._ca

    def _free_address(self) -> str:
        while self._next <= _LAST:
            candidate = ipaddress.IPv4Address(self._next)
            self._next += 1
            address = str(candidate)
            if candidate.packed[3] not in (0, 255) and address not in self._addresses:
                return address
        raise NoAddressLeft(f"no loopback address is left after {ipaddress.IPv4Address(_LAST)}")
