"""Helpers for testing code that paymaster governs (not imported by paymaster itself)."""
