"""(filled by its feature)."""
