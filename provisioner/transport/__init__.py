"""Reaching workstations: the Transport protocol, the WinRM adapter and the agent scripts."""
