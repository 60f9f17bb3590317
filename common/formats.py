"""The user-writing formats a device imports, parsed into ``(request, reply)`` pairs.

``text``  Plain text or Markdown: each paragraph is a reply, the paragraph (or heading) before
          it the request it follows — the way a Shakespeare role answers the speech before.
          Paragraphs longer than :data:`MAX_REPLY_CHARS` are cut at sentence ends.
``chat``  JSON Lines of conversations in the OpenAI ``messages`` shape (the fine-tuning
          format): every assistant message with content is a reply to the user message before
          it (``"weight": 0`` marks one to skip); text content parts are joined.
``mbox``  A mailbox of sent mail: each message's own text (quotes, the "On … wrote:" line and
          the signature removed) is a reply to the text it quotes, else to its subject.

Pure parsing, nothing stored: a device stores what these return through
:mod:`client.store.ingest`; a simulation reads a per-user corpus with them (:mod:`common.corpus`).
A file that cannot be read as what it claims to be raises :class:`BadImport` with the reason.

(One file on purpose, over the usual length: the three formats share the splitting and the
size and encoding checks.)
"""

from __future__ import annotations

import email
import email.policy
import html.parser
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("text", "chat", "mbox")
DEFAULT_MAX_BYTES = 20 * 2**20
MAX_REPLY_CHARS = 2000
MAX_REQUEST_CHARS = 1000
_SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".markdown": "text",
    ".jsonl": "chat",
    ".ndjson": "chat",
    ".mbox": "mbox",
    ".mbx": "mbox",
}
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
_HEADING = re.compile(r"^#{1,6}\s+(.*)$")
_ATTRIBUTION = re.compile(r"^(On .+|Le .+|Am .+|El .+)\b(wrote|écrit|schrieb|escribió)\s*:\s*$")

Pair = tuple[str, str]


class BadImport(ValueError):
    """A file that cannot be imported; the message says which and why."""


@dataclass(frozen=True)
class Parsed:
    """One file, parsed: its format and its examples."""

    path: Path
    fmt: str
    pairs: tuple[Pair, ...]

    @property
    def source(self) -> str:
        """The examples' source in the store (the file name is not kept)."""
        return f"import:{self.fmt}"


# ---- reading files ------------------------------------------------------------------------


def detect_format(path: Path, head: str) -> str:
    """The format of ``path``: from its suffix, else from its first line."""
    fmt = _SUFFIXES.get(Path(path).suffix.lower())
    if fmt:
        return fmt
    first = head.lstrip()
    if head.startswith("From "):
        return "mbox"
    if first.startswith("{"):
        return "chat"
    return "text"


def read_file(path: Path, *, fmt: str = "auto", max_bytes: int = DEFAULT_MAX_BYTES) -> Parsed:
    """Parse one file into examples (nothing is stored here).

    Args:
        path: The file.
        fmt: ``auto`` (by suffix, else content), ``text``, ``chat`` or ``mbox``.
        max_bytes: Files larger than this are refused before they are read.

    Raises:
        BadImport: Missing, too large, binary or not UTF-8, malformed for its format, or
            holding no example.
    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise BadImport(f"unknown format {fmt!r}; choose auto, {', '.join(FORMATS)}")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise BadImport(f"{path} is not a regular file")
        if size > max_bytes:
            raise BadImport(
                f"{path} is {size:,} bytes, over the {max_bytes:,}-byte limit; split it or "
                "raise --max-bytes"
            )
        data = path.read_bytes()
    except OSError as err:
        raise BadImport(f"cannot read {path}: {err.strerror or err}") from None
    if b"\x00" in data:
        raise BadImport(f"{path} looks binary (it holds NUL bytes); import text, JSONL or mbox")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadImport(
            f"{path} is not UTF-8 text (invalid byte at offset {err.start}); convert it first, "
            f"e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`"
        ) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    kind = detect_format(path, text[:200]) if fmt == "auto" else fmt
    parse = {"text": parse_text, "chat": parse_chat, "mbox": parse_mbox}[kind]
    try:
        pairs = parse(text)
    except BadImport as err:
        raise BadImport(f"{path} ({kind}): {err}") from None
    if not pairs:
        raise BadImport(f"{path} ({kind}) holds no example to learn from")
    return Parsed(path, kind, tuple(pairs))


# ---- formats --------------------------------------------------------------------------------


def _chunks(text: str, limit: int = MAX_REPLY_CHARS) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at sentence ends if possible."""
    if len(text) <= limit:
        return [text]
    out: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(text):
        while len(sentence) > limit:  # one endless sentence: cut it hard
            if current:
                out.append(current)
                current = ""
            out.append(sentence[:limit])
            sentence = sentence[limit:]
        if current and len(current) + 1 + len(sentence) > limit:
            out.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    if current:
        out.append(current)
    return out


def _tail(text: str, limit: int = MAX_REQUEST_CHARS) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def parse_text(text: str) -> list[Pair]:
    """Paragraphs as replies to the paragraph or heading before them."""
    pairs: list[Pair] = []
    before = ""
    for block in re.split(r"\n\s*\n", text):
        lines = [line.rstrip() for line in block.strip("\n").split("\n")]
        if not any(lines):
            continue
        heading = _HEADING.match(lines[0].strip())
        if heading and len(lines) == 1:
            before = heading.group(1).strip()
            continue
        if heading:  # a heading with its paragraph in one block
            before, lines = heading.group(1).strip(), lines[1:]
        paragraph = "\n".join(lines).strip()
        if not paragraph:
            continue
        for piece in _chunks(paragraph):
            pairs.append((_tail(before) if before else "Write the opening passage.", piece))
            before = piece
    return pairs


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a content array."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or "type" not in part:
                raise BadImport(f"{where}: a content part must be an object with a type")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise BadImport(f"{where}: a text part needs a string `text`")
                parts.append(part["text"])
        return "\n".join(parts)
    raise BadImport(f"{where}: `content` must be a string or a list of parts")


def pairs_from_conversation(messages: Any, where: str = "conversation") -> list[Pair]:
    """The (request, reply) pairs of one OpenAI-style ``messages`` list.

    Raises:
        BadImport: If the list or a message does not have the OpenAI shape.
    """
    if not isinstance(messages, list) or not messages:
        raise BadImport(f"{where}: `messages` must be a non-empty list")
    pairs: list[Pair] = []
    request: str | None = None
    for i, message in enumerate(messages):
        at = f"{where}, message {i + 1}"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadImport(f"{at}: each message must be an object with a string `role`")
        role = message["role"]
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise BadImport(f"{at}: unknown role {role!r}")
        text = _content(message.get("content"), at).strip()
        if role == "user":
            request = text
        elif role == "assistant" and text and request is not None and message.get("weight", 1) != 0:
            for piece in _chunks(text):
                pairs.append((_tail(request), piece))
                request = piece
    return pairs


def parse_chat(text: str) -> list[Pair]:
    """Conversations, one JSON object with ``messages`` per line."""
    pairs: list[Pair] = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadImport(f"line {n} is not JSON ({err.msg})") from None
        if not isinstance(record, dict) or "messages" not in record:
            raise BadImport(f"line {n}: expected an object with `messages`, the OpenAI shape")
        pairs += pairs_from_conversation(record["messages"], f"line {n}")
    return pairs


class _TextOnly(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _body(message: email.message.EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    try:
        content = part.get_content()
    except (LookupError, ValueError):  # unknown charset or broken encoding: skip the message
        return ""
    if part.get_content_type() == "text/html":
        parser = _TextOnly()
        parser.feed(content)
        content = "".join(parser.parts)
    return str(content)


def _own_text(body: str) -> tuple[str, str]:
    """Split a mail body into what its author wrote and the text it quotes."""
    own: list[str] = []
    quoted: list[str] = []
    for line in body.replace("\r\n", "\n").split("\n"):
        if line.rstrip() == "--":  # "-- " starts the signature
            break
        if line.startswith(">"):
            quoted.append(line.lstrip(">").strip())
        else:
            own.append(line.rstrip())
    while own and (not own[-1].strip() or _ATTRIBUTION.match(own[-1].strip())):
        own.pop()
    return "\n".join(own).strip(), "\n".join(q for q in quoted if q).strip()


def _mbox_messages(text: str) -> Iterable[str]:
    current: list[str] = []
    for line in text.split("\n"):
        if line.startswith("From "):  # mboxrd: a body line "From " is escaped as ">From "
            if current:
                yield "\n".join(current)
            current = []
            continue
        current.append(line[1:] if line.startswith(">From ") else line)
    if current:
        yield "\n".join(current)


def parse_mbox(text: str) -> list[Pair]:
    """Sent mail: each message's own text as a reply to what it quotes, else its subject."""
    if not text.startswith("From "):
        raise BadImport("an mbox starts with a `From ` line")
    pairs: list[Pair] = []
    for raw in _mbox_messages(text):
        message = email.message_from_string(raw, policy=email.policy.default)
        own, quoted = _own_text(_body(message))  # type: ignore[arg-type]
        if not own:
            continue
        subject = str(message.get("subject", "") or "").strip()
        request = quoted or (f"Write an email about: {subject}" if subject else "Write an email.")
        for piece in _chunks(own):
            pairs.append((_tail(request), piece))
            request = piece
    return pairs
