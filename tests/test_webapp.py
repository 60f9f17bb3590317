"""The local web app (client/api/web) in a real browser: Debian's chromium driven by Playwright
against a real uvicorn server on 127.0.0.1 over the tiny model.

Needs /usr/bin/chromium and the playwright Python package (``bash scripts/browser_setup.sh``);
without them the module is skipped, unless ``FEDPERSONA_REQUIRE_BROWSER=1`` (then it fails).
``FEDPERSONA_SCREENSHOTS=1`` also writes the screenshots to docs/img/webapp-*.png.

The tiny model samples random tokens: the tests check structure (an answer appears, its
variant and reason show, requests carry what they should), never the words. Tests share one
server; ``test_forget_erases_everything`` runs last because it erases the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from client.api.app import create_app
from client.assistant.assistant import Assistant
from tests.conftest import ROOT, api_server, tiny_assistant

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
# The browser runs with no network but loopback: no first-run, update, sync or QUIC traffic.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1100, "height": 750}
MAX_TOKENS = "12"  # short answers: the tiny model on 2 CPU cores
ANSWER_TIMEOUT_MS = 120_000
WEB = ROOT / "client" / "api" / "web"

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:
    sync_playwright = None

_missing = [
    what
    for what, ok in (
        (f"{CHROMIUM} (apt-get install chromium)", CHROMIUM.exists()),
        ("the playwright package (pip install playwright)", sync_playwright is not None),
    )
    if not ok
]
if _missing:
    _why = "browser tests need " + " and ".join(_missing) + "; run scripts/browser_setup.sh"
    if os.environ.get("FEDPERSONA_REQUIRE_BROWSER") == "1":
        pytest.fail(_why + " (FEDPERSONA_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(_why, allow_module_level=True)


# ---- fixtures ----------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    token: str
    assistant: Assistant
    http: httpx.Client


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """``fedpersona device serve``'s app over a fresh tiny-model device, as tests/test_api.py."""
    store, assistant, token = tiny_assistant(tmp_path_factory.mktemp("webapp") / "dev")
    _ledger_with_two_rounds(store)
    with (
        api_server(create_app(assistant, token=token)) as url,
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        yield Server(url, token, assistant, http)
    store.close()


def _ledger_with_two_rounds(store) -> None:  # type: ignore[no-untyped-def]
    """A round joined (charged to both ledgers, ε about 0.5 each) and one declined, so the
    privacy page has rows to show."""
    from client.federation.ledger import PrivacyLedger
    from client.federation.policy import DevicePolicy

    ledger = PrivacyLedger.load(store, DevicePolicy.of(store).caps)
    now = time.time()
    ledger.charge(
        server_round=1, record=(3.0, 0.2, 2), user=(2.0, 0.1, 1), run="run-7", now=now - 7200
    )
    ledger.note_declined(
        server_round=2, reason="cohort of 3 devices is below min_cohort 8", now=now - 3600
    )
    ledger.save(store)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class Watch:
    """What a page did: every request, console errors, uncaught exceptions."""

    requests: list[Any] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def bodies(self, path: str) -> list[dict]:
        """The JSON bodies the page POSTed or PUT to ``path``, in order."""
        return [
            json.loads(r.post_data)
            for r in self.requests
            if urlsplit(r.url).path == path and r.method in ("POST", "PUT") and r.post_data
        ]


# Reports CSP violations on the console, where the teardown check sees them (Chromium also
# logs its own "Refused to ..." line; this catches any it does not).
CSP_LISTENER = """
document.addEventListener("securitypolicyviolation", (e) =>
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI}`));
"""


@pytest.fixture
def page(browser, server) -> Iterator[tuple[Page, Watch]]:
    """A fresh browser context (empty storage) and page over a device with no chats kept
    (they live in its store: client/store/chats.py), and what it did. On teardown: every
    request went to 127.0.0.1, none carried the token in its URL, no cookie was set, no CSP
    violation and no uncaught script error happened."""
    from client.store import StoreError
    from client.store.chats import CHATS_BLOB

    with contextlib.suppress(StoreError):  # forgotten by test_forget_erases_everything
        server.assistant.store.put_json(CHATS_BLOB, {"active": None, "chats": []})
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    context.add_init_script(CSP_LISTENER)
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    watch = Watch()
    pg.on("request", lambda r: watch.requests.append(r))
    pg.on("console", lambda m: m.type == "error" and watch.console_errors.append(m.text))
    pg.on("pageerror", lambda e: watch.page_errors.append(str(e)))
    yield pg, watch
    cookies = context.cookies()
    context.close()
    assert watch.requests, "the page made no request"
    for r in watch.requests:
        url = r.url[len("blob:") :] if r.url.startswith("blob:") else r.url
        if url.startswith("data:"):
            continue
        assert urlsplit(url).hostname == "127.0.0.1", f"request left the machine: {r.url}"
        assert server.token not in r.url, "the token went into a URL"
    assert cookies == []
    assert not [m for m in watch.console_errors if re.search(r"Content.Security|CSP", m)]
    assert watch.page_errors == []


# ---- helpers -----------------------------------------------------------------------------


def login(pg: Page, server: Server, hash_: str = "") -> None:
    pg.goto(server.url + "/" + hash_)
    pg.get_by_label("API token").fill(server.token)
    pg.get_by_role("button", name="Sign in").click()
    expect(pg.get_by_role("navigation", name="Pages")).to_be_visible()


def ask(pg: Page, text: str) -> Any:
    """Send ``text`` in the current chat; wait for the streamed answer; return its item."""
    pg.get_by_label("Max tokens").fill(MAX_TOKENS)
    pg.get_by_label("Message", exact=True).fill(text)
    pg.get_by_label("Message", exact=True).press("Enter")
    answer = pg.locator("#messages > li.assistant").last
    # Done when its feedback controls show (they need the interaction id of the last chunk).
    expect(answer.get_by_role("group", name="Feedback on this answer")).to_be_visible(
        timeout=ANSWER_TIMEOUT_MS
    )
    expect(pg.get_by_role("button", name="Send", exact=True)).to_be_enabled()
    return answer


def shot(pg: Page, name: str, tmp_path: Path) -> None:
    """Screenshot into tmp (always: it must work) and, with FEDPERSONA_SCREENSHOTS=1, into
    docs/img/webapp-<name>.png (tracked files change only when asked)."""
    out = tmp_path / f"webapp-{name}.png"
    pg.screenshot(path=str(out))
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("FEDPERSONA_SCREENSHOTS") == "1":
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(ROOT / "docs" / "img" / f"webapp-{name}.png"))


@contextlib.contextmanager
def fixed_answer(
    assistant: Assistant, pieces: list[str], pause: float = 0.0, fail: str | None = None
) -> Iterator[None]:
    """Make the assistant's generation stream ``pieces`` (``pause`` seconds apart) and return
    their concatenation, or raise ``RuntimeError(fail)`` after them: only the model's sampling
    is replaced; ranking, storing and the API's streaming run as usual."""
    from common.generation import Generated

    real = assistant.generate
    text = "".join(pieces)

    def generate(prompt_ids, *, n, on_text=None, **_):  # type: ignore[no-untyped-def]
        for i, piece in enumerate(pieces if on_text is not None and n == 1 else []):
            time.sleep(pause if i else 0)
            on_text(piece)
        if fail is not None:
            raise RuntimeError(fail)
        return [Generated(text, "stop", len(pieces)) for _ in range(n)]

    assistant.generate = generate  # type: ignore[method-assign]
    try:
        yield
    finally:
        assistant.generate = real  # type: ignore[method-assign]


# ---- tests -------------------------------------------------------------------------------


def test_static_files_are_served_with_a_strict_csp_and_hold_no_inline_code(server) -> None:
    index = server.http.get("/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    csp = index.headers.get("content-security-policy", "")
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'"):
        assert directive in csp, csp
    for path, kind in (("/app/app.js", "javascript"), ("/app/app.css", "text/css")):
        res = server.http.get(path)  # no token needed
        assert res.status_code == 200 and kind in res.headers["content-type"], path

    html = (WEB / "index.html").read_text()
    assert "<style" not in html and not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/app/app.js" defer>']
    js = (WEB / "app.js").read_text()
    # Data goes in as text only; looks change through classes, never element.style.
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", ".style."):
        assert banned not in js, banned
    assert not re.search(r"https?://", js + html), "only same-origin URLs"


def test_login_rejects_a_wrong_token_keeps_the_right_one_and_logs_out(
    page, server, tmp_path
) -> None:
    pg, watch = page
    pg.goto(server.url + "/")
    expect(pg.get_by_role("heading", name="Sign in to this device")).to_be_visible()
    shot(pg, "login", tmp_path)

    pg.get_by_label("API token").fill("x" * 43)
    pg.get_by_role("button", name="Sign in").click()
    expect(pg.locator("#login-error")).to_contain_text("not accepted")
    expect(pg.get_by_role("navigation", name="Pages")).to_be_hidden()
    assert pg.evaluate("sessionStorage.getItem('fedpersona.token')") is None

    login(pg, server)
    # The token lives for the browser session only, never in its persistent storage.
    assert pg.evaluate("sessionStorage.getItem('fedpersona.token')") == server.token
    assert pg.evaluate("localStorage.getItem('fedpersona.token')") is None
    options = pg.locator("#model-select option").evaluate_all("os => os.map(o => o.value)")
    assert options[0] == "fedpersona" and "fedpersona-personal" in options
    assert pg.locator("#model-select").input_value() == "fedpersona"
    v1 = [r for r in watch.requests if "/v1/" in r.url]
    assert v1 and v1[-1].headers.get("authorization") == f"Bearer {server.token}"

    # Plain-text chats an earlier version left in the browser go at the next load.
    pg.evaluate("localStorage.setItem('fedpersona.chats', '{\"chats\": []}')")
    pg.reload()  # the kept token signs in again
    expect(pg.get_by_role("navigation", name="Pages")).to_be_visible()
    assert pg.evaluate("localStorage.getItem('fedpersona.chats')") is None
    pg.get_by_role("button", name="Log out").click()
    expect(pg.get_by_label("API token")).to_be_visible()
    expect(pg.locator("#login-error")).to_contain_text("Signed out")
    assert pg.evaluate("sessionStorage.getItem('fedpersona.token')") is None
    assert set(pg.evaluate("Object.keys(localStorage)")) <= {"fedpersona.options"}


def test_a_401_returns_to_the_login_form_with_a_message(page, server) -> None:
    pg, _ = page
    nav = pg.get_by_role("navigation", name="Pages")
    # At start-up (a kept token that is no longer valid) ...
    login(pg, server)
    pg.evaluate("sessionStorage.setItem('fedpersona.token', 'y'.repeat(43))")
    pg.reload()
    expect(pg.get_by_label("API token")).to_be_visible()
    expect(pg.locator("#login-error")).to_contain_text("Signed out")
    expect(nav).to_be_hidden()
    # ... and on any later call (the app's in-memory token is made wrong).
    login(pg, server)
    pg.evaluate("state.token = 'z'.repeat(43)")
    pg.get_by_role("link", name="Profile").click()
    expect(pg.locator("#login-error")).to_contain_text("Signed out")
    expect(nav).to_be_hidden()
    assert pg.evaluate("sessionStorage.getItem('fedpersona.token')") is None


def test_keyboard_alone_signs_in_and_moves_between_pages_with_visible_focus(page, server) -> None:
    pg, _ = page
    pg.goto(server.url + "/")
    expect(pg.get_by_label("API token")).to_be_focused()
    pg.keyboard.type(server.token)
    pg.keyboard.press("Enter")
    expect(pg.get_by_label("Message", exact=True)).to_be_focused()

    pg.get_by_role("link", name="Chat").focus()
    pg.keyboard.press("Tab")
    profile = pg.get_by_role("link", name="Profile")
    expect(profile).to_be_focused()
    outline = profile.evaluate(
        "a => getComputedStyle(a).outlineStyle + ' ' + getComputedStyle(a).outlineWidth"
    )
    assert outline == "solid 3px", outline
    pg.keyboard.press("Enter")
    expect(pg.get_by_role("heading", name="Profile", level=1)).to_be_focused()
    expect(pg.get_by_label("Tone")).to_be_visible()
    pg.keyboard.press("Tab")
    expect(pg.get_by_label("Assistant")).to_be_focused()

    # Every form control of every page has a label (the profile's are built from the API).
    unlabelled = pg.evaluate(
        "[...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => !e.labels.length).map(e => e.id || e.outerHTML)"
    )
    assert unlabelled == []
    assert pg.locator("#messages").get_attribute("aria-live") == "polite"


def test_chat_streams_answers_and_sends_the_whole_conversation(page, server, tmp_path) -> None:
    pg, watch = page
    login(pg, server, "#chat")
    first = ask(pg, "How do I tie a bowline?")
    expect(first.locator(".text")).not_to_be_empty()
    expect(first.locator(".meta")).to_contain_text(re.compile(r"answered by the \w+ model"))
    expect(first.locator(".meta .why")).to_contain_text("Why: ")
    first_text = first.locator(".text").text_content()

    second = ask(pg, "And a clove hitch?")
    expect(second.locator(".text")).not_to_be_empty()
    bodies = watch.bodies("/v1/chat/completions")
    assert len(bodies) == 2
    assert bodies[0]["stream"] is True and bodies[0]["stream_options"] == {"include_usage": True}
    assert bodies[0]["model"] == "fedpersona" and bodies[0]["max_tokens"] == int(MAX_TOKENS)
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "How do I tie a bowline?"},
        {"role": "assistant", "content": first_text},
        {"role": "user", "content": "And a clove hitch?"},
    ]
    chats = [r for r in watch.requests if r.url.endswith("/v1/chat/completions")]
    assert chats[-1].headers.get("authorization") == f"Bearer {server.token}"
    first.get_by_role("button", name="Good answer").click()
    expect(first.locator(".feedback .status")).to_have_text(re.compile(r"^(learned|noted)"))
    shot(pg, "chat", tmp_path)

    # The chat is kept in this browser: it survives a reload, and a new chat starts empty.
    pg.reload()
    expect(pg.locator("#messages > li")).to_have_count(4)
    pg.get_by_role("button", name="New chat").click()
    expect(pg.locator("#messages > li")).to_have_count(0)
    expect(pg.locator("#chat-list li")).to_have_count(2)
    pg.get_by_role("button", name="How do I tie a bowline?").click()
    expect(pg.locator("#messages > li")).to_have_count(4)


def test_each_kind_of_feedback_is_sent_and_an_edit_replaces_the_answer(page, server) -> None:
    pg, watch = page
    login(pg, server, "#chat")
    answer = ask(pg, "Suggest a name for a cat.")
    status = answer.locator(".feedback .status")
    learned = re.compile(r"^(learned \(\d+ ms\)|noted)")

    answer.get_by_role("button", name="Good answer").click()
    expect(status).to_have_text(learned)
    expect(answer.get_by_role("button", name="Good answer")).to_have_attribute(
        "aria-pressed", "true"
    )
    answer.get_by_role("button", name="Bad answer").click()
    expect(answer.get_by_role("button", name="Bad answer")).to_have_attribute(
        "aria-pressed", "true"
    )
    expect(status).to_have_text(learned)

    answer.get_by_role("button", name="I prefer…").click()
    answer.get_by_label("The answer you would prefer").fill("Mittens.")
    answer.get_by_role("button", name="Send preferred answer").click()
    expect(answer.get_by_label("The answer you would prefer")).to_be_hidden()
    expect(status).to_have_text(learned)

    answer.get_by_role("button", name="Edit", exact=True).click()
    box = answer.get_by_label("Edit the answer")
    expect(box).to_have_value(answer_text := box.input_value())
    assert answer_text
    box.fill("Whiskers, obviously.")
    answer.get_by_role("button", name="Save edit").click()
    expect(answer.locator(".text")).to_have_text("Whiskers, obviously.")
    expect(answer.locator(".meta")).to_contain_text("edited by you")
    expect(status).to_have_text(re.compile(r"^learned \(\d+ ms\)"))

    bodies = watch.bodies("/v1/feedback")
    assert len({b.pop("interaction_id") for b in bodies}) == 1
    assert bodies == [
        {"rating": 5},
        {"rating": 1, "reject": True},
        {"preferred": "Mittens."},
        {"edit": "Whiskers, obviously."},
    ]
    # The edit is the answer from now on: after a reload, and in the next turn's history.
    pg.reload()
    expect(pg.locator("#messages > li.assistant .text").last).to_have_text("Whiskers, obviously.")


def test_profile_edits_are_saved_and_bad_values_are_refused(page, server, tmp_path) -> None:
    pg, watch = page
    login(pg, server, "#profile")
    description = pg.locator("#profile-description")
    expect(description).not_to_be_empty()
    before = description.text_content()

    pg.get_by_label("Tone").select_option("friendly")
    pg.get_by_label("Domains (comma-separated)").fill("cooking,  chess")
    pg.get_by_role("button", name="Save", exact=True).click()
    expect(pg.locator("#profile-status")).to_have_text("Saved.")
    assert watch.bodies("/v1/profile")[-1] == {"tone": "friendly", "domains": ["cooking", "chess"]}

    pg.reload()
    expect(pg.get_by_label("Tone")).to_have_value("friendly")
    expect(pg.get_by_label("Domains (comma-separated)")).to_have_value("cooking, chess")
    expect(description).to_contain_text("friendly")
    expect(description).to_contain_text("cooking")
    assert description.text_content() != before
    shot(pg, "profile", tmp_path)

    # A value the server does not allow (slipped into the select) comes back as an error.
    pg.locator("#profile-tone").evaluate(
        "s => { const o = document.createElement('option'); o.value = o.textContent = 'angry';"
        " s.append(o); s.value = 'angry'; }"
    )
    pg.get_by_role("button", name="Save", exact=True).click()
    expect(pg.locator("#profile-status")).to_contain_text("Not saved: ")
    expect(pg.locator("#profile-status")).to_contain_text("tone")


def test_a_late_profile_load_cannot_overwrite_what_is_typed(page, server) -> None:
    # Prepare: the profile's GET answers only when the test lets it.
    pg, _ = page
    held: list = []
    pg.route(
        "**/v1/profile",
        lambda route: held.append(route) if route.request.method == "GET" else route.continue_(),
    )
    login(pg, server, "#profile")
    domains = pg.get_by_label("Domains (comma-separated)")

    # Execute / Assert: nothing can be typed while it loads; once in, typing is kept.
    expect(domains).to_be_disabled()
    for _ in range(200):  # up to 10 s for the page to ask
        if held:
            break
        pg.wait_for_timeout(50)
    assert held, "the profile page never asked for /v1/profile"
    held.pop().continue_()
    expect(domains).to_be_enabled()
    domains.fill("knitting")
    pg.get_by_role("button", name="Save", exact=True).click()
    expect(pg.locator("#profile-status")).to_have_text("Saved.")
    expect(domains).to_have_value("knitting")


def test_model_page_says_which_model_answers_and_why(page, server, tmp_path) -> None:
    pg, _ = page
    login(pg, server, "#model")
    expect(pg.locator("#model-active")).to_contain_text(re.compile(r"Answering now: \w"))
    expect(pg.locator("#model-why")).not_to_be_empty()
    facts = pg.locator("#model-facts")
    expect(facts).to_contain_text("Gate evidence")
    expect(facts).to_contain_text("Experts installed")
    expect(pg.locator("#model-list")).to_contain_text("fedpersona-global")
    shot(pg, "model", tmp_path)


def test_markup_in_answers_and_profile_shows_as_text_and_never_runs(page, server) -> None:
    pg, _ = page
    # Split inside tags: the page must not assemble markup from pieces either.
    pieces = ["<scr", "ipt>window.__xss = 1</script><img src", '="x" onerror="window.__xss = 2">']
    payload = "".join(pieces)
    login(pg, server, "#chat")
    # Every text the answer showed while it streamed, in order.
    pg.evaluate(
        """() => { window.__seen = [];
        new MutationObserver(() => {
          const t = document.querySelector('#messages > li.assistant:last-child .text');
          if (t && window.__seen.at(-1) !== t.textContent) window.__seen.push(t.textContent);
        }).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true}); }"""
    )
    with fixed_answer(server.assistant, pieces, pause=0.3):
        answer = ask(pg, "<b>bold</b> <script>window.__xss = 3</script>")
    expect(answer.locator(".text")).to_have_text(payload)
    # It streamed: the answer grew piece by piece before the last chunk came.
    seen = [t for t in pg.evaluate("window.__seen") if t]
    assert seen[:3] == [pieces[0], "".join(pieces[:2]), payload], seen
    expect(pg.locator("#messages > li.user .text").last).to_contain_text("<b>bold</b>")
    expect(pg.locator("#chat-list")).to_contain_text("<b>bold</b>")
    # The chat is kept in the device's encrypted store, not in the browser, and comes back
    # from there.
    deadline = time.monotonic() + 10  # written within SAVE_DELAY_MS (page.wait_for_function
    while pg.evaluate("state.saving !== null"):  # would need eval, which the CSP forbids)
        assert time.monotonic() < deadline, "the chats were not saved"
        pg.wait_for_timeout(100)
    assert "fedpersona.chats" not in pg.evaluate("Object.keys(localStorage)")
    kept = server.assistant.store.get_json("webapp_chats")
    assert payload in [m["content"] for c in kept["chats"] for m in c["messages"]]
    pg.reload()  # rendered again from the store
    expect(pg.locator("#messages > li.assistant .text").last).to_have_text(payload)

    pg.goto(server.url + "/#profile")
    pg.get_by_label("Domains (comma-separated)").fill('<img src="y" onerror="window.__xss=4">')
    pg.get_by_role("button", name="Save", exact=True).click()
    expect(pg.locator("#profile-status")).to_have_text("Saved.")
    expect(pg.locator("#profile-description")).to_contain_text("<img")

    assert pg.evaluate("window.__xss") is None
    assert pg.locator("main script, main img, main b").count() == 0


def test_an_error_mid_stream_marks_the_answer_and_stays_out_of_the_conversation(
    page, server
) -> None:
    pg, watch = page
    login(pg, server, "#chat")
    pg.get_by_label("Max tokens").fill(MAX_TOKENS)
    with fixed_answer(server.assistant, ["Half an ans"], fail="the model fell over"):
        pg.get_by_label("Message", exact=True).fill("Tell me a story.")
        pg.get_by_label("Message", exact=True).press("Enter")
        expect(pg.locator("#chat-error")).to_contain_text("the model fell over")
    failed = pg.locator("#messages > li.assistant").last
    expect(failed).to_have_class(re.compile(r"\bfailed\b"))
    expect(failed.locator(".meta")).to_contain_text("Error: ")
    expect(failed.get_by_role("group", name="Feedback on this answer")).to_have_count(0)

    ask(pg, "A short one, then.")
    assert watch.bodies("/v1/chat/completions")[-1]["messages"] == [
        {"role": "user", "content": "A short one, then."}
    ]


def test_privacy_page_shows_the_ledger_and_exports_the_data(page, server, tmp_path) -> None:
    pg, _ = page
    login(pg, server, "#privacy")
    expect(pg.get_by_role("heading", name="Privacy budget spent")).to_be_visible()
    budget = pg.locator("#budget")
    expect(budget).to_contain_text("User-level")
    expect(budget).to_contain_text("Record-level")
    expect(budget).to_contain_text("δ = ")
    expect(budget.locator("meter")).to_have_count(2)
    expect(pg.locator("#budget-assumes")).to_contain_text("Assumes: ")
    rows = pg.locator("#rounds tbody tr")
    expect(rows).to_have_count(2)
    expect(pg.locator("#rounds tr.joined")).to_contain_text("σ 2")
    expect(pg.locator("#rounds tr.joined")).to_contain_text("update of the shared adapter")
    expect(pg.locator("#rounds tr.declined")).to_contain_text("below min_cohort")
    expect(pg.locator("#never-leaves li").first).to_be_visible()
    expect(pg.locator("#stored")).to_contain_text("Retention")
    shot(pg, "privacy", tmp_path)

    with pg.expect_download() as download:
        pg.get_by_role("button", name="Export my data").click()
    assert download.value.suggested_filename == "fedpersona-export.json"
    exported = json.loads(Path(download.value.path()).read_text())
    assert "interactions" in exported
    expect(pg.locator("#export-status")).to_contain_text("Downloaded")


def test_the_federation_switch_pauses_and_resumes_the_device(page, server) -> None:
    from client.store.state import paused_since

    # Prepare
    pg, watch = page
    login(pg, server, "#privacy")
    federation = pg.locator("#federation")
    expect(federation).to_contain_text("not joined")

    # Execute / Assert: paused in the store (rounds are declined), then resumed.
    pg.get_by_role("button", name="Pause", exact=True).click()
    expect(pg.locator("#federation-status")).to_contain_text("Paused")
    expect(federation).to_contain_text("paused since")
    assert watch.bodies("/v1/federation")[-1] == {"paused": True}
    assert paused_since(server.assistant.store) is not None
    pg.get_by_role("button", name="Resume", exact=True).click()
    expect(pg.locator("#federation-status")).to_contain_text("Resumed")
    expect(federation).to_contain_text("Taking part")
    assert paused_since(server.assistant.store) is None


def test_forget_erases_everything(page, server) -> None:
    """Last: the store is gone afterwards and every /v1 call answers 410."""
    pg, watch = page
    login(pg, server, "#privacy")
    confirm = pg.get_by_label("Type forget to confirm")
    erase = pg.get_by_role("button", name="Erase everything")
    expect(erase).to_be_disabled()
    confirm.fill("forg")
    expect(erase).to_be_disabled()
    confirm.fill("forget")
    expect(erase).to_be_enabled()
    erase.click()

    expect(pg.get_by_role("heading", name="Everything was erased")).to_be_visible()
    expect(pg.locator("#erased-files li").first).to_be_visible()
    expect(pg.locator("#banner")).to_contain_text("erased")
    assert watch.bodies("/v1/forget") == [{"confirm": "forget"}]
    assert pg.evaluate("localStorage.getItem('fedpersona.chats')") is None

    gone = server.http.get("/v1/profile", headers={"Authorization": f"Bearer {server.token}"})
    assert gone.status_code == 410 and set(gone.json()["error"]) >= {"message", "type"}
    pg.reload()  # a forgotten store is said so, not shown as a sign-in problem
    expect(pg.locator("#banner")).to_contain_text("erased")
    expect(pg.get_by_role("heading", name="Everything was erased")).to_be_visible()
