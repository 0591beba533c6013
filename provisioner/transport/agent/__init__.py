"""The fixed PowerShell scripts sent to workstations (see docs/agent-protocol.md)."""
