"""MicroSIP's configuration: the INI model and codec, the key table, the lint."""
