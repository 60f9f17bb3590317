"""What a device's failure looks like to the server: a code, never the device's text (shared by
the ClientApp, the device worker and the SecAgg+ stage checks; Flower only)."""

from __future__ import annotations


class WorkerUnavailable(RuntimeError):
    """No worker answers at the configured socket (not started, stale, or wrong key)."""


class DeviceError(RuntimeError):
    """What the server learns of a failure on the device: a code, no text from the device.

    Flower sends the text of an exception the ClientApp raises back to the server; paths,
    file names and whether a file exists stay in the device's own log.
    """

    def __init__(self, code: str) -> None:
        super().__init__(f"device error: {code} (the reason is in the device's log)")
        self.code = code


def error_code(err: Exception) -> str:
    """The generic code of a failure (its class of cause, nothing of its text)."""
    if isinstance(err, DeviceError):
        return err.code
    if isinstance(err, WorkerUnavailable):
        return "worker-unavailable"
    if isinstance(err, (ValueError, KeyError, TypeError)):
        return "rejected-message"
    if isinstance(err, OSError):
        return "storage"
    return "internal"
