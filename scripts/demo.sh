#!/usr/bin/env bash
# The main job on the bundled example, end to end: CI checks, a lab of emulated Windows
# workstations, a rollout with a canary and batches, a second rollout that changes nothing,
# a helpdesk password change, then the lab is stopped. Works on a copy in build/demo.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
work=build/demo
rm -rf "$work" && mkdir -p "$work"
cp -r inventory "$work/inventory"
inv="$work/inventory"
key="$work/demo-only.sipid"
pass="$work/demo-only.passphrase"
# git keeps no file modes, and both files must be readable by their owner only
cp inventory/.demo-key/demo-only.sipid "$key" && chmod 600 "$key"
cp inventory/.demo-key/demo-only.passphrase "$pass" && chmod 600 "$pass"
keys=(--identity "$key" --passphrase-file "$pass")
# The demo's history stays with the demo (build/ is git-ignored), not in your own state folder.
export PROVISIONER_STATE="$work/state"

step "CI: every sealed password checked without any private key"
provisioner secrets lint -i "$inv"

step "CI: every profile rendered with placeholders and linted"
provisioner validate "$inv"

step "Where does alice's transport come from?"
provisioner explain alice transport -i "$inv" -w ber-ws-001

step "Start the lab: one emulated Windows workstation per inventory workstation"
provisioner lab up -i "$inv" --detach "${keys[@]}"
trap 'provisioner lab down -i "$inv" >/dev/null 2>&1 || true' EXIT
lab=(--lab "$inv/.lab.json")

step "Rollout: canary first, then batches of 50%, live progress"
provisioner rollout -i "$inv" "${keys[@]}" "${lab[@]}" --yes --canary 1 --batch 50% \
    --report-json "$work/run.json" --report-junit "$work/run.xml"

step "Run it again: every workstation is already up to date"
provisioner rollout -i "$inv" "${keys[@]}" "${lab[@]}" --yes --quiet

step "Helpdesk: alice gets a new SIP password (public key only), then her profile is pushed"
printf 'Alice-New-SIP-2026!\n' | provisioner user set-password alice -i "$inv" --stdin
provisioner user regenerate alice -i "$inv" "${keys[@]}" "${lab[@]}" --yes
provisioner user show alice -i "$inv"

step "History"
provisioner runs list -i "$inv"
provisioner audit -i "$inv" --user alice

step "Stop the lab"
provisioner lab down -i "$inv"
trap - EXIT
