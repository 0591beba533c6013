"""Phase 1: an inventory's targets rendered into the files they get."""
