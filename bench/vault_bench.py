"""Benchmark of sipvault: identity unlock, seal and open rates, rekey of a large inventory.

Prints figures; asserts nothing. Run with ``make bench`` (or ``python bench/vault_bench.py``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

from provisioner.inventory import yamldoc
from provisioner.inventory.model import Secret
from provisioner.secrets import secretstore, vault

REALM = "bench-realm"


def _timed(fn: object, repeat: int = 5) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return times


def bench_unlock(identity: vault.Identity) -> None:
    for protection in ("argon2id", "scrypt"):
        if protection == "argon2id" and not vault.argon2id_available():
            print("unlock argon2id: unavailable in this cryptography build")
            continue
        text = vault.wrap_identity(identity, b"bench passphrase", protection=protection)  # type: ignore[arg-type]
        data = yamldoc.compose_text(text, "bench")  # parse check
        assert data.scalars
        import io

        from ruamel.yaml import YAML

        parsed = YAML(typ="safe").load(io.StringIO(text))
        times = _timed(lambda p=parsed: vault.unlock_identity(p, b"bench passphrase", source="b"))
        print(
            f"unlock {protection:8}: min {min(times) * 1000:6.1f} ms, "
            f"median {statistics.median(times) * 1000:6.1f} ms"
        )


def bench_seal_open(identity: vault.Identity, count: int) -> None:
    recipients = vault.new_recipients(REALM, identity.recipient())
    keyring = vault.Keyring(recipients, {identity.kid: identity})
    key = recipients.active_key()
    paths = [f"/users/u{i:06d}/accounts/0/password" for i in range(count)]
    start = time.perf_counter()
    tokens = [
        vault.seal(Secret(f"pw-{i}"), realm=REALM, path=p, recipient=key)
        for i, p in enumerate(paths)
    ]
    seal_s = time.perf_counter() - start
    start = time.perf_counter()
    for token, path in zip(tokens, paths, strict=True):
        keyring.open(token, path)
    open_s = time.perf_counter() - start
    print(f"seal {count} tokens: {seal_s:.2f} s ({count / seal_s:,.0f}/s)")
    print(f"open {count} tokens: {open_s:.2f} s ({count / open_s:,.0f}/s, parse + HPKE + unpad)")


def bench_rekey(count: int, files: int) -> None:
    old, new = vault.generate_identity(), vault.generate_identity()
    recipients = vault.new_recipients(REALM, old.recipient())
    key = recipients.active_key()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        per_file = count // files
        start = time.perf_counter()
        for f in range(files):
            lines = ["# generated for the rekey benchmark", "users:"]
            for i in range(f * per_file, (f + 1) * per_file):
                path = f"/users/u{i:06d}/accounts/0/password"
                token = vault.seal(Secret(f"pw-{i}"), realm=REALM, path=path, recipient=key)
                lines += [
                    f"  u{i:06d}:",
                    f'    display_name: "User {i}"',
                    "    accounts:",
                    f"      - sip_uri: {10000 + i}@pbx.example.com",
                    f"        password: {token}  # sealed",
                ]
            (root / f"users-{f:02d}.yaml").write_text("\n".join(lines) + "\n")
        print(f"generated {count} tokens in {files} files: {time.perf_counter() - start:.2f} s")
        rotated = recipients.with_key(new.recipient(), make_active=True)
        secretstore.write_recipients(root, rotated)
        keyring = vault.Keyring(rotated, {old.kid: old, new.kid: new})
        start = time.perf_counter()
        scan = secretstore.scan_inventory(root)
        scan_s = time.perf_counter() - start
        start = time.perf_counter()
        report = secretstore.rekey(scan, keyring, new.kid)
        rekey_s = time.perf_counter() - start
        start = time.perf_counter()
        for site in scan.tokens():
            secret = keyring.open(site.ref.value, site.pointer)
            vault.seal(secret, realm=REALM, path=site.pointer, recipient=rotated.active_key())
            keyring.open(site.ref.value, site.pointer)
        crypto_s = time.perf_counter() - start
        start = time.perf_counter()
        findings = secretstore.lint_secrets(secretstore.scan_inventory(root), rotated)
        lint_s = time.perf_counter() - start
        errors = [f for f in findings if f.severity == "error"]
        print(
            f"rekey {report.resealed} tokens: scan {scan_s:.2f} s + rekey {rekey_s:.2f} s "
            f"(of which crypto, measured alone: {crypto_s:.2f} s; the rest is YAML compose, "
            f"verify and atomic writes)"
        )
        print(f"key-less lint of {count} tokens: {lint_s:.2f} s, {len(errors)} errors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--rekey-tokens", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=10)
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.node()}")
    identity = vault.generate_identity()
    bench_unlock(identity)
    bench_seal_open(identity, args.tokens)
    bench_rekey(args.rekey_tokens, args.files)


if __name__ == "__main__":
    main()
