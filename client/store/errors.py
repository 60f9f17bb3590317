"""What the device store raises."""

from __future__ import annotations


class StoreError(Exception):
    """The device store cannot be used as asked."""


class StoreCorrupted(StoreError):
    """The database failed its integrity check (tampering, or a damaged disk)."""


class StoreNotFound(StoreError):
    """There is no store in this data dir (never created, or forgotten)."""
