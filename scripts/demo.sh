#!/usr/bin/env bash
# Walk through a throwaway realm: create keys, set passwords as helpdesk, check as CI, verify
# as admin, rotate the key. Everything happens in a temporary folder that is removed at the end.
set -euo pipefail

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export XDG_CONFIG_HOME="$work/config"   # identity files go here, not into your real config
inv="$work/inventory"
mkdir -p "$inv/users"
umask 077
printf 'demo passphrase, never use it for real\n' > "$work/passphrase"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Admin creates the realm (recipients.yaml + a private identity file)"
provisioner keys init --realm demo-voip -i "$inv" --passphrase-file "$work/passphrase"

cat > "$inv/users/berlin.yaml" <<'YAML'
# Users of the Berlin office
users:
  alice:
    display_name: "Alice Müller"   # reception
    accounts:
      - sip_uri: 1001@pbx.example.com
        password:                  # helpdesk sets it
  bob:
    accounts:
      - {sip_uri: 1002@pbx.example.com, password: ~}
YAML

step "Helpdesk sets two passwords with the public key only (read from stdin here)"
printf 'Alice-SIP-2026!\n' | provisioner secrets set -i "$inv" --path /users/alice/accounts/0/password
printf 'Bob-SIP-2026!\n' | provisioner secrets set -i "$inv" --path /users/bob/accounts/0/password
step "The inventory file now holds tokens; comments and layout are untouched"
cat "$inv/users/berlin.yaml"

step "CI checks every token without any private key"
provisioner secrets lint -i "$inv"

step "Admin opens every token and checks the values (counts only, never a value)"
provisioner secrets verify -i "$inv" --passphrase-file "$work/passphrase"

step "A token copied to another user is caught by CI and fails to decrypt"
token="$(grep -o 'sipvault:[^ ,}]*' "$inv/users/berlin.yaml" | head -1)"
printf '  mallory:\n    accounts:\n      - password: %s\n' "$token" >> "$inv/users/berlin.yaml"
provisioner secrets lint -i "$inv" || echo "(lint exit status $?: as expected)"
sed -i '/mallory:/,$d' "$inv/users/berlin.yaml"

step "Key rotation: a new active key, re-seal everything, retire the old key"
provisioner keys rotate -i "$inv" --passphrase-file "$work/passphrase"
provisioner secrets rekey -i "$inv" --passphrase-file "$work/passphrase"
old="$(provisioner keys list -i "$inv" | awk '/decrypt-only/ {print $1}')"
provisioner keys retire "$old" -i "$inv"
provisioner keys list -i "$inv"
provisioner secrets verify -i "$inv" --passphrase-file "$work/passphrase"

step "Done: the temporary realm in $work is removed"
