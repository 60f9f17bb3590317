"""The user's profile: explicit preferences, preferences inferred from behaviour, and context.

* **Explicit** — what the user sets (``fedpersona device profile --set tone=formal``, or
  ``PUT /v1/profile``): style, tone, formality, complexity, length, humor, format, domains and
  which assistant they want (general, writing, code, tutor).
* **Implicit** — learned on the device from what the user does: ratings, chosen vs rejected
  answers, edits, and the length and format of answers they keep. Kept as running statistics
  and the centroids of liked and disliked answers' embeddings (used by the reranker).
* **Context** — extracted on the device at request time: local time of day, weekday, device
  type and the current task/app when the caller says so.

Free text (domains, task) is PII-scrubbed; the profile never leaves the device.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from common.embedding import EMBED_DIM, normalize
from common.pii import scrub

CHOICES: dict[str, tuple[str, ...]] = {
    "assistant": ("general", "writing", "code", "tutor"),
    "style": ("balanced", "concise", "detailed", "storytelling"),
    "tone": ("neutral", "friendly", "professional", "playful", "poetic"),
    "formality": ("casual", "neutral", "formal"),
    "complexity": ("simple", "intermediate", "expert"),
    "length": ("short", "medium", "long"),
    "humor": ("none", "light", "lots"),
    "format": ("prose", "bullets", "steps", "code"),
}
# Target answer length in words, per explicit length preference.
LENGTH_WORDS = {"short": 30, "medium": 80, "long": 200}
MAX_DOMAINS = 12
# How fast implicit statistics follow new evidence (exponential moving average weight).
EMA = 0.2


@dataclass
class Implicit:
    """Preferences inferred from behaviour (all updated by :meth:`Profile.observe`)."""

    n_feedback: int = 0
    mean_rating: float | None = None
    kept_words: float | None = None  # EMA of the word count of answers the user liked/kept
    format_scores: dict[str, float] = field(default_factory=dict)
    liked: list[float] | None = None  # centroid (unit) of liked answers' embeddings
    disliked: list[float] | None = None
    n_liked: int = 0
    n_disliked: int = 0


@dataclass
class Profile:
    """A user's profile. Construct with :meth:`from_dict` to validate stored/incoming data."""

    assistant: str = "general"
    style: str = "balanced"
    tone: str = "neutral"
    formality: str = "neutral"
    complexity: str = "intermediate"
    length: str = "medium"
    humor: str = "none"
    format: str = "prose"
    domains: list[str] = field(default_factory=list)
    implicit: Implicit = field(default_factory=Implicit)

    # ---- validation ---------------------------------------------------------------------

    def __post_init__(self) -> None:
        for key, allowed in CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"profile.{key} must be one of {allowed}, got {value!r}")
        if not isinstance(self.domains, list) or not all(isinstance(d, str) for d in self.domains):
            raise ValueError("profile.domains must be a list of strings")
        if len(self.domains) > MAX_DOMAINS:
            raise ValueError(f"profile.domains holds at most {MAX_DOMAINS} entries")
        self.domains = [scrub(d.strip())[:60] for d in self.domains if d.strip()]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Build and validate a profile from a plain dict (e.g. the store or an API body).

        Raises:
            ValueError: Unknown keys or invalid values, naming the key.
        """
        if not isinstance(data, dict):
            raise ValueError("profile must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown profile key(s) {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        implicit = data.pop("implicit", None) or {}
        if not isinstance(implicit, dict) or set(implicit) - {f.name for f in fields(Implicit)}:
            raise ValueError("profile.implicit is malformed")
        return cls(**data, implicit=Implicit(**implicit))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return asdict(self)

    def updated(self, changes: dict[str, Any]) -> Profile:
        """A copy with explicit fields changed (``implicit`` cannot be set from outside).

        ``domains`` may be given as a comma-separated string.

        Raises:
            ValueError: Unknown or invalid keys.
        """
        if "implicit" in changes:
            raise ValueError("profile.implicit is learned on the device and cannot be set")
        changes = dict(changes)
        if isinstance(changes.get("domains"), str):
            changes["domains"] = [d for d in changes["domains"].split(",") if d.strip()]
        return Profile.from_dict({**self.to_dict(), **changes})

    # ---- implicit learning --------------------------------------------------------------

    def observe(
        self,
        *,
        response: str,
        embedding: np.ndarray | None,
        rating: float | None = None,
        chosen: bool | None = None,
    ) -> None:
        """Learn from one signal on a response.

        Args:
            response: The answer the signal is about (for an edit: the edited text).
            embedding: Its 384-d embedding.
            rating: 1–5 stars, if the user rated it.
            chosen: True if the user preferred/kept/edited-into it, False if rejected.
        """
        imp = self.implicit
        imp.n_feedback += 1
        liked = chosen if chosen is not None else (rating is not None and rating >= 4)
        disliked = chosen is False or (rating is not None and rating <= 2)
        if rating is not None:
            imp.mean_rating = (
                float(rating)
                if imp.mean_rating is None
                else (1 - EMA) * imp.mean_rating + EMA * rating
            )
        if liked:
            words = float(len(response.split()))
            imp.kept_words = (
                words if imp.kept_words is None else (1 - EMA) * imp.kept_words + (EMA * words)
            )
            fmt = detect_format(response)
            for name in CHOICES["format"]:
                old = imp.format_scores.get(name, 0.0)
                imp.format_scores[name] = (1 - EMA) * old + EMA * float(name == fmt)
        if embedding is not None and (liked or disliked):
            key, count = ("liked", imp.n_liked) if liked else ("disliked", imp.n_disliked)
            old = getattr(imp, key)
            vec = np.asarray(embedding, dtype=np.float32)
            new = vec if old is None else (np.asarray(old) * count + vec) / (count + 1)
            setattr(imp, key, normalize(new.astype(np.float32)).tolist())
            if liked:
                imp.n_liked += 1
            else:
                imp.n_disliked += 1

    # ---- derived views ------------------------------------------------------------------

    def target_words(self) -> float:
        """How long an answer should be: the explicit preference, pulled toward kept answers."""
        explicit = float(LENGTH_WORDS[self.length])
        kept = self.implicit.kept_words
        return explicit if kept is None else 0.5 * explicit + 0.5 * kept

    def preferred_format(self) -> str:
        """The explicit format, unless kept answers clearly favour another one."""
        scores = self.implicit.format_scores
        if scores:
            best = max(scores, key=scores.__getitem__)
            if scores[best] > 0.5 and best != self.format:
                return best
        return self.format

    def describe(self) -> str:
        """A one-paragraph description (used in the prompt and embedded for the user vector)."""
        parts = [
            f"a {self.assistant} assistant",
            f"{self.style} style",
            f"{self.tone} tone",
            f"{self.formality} register",
            f"{self.complexity} level",
            f"{self.length} answers (about {round(self.target_words())} words)",
            f"format: {self.preferred_format()}",
            f"humor: {self.humor}",
        ]
        if self.domains:
            parts.append("interests: " + ", ".join(self.domains))
        return "; ".join(parts)

    def vectors(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Centroids of liked and disliked answers (unit vectors) or ``None``."""
        imp = self.implicit
        liked = None if imp.liked is None else np.asarray(imp.liked, dtype=np.float32)
        disliked = None if imp.disliked is None else np.asarray(imp.disliked, dtype=np.float32)
        for vec in (liked, disliked):
            if vec is not None and vec.shape != (EMBED_DIM,):
                raise ValueError(f"profile centroid has shape {vec.shape}, need ({EMBED_DIM},)")
        return liked, disliked


def detect_format(text: str) -> str:
    """Which of the :data:`CHOICES` formats a text is written in."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if "```" in text:
        return "code"
    if lines and sum(bool(re.match(r"^\d+[.)]\s", ln)) for ln in lines) >= 2:
        return "steps"
    if lines and sum(bool(re.match(r"^[-*•]\s", ln)) for ln in lines) >= 2:
        return "bullets"
    return "prose"


def time_of_day(hour: int) -> str:
    """Morning, afternoon, evening or night for a local hour."""
    if 5 <= hour < 12:
        return "morning"
    if 12 <= hour < 17:
        return "afternoon"
    if 17 <= hour < 22:
        return "evening"
    return "night"


def device_type() -> str:
    """``$FEDPERSONA_DEVICE_TYPE`` if set, else a guess from the platform."""
    env = os.environ.get("FEDPERSONA_DEVICE_TYPE")
    if env:
        return env
    system = platform.system().lower()
    if "android" in platform.platform().lower():
        return "phone"
    return {"darwin": "laptop", "windows": "desktop"}.get(system, "computer")


def extract_context(*, now: float | None = None, task: str | None = None) -> dict[str, str]:
    """Context of a request, computed on the device (nothing is sent anywhere).

    Args:
        now: Time of the request (default: now), interpreted in local time.
        task: The user's current task or app, if the caller knows it (scrubbed).
    """
    t = time.localtime(time.time() if now is None else now)
    ctx = {
        "time_of_day": time_of_day(t.tm_hour),
        "weekday": time.strftime("%A", t),
        "device": device_type(),
    }
    if task:
        ctx["task"] = scrub(task.strip())[:80]
    return ctx
