"""Opacus, imported without its logging side effect.

Opacus calls ``logging.basicConfig`` on import, which adds a root handler and makes every
Flower log line print twice. Every module that uses Opacus imports this one first; it imports
Opacus once and takes the handler away again.
"""

import logging as _logging

_root = _logging.getLogger()
_handlers = list(_root.handlers)
import opacus  # noqa: E402,F401  (the import whose side effect is undone below)

for _handler in _root.handlers[:]:
    if _handler not in _handlers:
        _root.removeHandler(_handler)
