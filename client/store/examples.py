"""A device's own data, read from its store: what federated rounds train and evaluate on.

Two kinds of example, both ``(request, reply)`` in the user's own voice:

* the user's **endorsed interactions** — a request and the answer the user rated 4–5,
  preferred, or edited to (a later reject or low rating withdraws it);
* the **examples** in the store's ``examples`` table — writing the user imported with
  ``fedpersona device import`` (:mod:`client.store.ingest`), or a simulated device's replayed role.

They are ordered by time; the newest ``data.test-fraction`` of them are the device's held-out
slice — never trained on, used for the device's own decisions and its evaluation. Everything
is read from the encrypted store at the start of a round; no copy is written anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from client.store import Feedback, Interaction, LocalStore
from common.split import held_out_count


@dataclass(frozen=True)
class Example:
    """One training or held-out example (text already scrubbed by the store)."""

    prompt: str
    reply: str
    ts: float
    source: str


def endorsed_reply(inter: Interaction, feedback: list[Feedback]) -> str | None:
    """The answer the user endorsed for ``inter``: the latest preferred answer or edit, or the
    answer itself after a rating of 4–5; ``None`` if none, or a later reject or rating ≤ 2."""
    endorsed = None
    for fb in feedback:
        if fb.kind in ("preferred", "edit") and fb.text:
            endorsed = fb.text
        elif fb.kind == "rating" and fb.value is not None and fb.value >= 4:
            endorsed = inter.response
        elif fb.kind == "reject" or (fb.kind == "rating" and (fb.value or 0) <= 2):
            endorsed = None
    return endorsed


def endorsed_examples(store: LocalStore) -> list[Example]:
    """Every interaction with an endorsed answer, as an example stamped with its request time."""
    by_interaction: dict[int, list[Feedback]] = {}
    for fb in store.feedback():
        if fb.interaction_id is not None:
            by_interaction.setdefault(fb.interaction_id, []).append(fb)
    out = []
    for iid, feedback in by_interaction.items():
        inter = store.get_interaction(iid)
        if inter is None:
            continue
        reply = endorsed_reply(inter, feedback)
        if reply:
            out.append(Example(inter.prompt, reply, inter.ts, "endorsed"))
    return out


def device_examples(store: LocalStore) -> list[Example]:
    """All of the device's examples, oldest first."""
    stored = [Example(e.prompt, e.reply, e.ts, e.source) for e in store.examples()]
    return sorted([*stored, *endorsed_examples(store)], key=lambda e: e.ts)


def too_few_examples(num_train: int, min_examples: int) -> str | None:
    """Why a device with ``num_train`` training examples declines a round (``None``: enough)."""
    if num_train >= min_examples:
        return None
    return (
        f"{num_train} training examples in the store, fewer than data.min-examples = "
        f"{min_examples}; import your writing with `fedpersona device import` or rate more "
        "answers"
    )


def split(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: the newest ``fraction`` held out (see :func:`held_out_count`)."""
    k = held_out_count(len(examples), fraction)
    return examples[: len(examples) - k], examples[len(examples) - k :]
