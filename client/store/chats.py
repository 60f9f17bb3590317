"""The web app's conversations, kept in the device's encrypted store.

The web app (``client/api/web/``) shows the user's chats; it keeps them here, through the API
(``GET``/``PUT /v1/chats``), never in the browser's own storage — so the store's encryption
covers them, the retention purge drops their old turns with the rest of the history, and
``forget`` erases them with the store. A chat list is JSON::

    {"active": "<chat id>" | null,
     "chats": [{"id": str, "title": str, "created": <ms>, "messages": [{"role", "content",
                "ts": <ms>, …}, …]}, …]}

Only its shape is checked (the page's own fields ride along); times are the page's
milliseconds since the epoch.
"""

from __future__ import annotations

from typing import Any

CHATS_BLOB = "webapp_chats"
EMPTY: dict[str, Any] = {"active": None, "chats": []}


def check_chats(value: Any) -> dict[str, Any]:
    """``value`` if it is a chat list (see the module docstring).

    Raises:
        ValueError: What is wrong with it.
    """
    if not isinstance(value, dict) or set(value) != {"active", "chats"}:
        raise ValueError('a chat list is {"active": …, "chats": […]} and nothing else')
    if value["active"] is not None and not isinstance(value["active"], str):
        raise ValueError("`active` is a chat id or null")
    if not isinstance(value["chats"], list):
        raise ValueError("`chats` is a list")
    for chat in value["chats"]:
        if not isinstance(chat, dict) or not isinstance(chat.get("id"), str):
            raise ValueError("each chat is an object with a string `id`")
        messages = chat.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError(f"chat {chat['id']!r}: `messages` is a list of objects with text")
    return value


def without_older(chats: dict[str, Any], cutoff_s: float) -> tuple[dict[str, Any], int]:
    """``chats`` without the turns from before ``cutoff_s`` (seconds; a turn without its
    own time has its chat's), and without chats left empty; and how many turns went."""
    cutoff_ms = cutoff_s * 1000.0
    kept, removed = [], 0
    for chat in chats.get("chats", []):
        created = chat.get("created", 0)
        messages = [
            m for m in chat.get("messages", []) if float(m.get("ts", created) or 0) >= cutoff_ms
        ]
        removed += len(chat.get("messages", [])) - len(messages)
        if messages or float(created or 0) >= cutoff_ms:
            kept.append({**chat, "messages": messages})
    active = chats.get("active")
    if active not in {c["id"] for c in kept}:
        active = None
    return {"active": active, "chats": kept}, removed
