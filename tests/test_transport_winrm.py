"""The WinRM transport against the lab: what one push costs on the wire, what pywinrm is handed."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests.utils

from provisioner.inventory.model import Secret
from provisioner.lab import Lab
from provisioner.lab.agent import LabAgent
from provisioner.lab.fleet import WorkstationSpec, add_workstation
from provisioner.lab.host import HostConfig, LabHost, Scheme
from provisioner.secrets.credscope import Scope
from provisioner.transport.agent import scripts
from provisioner.transport.agent.operations import INSPECT
from provisioner.transport.winrm import STDIN_CHUNK, WinrmOptions, WinrmTransport, stdin_pieces
from tests.labkit import INSPECT_NOTHING

LOOPBACK = Scope.build(["127.0.0.0/8"], "encrypted")


def test_ntlm_push_uses_one_connection(tmp_path: Path) -> None:
    with Lab(LabAgent(), folder=tmp_path) as lab:
        host, _ = add_workstation(
            lab, HostConfig(credentials={"svc": "Pw-1"}, port=0), WorkstationSpec()
        )
        options = WinrmOptions(host.address, "svc", Secret("Pw-1"), port=host.port, scope=LOOPBACK)
        transport = WinrmTransport("ws01", options)
        try:
            answer = transport.request(INSPECT_NOTHING)
        finally:
            transport.close()
        assert answer.users == () and answer.install.found
        stats = host.stats()
        assert stats.connections == 1
        assert stats.requests == 9
        assert stats.encrypted_requests == stats.encrypted_responses == 6
        assert host.open_shells == 0


def _ntlm_host(lab: Lab, user: str, password: str, scheme: Scheme = "http") -> LabHost:
    config = HostConfig(credentials={user: password}, port=0, scheme=scheme)
    host, _ = add_workstation(lab, config, WorkstationSpec())
    return host


def _transport(host: LabHost, user: str, password: str, **changes: Any) -> WinrmTransport:
    changes.setdefault("scope", LOOPBACK)
    options = WinrmOptions(host.address, user, Secret(password), port=host.port, **changes)
    return WinrmTransport(host.name, options)


def _inspect(transport: WinrmTransport) -> str:
    """One agent request; returns the password pywinrm was handed (read while connected)."""
    assert transport.request(INSPECT_NOTHING).install.found
    assert transport._protocol is not None
    password = transport._protocol.transport.password
    assert password is not None
    return password


def test_basic_gets_the_password(tmp_path: Path) -> None:
    with Lab(LabAgent(), folder=tmp_path) as lab:
        host = _ntlm_host(lab, "svc-basic", "Basic-Pw-1", scheme="https")
        transport = _transport(
            host,
            "svc-basic",
            "Basic-Pw-1",
            transport="basic",
            ca_trust_path=str(lab.ca_path),
            ca_trusted=True,  # as connections says of a CA file the scope pins
        )
        try:
            assert _inspect(transport) == "Basic-Pw-1"
        finally:
            transport.close()


def test_requests_reads_the_environment_once_per_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # a proxy that would refuse
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    entered: list[str] = []
    set_environ = requests.utils.set_environ

    @contextlib.contextmanager
    def counting(name: str, value: str | None) -> Iterator[None]:
        entered.append(name)
        with set_environ(name, value):
            yield

    monkeypatch.setattr(requests.utils, "set_environ", counting)
    with Lab(LabAgent(), folder=tmp_path) as lab:
        host = _ntlm_host(lab, "svc-env", "Env-Pw-1")
        transport = _transport(host, "svc-env", "Env-Pw-1")
        try:
            _inspect(transport)
            assert transport._protocol is not None
            session = transport._protocol.transport.session
            assert session is not None and session.trust_env is False
        finally:
            transport.close()
        assert host.stats().requests == 9
    # Inside pywinrm's build_session only (proxy=None): its environment merge and the blank
    # POST that starts NTLM; none of the 6 WS-Management requests that follow.
    assert entered == ["no_proxy", "no_proxy"]
    assert "no_proxy" not in os.environ


def test_https_keeps_the_ca_bundle_pywinrm_took_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Lab(LabAgent(), folder=tmp_path) as lab:
        host = _ntlm_host(lab, "svc-tls", "Tls-Pw-1", scheme="https")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(lab.ca_path))
        transport = _transport(
            host,
            "svc-tls",
            "Tls-Pw-1",
            scheme="https",
            ca_trust_path="legacy_requests",
            ca_trusted=True,
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # pywinrm's legacy notice
                _inspect(transport)
            assert transport._protocol is not None
            session = transport._protocol.transport.session
            assert session is not None
            assert (session.trust_env, session.verify) == (False, str(lab.ca_path))
        finally:
            transport.close()


def test_stdin_travels_in_sends_under_the_envelope_limit(tmp_path: Path) -> None:
    # A request of ~1.3 MB base64: one Send would exceed MaxEnvelopeSizekb (500) and fail
    # with HTTP 413 on every attempt, as on Windows.
    with Lab(LabAgent(), folder=tmp_path) as lab:
        host = _ntlm_host(lab, "svc", "Pw-1")
        transport = _transport(host, "svc", "Pw-1")
        request = dataclasses.replace(INSPECT_NOTHING, appdata_roots=("x" * 1_000_000,))
        try:
            assert transport.request(request).install.found
        finally:
            transport.close()
        sends = -(-len(scripts.make_envelope("inspect", INSPECT.wire(request))) // STDIN_CHUNK)
        assert sends > 1 and host.stats().by_operation.get("Send", 0) == sends


def test_stdin_pieces() -> None:
    assert list(stdin_pieces(b"", 4)) == [(b"", True)]
    assert list(stdin_pieces(b"abcd", 4)) == [(b"abcd", True)]
    assert list(stdin_pieces(b"abcdefghi", 4)) == [(b"abcd", False), (b"efgh", False), (b"i", True)]
