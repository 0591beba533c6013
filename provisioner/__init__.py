"""microsip-provisioner: render and push MicroSIP configuration to Windows fleets."""

__version__ = "0.1.0"
