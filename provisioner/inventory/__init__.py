"""The inventory: YAML with positions, the schema, the model, the loader, resolution."""
