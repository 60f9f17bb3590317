"""The personalization engine: profile → prompt, retrieval over the user's history, reranking.

Three steps per request, all on the device:

1. **Prompt construction** (:func:`build_messages`) — a system prompt assembled from a template
   library (general, writing, code and tutor assistants) and the profile's style, tone,
   formality, complexity, length, humor, format and interests, plus the request's context and
   the retrieved history; rendered with the model's own chat template by the caller.
2. **Retrieval** (:func:`retrieve`) — the past interactions most similar to the request
   (cosine over 384-d embeddings in the local store), above a relevance floor.
3. **Preference-based reranking** (:func:`rerank`) — n sampled candidates scored by
   similarity to answers the user liked minus similarity to ones they disliked, closeness to
   the preferred length, the preferred format and relevance to the request; candidates that
   would leak PII the user did not give in this conversation are dropped.

The live conversation reaches the local model as the user wrote it; what the store keeps is
scrubbed (:mod:`client.store`), and scrubbed history shown to the model is naturalized
(":func:`common.pii.naturalize`": "[EMAIL]" reads "an email address"), so the model never sees
a bracketed tag to copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from client.assistant.profile import Profile, detect_format
from client.store import Interaction
from common.pii import PiiMatch, find_pii, naturalize, placeholder

TEMPLATES: dict[str, str] = {
    "general": "You are a helpful personal assistant.",
    "writing": (
        "You are a writing assistant. Help the user draft, rewrite and polish text; keep "
        "their meaning and voice."
    ),
    "code": (
        "You are a coding assistant. Give correct, runnable code and explain only what is needed."
    ),
    "tutor": (
        "You are a patient tutor. Explain step by step, use an example, and end with a short "
        "question that checks understanding."
    ),
}
STYLE = {
    "balanced": "",
    "concise": "Be concise: no preamble, no repetition.",
    "detailed": "Be thorough and cover the important details.",
    "storytelling": "Explain through a short story or vivid example.",
}
TONE = {
    "neutral": "",
    "friendly": "Use a warm, friendly tone.",
    "professional": "Use a professional, businesslike tone.",
    "playful": "Be playful and witty.",
    "poetic": "Write in a poetic, old-fashioned Shakespearean voice, with thee and thou.",
}
FORMALITY = {
    "casual": "Write casually, like talking to a friend; contractions are fine.",
    "neutral": "",
    "formal": "Write formally: no slang, no contractions.",
}
COMPLEXITY = {
    "simple": "Explain simply, as to a beginner; avoid jargon.",
    "intermediate": "",
    "expert": "Assume an expert reader; use precise technical terms.",
}
HUMOR = {"none": "", "light": "A touch of humor is welcome.", "lots": "Make it funny."}
FORMAT = {
    "prose": "",
    "bullets": "Answer as a short bulleted list (lines starting with '- ').",
    "steps": "Answer as numbered steps (1., 2., 3.).",
    "code": "Answer with a code block.",
}
LENGTH = {
    "short": "Answer in one or two sentences.",
    "medium": "Answer in one short paragraph.",
    "long": "Answer in several paragraphs.",
}
RETRIEVE_K = 3
RETRIEVE_MIN_SIM = 0.35


@dataclass
class Retrieved:
    """A past interaction, its similarity to the current request, and the answer the user
    endorsed for it (rated 4–5, preferred or edited), if any."""

    interaction: Interaction
    similarity: float
    endorsed: str | None = None


def system_prompt(
    profile: Profile, *, context: dict[str, str] | None = None, history: Sequence[Retrieved] = ()
) -> str:
    """The system prompt for ``profile`` (template × style × …), context and retrieved history."""
    parts = [TEMPLATES[profile.assistant]]
    parts += [
        STYLE[profile.style],
        TONE[profile.tone],
        FORMALITY[profile.formality],
        COMPLEXITY[profile.complexity],
        HUMOR[profile.humor],
        FORMAT[profile.preferred_format()],
        LENGTH[profile.length],
    ]
    if profile.domains:
        parts.append("The user is interested in " + ", ".join(profile.domains) + ".")
    if context:
        bits = [f"it is {context['time_of_day']} ({context['weekday']})"]
        bits.append(f"the user is on a {context['device']}")
        if context.get("task"):
            bits.append(f"their current task: {context['task']}")
        parts.append("Context: " + "; ".join(bits) + ".")
    if history:
        # Past requests show what the user cares about; only answers the user endorsed are
        # shown (a small model copies whatever answer it is given).
        lines = []
        for r in history:
            line = f"- they asked: {_clip(naturalize(r.interaction.prompt), 160)}"
            if r.endorsed:
                line += f" / an answer they liked: {_clip(naturalize(r.endorsed), 160)}"
            lines.append(line)
        parts.append("Earlier, related requests from this user:\n" + "\n".join(lines))
    return " ".join(p for p in parts if p and "\n" not in p) + "".join(
        "\n" + p for p in parts if "\n" in p
    )


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def build_messages(
    profile: Profile,
    request: str,
    *,
    context: dict[str, str] | None = None,
    history: Sequence[Retrieved] = (),
    turns: Sequence[dict[str, str]] = (),
    system: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages for the model's chat template: the personalized system prompt (with the
    caller's own ``system`` instructions after it), the conversation's earlier ``turns``
    (user/assistant messages, oldest first), then the request."""
    prompt = system_prompt(profile, context=context, history=history)
    if system:
        prompt += "\n" + system
    return [
        {"role": "system", "content": prompt},
        *({"role": t["role"], "content": t["content"]} for t in turns),
        {"role": "user", "content": request},
    ]


def retrieve(
    query: np.ndarray,
    interactions: Sequence[Interaction],
    *,
    k: int = RETRIEVE_K,
    min_similarity: float = RETRIEVE_MIN_SIM,
) -> list[Retrieved]:
    """The ``k`` past interactions most similar to ``query`` (unit vectors, cosine)."""
    scored = [
        Retrieved(i, float(np.dot(query, i.embedding)))
        for i in interactions
        if i.embedding is not None and i.embedding.shape == query.shape
    ]
    scored = [r for r in scored if r.similarity >= min_similarity]
    scored.sort(key=lambda r: r.similarity, reverse=True)
    return scored[:k]


def foreign_pii(text: str, known: str) -> list[PiiMatch]:
    """The PII in ``text`` that does not occur in ``known`` (what the user wrote themselves):
    the user's own name or address in an answer to them is no leak, a stranger's is."""
    return [m for m in find_pii(text) if m.text not in known]


def scrub_foreign(text: str, known: str) -> str:
    """``text`` with the PII not in ``known`` replaced by plain words (see :func:`foreign_pii`)."""
    for m in reversed(foreign_pii(text, known)):
        text = text[: m.start] + naturalize(placeholder(m.kind)) + text[m.end :]
    return text


@dataclass
class Scored:
    """A candidate answer with its preference score and the score's parts."""

    text: str
    score: float
    parts: dict[str, float]
    leaked_pii: bool
    index: int = 0  # the candidate's position in the list given to :func:`rerank`


def score_candidate(
    text: str, embedding: np.ndarray, query: np.ndarray | None, profile: Profile, known: str = ""
) -> Scored:
    """Score one candidate against the user's preferences (higher is better)."""
    liked, disliked = profile.vectors()
    parts = {
        "liked": 0.0 if liked is None else float(np.dot(embedding, liked)),
        "disliked": 0.0 if disliked is None else -float(np.dot(embedding, disliked)),
        "length": -0.5 * abs(math.log((len(text.split()) + 1) / (profile.target_words() + 1))),
        "format": 0.3 if detect_format(text) == profile.preferred_format() else 0.0,
        "relevance": 0.0 if query is None else 0.5 * float(np.dot(embedding, query)),
    }
    return Scored(text, sum(parts.values()), parts, bool(foreign_pii(text, known)))


def rerank(
    candidates: Sequence[str],
    embeddings: np.ndarray,
    *,
    query: np.ndarray | None,
    profile: Profile,
    known: str = "",
) -> list[Scored]:
    """Candidates best first; any holding PII that is not in ``known`` (the conversation the
    user wrote) are dropped.

    If every candidate holds such PII, the best one is returned with that PII replaced by
    plain words rather than nothing.
    """
    scored = [
        replace(score_candidate(c, e, query, profile, known), index=i)
        for i, (c, e) in enumerate(zip(candidates, embeddings, strict=True))
    ]
    scored.sort(key=lambda s: s.score, reverse=True)
    clean = [s for s in scored if not s.leaked_pii]
    if clean:
        return clean
    best = scored[0]
    return [replace(best, text=scrub_foreign(best.text, known))]
