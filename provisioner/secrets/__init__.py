"""Sealed secrets: the vault, the secret store, credential scopes."""
