"""Allow ``python -m provisioner.cli`` (the engine package itself never imports the CLI)."""

from provisioner.cli import main

main()
