#!/usr/bin/env bash
# The main job on the bundled example: validate the inventory as CI does (no private key),
# then render every profile with the demo key into build/ and show a summary.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
key=inventory/.demo-key/demo-only.sipid
chmod 600 "$key"    # git does not keep file modes; identities must be private

step "CI: check every sealed password without any private key"
provisioner secrets lint -i inventory

step "CI: validate every template and profile, with placeholders instead of passwords"
provisioner validate inventory

step "Where does alice's transport come from?"
provisioner explain alice transport -i inventory -w ber-ws-001

step "Admin: render every profile with the (demo) key into build/"
provisioner render inventory --out build \
    --identity "$key" --passphrase-file inventory/.demo-key/demo-only.passphrase

step "One of the files, as MicroSIP will read it (UTF-16LE with BOM, CRLF; password masked here)"
python - <<'PY'
data = open("build/ber-ws-001/alice/microsip.ini", "rb").read()
crlf = data.count(bytes([13, 0, 10, 0]))
print(f"first bytes {data[:2].hex(' ')} (UTF-16LE BOM), {crlf} CRLF line ends")
for line in data[2:].decode("utf-16-le").splitlines()[:24]:
    print("password=********" if line.startswith("password=") else line)
PY
