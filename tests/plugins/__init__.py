"""Test-only plugin sources: copied into a temporary distribution by tests/test_registry.py."""
