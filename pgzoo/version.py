"""pgzoo's version (the one in pyproject.toml); part of the cold-start cache key."""

__version__ = "0.1.0"
