"""Differential privacy: update clipping, Gaussian noise and accountants (Opacus-backed).

Opacus calls ``logging.basicConfig`` on import, which adds a root handler and makes every
Flower log line print twice; importing it here, once, undoes that.
"""

import logging as _logging

_root = _logging.getLogger()
_handlers = list(_root.handlers)
import opacus  # noqa: E402,F401  (the import whose side effect is undone below)

for _handler in _root.handlers[:]:
    if _handler not in _handlers:
        _root.removeHandler(_handler)
