"""PII scrubber: real-looking positives per kind, prose that must survive, and invariants."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.pii import KINDS, PiiMatch, contains_pii, find_pii, scrub

# (input, expected scrub output)
SCRUBBED = [
    # EMAIL
    ("Email me at jane.doe+news@mail.example.co.uk.", "Email me at [EMAIL]."),
    ("Send it to bob_smith@company.org, thanks", "Send it to [EMAIL], thanks"),
    ("Alerts come from <alerts@eu-west.ops.example.io>", "Alerts come from <[EMAIL]>"),
    # PHONE
    ("Reach me on +1 (415) 555-0132 tomorrow.", "Reach me on [PHONE] tomorrow."),
    ("My number is 415-555-0132.", "My number is [PHONE]."),
    ("or 415.555.0132 after six", "or [PHONE] after six"),
    ("Office: (415) 555-0132", "Office: [PHONE]"),
    ("London office +44 20 7946 0958, ask for Sam", "London office [PHONE], ask for Sam"),
    ("ring 020 7946 0958 after 5pm", "ring [PHONE] after 5pm"),
    ("Berlin: +49 30 1234567", "Berlin: [PHONE]"),
    ("whatsapp +4915112345678", "whatsapp [PHONE]"),
    ("tel: 5550132", "tel: [PHONE]"),
    ("Paris: +33 1 42 68 53 00", "Paris: [PHONE]"),
    ("toll free 1-800-555-0199", "toll free [PHONE]"),
    # CARD
    ("card 4111 1111 1111 1111 exp 12/27", "card [CARD] exp 12/27"),
    ("MC 5500-0000-0000-0004 please", "MC [CARD] please"),
    ("Amex 378282246310005.", "Amex [CARD]."),
    ("use 6011 1111 1111 1117 for the deposit", "use [CARD] for the deposit"),
    ("old visa 4222222222222", "old visa [CARD]"),
    # IBAN
    ("IBAN: DE89 3704 0044 0532 0130 00", "IBAN: [IBAN]"),
    ("pay GB82WEST12345698765432 by Friday", "pay [IBAN] by Friday"),
    ("FR14 2004 1010 0505 0001 3M02 606 THANKS", "[IBAN] THANKS"),
    ("NL91ABNA0417164300", "[IBAN]"),
    # SSN
    ("SSN 078-05-1120", "SSN [SSN]"),
    ("my social security number is 123 45 6789", "my social security number is [SSN]"),
    ("123-45-6789 is on file", "[SSN] is on file"),
    # IP
    ("login from 192.168.1.10 at 10:30", "login from [IP] at 10:30"),
    ("the server is 8.8.8.8.", "the server is [IP]."),
    ("host 2001:db8:85a3::8a2e:370:7334 is down", "host [IP] is down"),
    # ACCOUNT
    ("my account number 12345678 is frozen", "my account number [ACCOUNT] is frozen"),
    ("acct # 000123456789", "acct # [ACCOUNT]"),
    ("routing number: 021000021", "routing number: [ACCOUNT]"),
    ("sort code 12-34-56, account 31926819", "sort code [ACCOUNT], account [ACCOUNT]"),
    ("Account No. 1234 5678 9012 3456", "Account No. [ACCOUNT]"),
    ("A/C no. 12345678", "A/C no. [ACCOUNT]"),
    # ADDRESS
    ("I live at 221B Baker Street.", "I live at [ADDRESS]."),
    ("1600 Pennsylvania Avenue NW, Washington, DC 20500", "[ADDRESS]"),
    ("Ship to 42 Elm St., Springfield", "Ship to [ADDRESS]"),
    ("Meet at 350 5th Avenue, New York, NY 10118 at noon", "Meet at [ADDRESS] at noon"),
    ("10 Downing St, London SW1A 2AA", "[ADDRESS]"),
    ("It's 7060 Hollywood Blvd Apt 4B, Los Angeles, CA 90028.", "It's [ADDRESS]."),
    ("Mail: PO Box 1234, Austin, TX 78701", "Mail: [ADDRESS]"),
    ("We moved to Austin, TX 78701 in May", "We moved to [ADDRESS] in May"),
    ("12 Oak Lane\nSpringfield, IL 62704\n", "[ADDRESS]\n"),
    ("HQ: 1 Infinite Loop, Cupertino, CA 95014", "HQ: [ADDRESS]"),
    # NAME
    ("Hi, my name is Jane Doe.", "Hi, my name is [NAME]."),
    ("I'm John Smith from Ohio", "I'm [NAME] from Ohio"),
    ("Hello! I am Priya and I need help", "Hello! I am [NAME] and I need help"),
    ("Regards,\nJane Doe", "Regards,\n[NAME]"),
    ("Thanks, John", "Thanks, [NAME]"),
    ("See you then. Best, Anna Smith", "See you then. Best, [NAME]"),
    ("Cheers, Bob", "Cheers, [NAME]"),
    ("Yours sincerely,\nMary Ann Evans", "Yours sincerely,\n[NAME]"),
    ("Got it — Thanks, Sarah", "Got it — Thanks, [NAME]"),
    ("Kind regards,\n\nJohn F. Kennedy\n", "Kind regards,\n\n[NAME]\n"),
    ("Call me Ishmael.", "Call me [NAME]."),
    ("Please contact Maria Garcia at the front desk", "Please contact [NAME] at the front desk"),
    ("Name: Sean O'Brien", "Name: [NAME]"),
    ("Dr. Emily Chen will see you now", "Dr. [NAME] will see you now"),
    ("Mr and Mrs. Robinson", "Mr and Mrs. [NAME]"),
    ("Prof. Marie-Claire Dubois", "Prof. [NAME]"),
    ("Dear José,\nthank you", "Dear [NAME],\nthank you"),
    ("Thanks, Dr. McDonald", "Thanks, Dr. [NAME]"),
    ("Is Dr. Smith's office open?", "Is Dr. [NAME]'s office open?"),
    ("From: Bob Jones <bob.jones@example.com>", "From: [NAME] <[EMAIL]>"),
    # URL_CREDENTIALS
    ("DSN postgres://admin:s3cret@db.internal:5432/app", "DSN postgres://[URL_CREDENTIALS]/app"),
    # Several kinds in one message
    (
        "Contact Jane Doe at jane@example.com or 415-555-0132. Card: 4111-1111-1111-1111.",
        "Contact [NAME] at [EMAIL] or [PHONE]. Card: [CARD].",
    ),
    (
        "Hi, I'm Tom Baker, I live at 42 Elm St., Springfield, IL 62704, SSN 219-09-9999",
        "Hi, I'm [NAME], I live at [ADDRESS], SSN [SSN]",
    ),
]

# (input, kind, exact matched text)
FOUND = [
    ("write to jane.doe+news@mail.example.co.uk!", "EMAIL", "jane.doe+news@mail.example.co.uk"),
    ("call +44 20 7946 0958 now", "PHONE", "+44 20 7946 0958"),
    ("call +1 (415) 555-0132 now", "PHONE", "+1 (415) 555-0132"),
    ("pay with 4111-1111-1111-1111 today", "CARD", "4111-1111-1111-1111"),
    ("IBAN DE89 3704 0044 0532 0130 00 ok", "IBAN", "DE89 3704 0044 0532 0130 00"),
    ("ssn 078-05-1120", "SSN", "078-05-1120"),
    ("ip=10.0.0.254;", "IP", "10.0.0.254"),
    ("account number 4111 1111 1111 1112", "ACCOUNT", "4111 1111 1111 1112"),
    ("at 1600 Pennsylvania Avenue NW today", "ADDRESS", "1600 Pennsylvania Avenue NW"),
    ("my name is Jean-Luc Picard.", "NAME", "Jean-Luc Picard"),
    ("Regards,\nJane Doe\nSent from my phone", "NAME", "Jane Doe"),
    ("https://alice:hunter2@example.com/x", "URL_CREDENTIALS", "alice:hunter2@example.com"),
]

# Text that must come back unchanged.
UNCHANGED = [
    "The meeting is at 10:30 on 2024-05-17.",
    "In 2024 we shipped 1,250 units.",
    "It costs $1,299.99 (was $1,499.00).",
    "Upgrade to version 1.2.3 or v2.10.4 today.",
    "Python 3.11.7 with numpy 1.26.4",
    "Windows build 10.0.19041.1 installed",
    "Order 3 boxes of 24 pens, SKU 48213, qty 120.",
    "Tracking 4111 1111 1111 1112 shipped",
    "ref 1234567890123456",
    "O Romeo, Romeo, wherefore art thou Romeo?",
    "To be, or not to be, that is the question.",
    "Friends, Romans, countrymen, lend me your ears;",
    "But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.",
    "I am Happy to help",
    "I'm Sorry, I can't do that.",
    "I'm Going home, I am American after all.",
    "Thanks, I'll check.",
    "Thanks, Don't forget the milk.",
    "Hello World!",
    "Dear Sir or Madam,",
    "Chapter 12, page 345, line 6789",
    "Score was 3-1 after 90 minutes; 45,000 fans.",
    "Pi is 3.14159 and e is 2.71828.",
    "Call me tomorrow at 5.",
    "I have 2 accounts and 3 cards.",
    "Room temperature is 21.5 degrees at 14:45:30.",
    "Best regards",
    "Best, Worst, and the rest of the list.",
    "Madam Speaker, I rise to oppose the bill.",
    "I'm Excited to start and I am Working on it.",
    "Call 911 now, it is the 2023-2024 season.",
    "The 3 Musketeers read it in 1844.",
    "see section 4.2.1 and RFC 5322",
    "000-12-3456 and 666-12-3456 are not valid SSNs",
    "address 999.300.1.1 is not an IP",
]


@pytest.mark.parametrize(("text", "expected"), SCRUBBED)
def test_scrub_masks_pii(text: str, expected: str) -> None:
    assert scrub(text) == expected


@pytest.mark.parametrize(("text", "kind", "matched"), FOUND)
def test_find_pii_reports_kind_and_exact_text(text: str, kind: str, matched: str) -> None:
    found = [(m.kind, m.text) for m in find_pii(text)]
    assert (kind, matched) in found


@pytest.mark.parametrize("text", UNCHANGED)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert find_pii(text) == []
    assert scrub(text) == text
    assert not contains_pii(text)


ALL_TEXTS = [t for t, _ in SCRUBBED] + [t for t, _, _ in FOUND] + UNCHANGED


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_scrub_is_idempotent(text: str) -> None:
    once = scrub(text)
    assert scrub(once) == once
    assert not contains_pii(once)


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_matches_are_sorted_disjoint_and_consistent(text: str) -> None:
    matches = find_pii(text)
    assert contains_pii(text) == bool(matches)
    for m in matches:
        assert isinstance(m, PiiMatch)
        assert m.kind in KINDS
        assert 0 <= m.start < m.end <= len(text)
        assert text[m.start : m.end] == m.text
    for a, b in zip(matches, matches[1:], strict=False):
        assert a.end <= b.start


def test_required_kinds_exist() -> None:
    required = {"EMAIL", "PHONE", "CARD", "IBAN", "ACCOUNT", "SSN", "IP", "ADDRESS", "NAME"}
    assert required <= set(KINDS)
    assert len(set(KINDS)) == len(KINDS)


def test_luhn_decides_card_versus_nothing() -> None:
    assert [m.kind for m in find_pii("4111111111111111")] == ["CARD"]
    assert find_pii("4111111111111112") == []
    assert [m.kind for m in find_pii("account number 4111111111111112")] == ["ACCOUNT"]


def test_iban_needs_a_valid_checksum() -> None:
    assert find_pii("DE89 3704 0044 0532 0130 00") != []
    assert find_pii("DE88 3704 0044 0532 0130 00") == []


def test_overlap_longest_wins() -> None:
    # An email inside URL credentials is swallowed by the longer URL_CREDENTIALS match.
    matches = find_pii("ftp://bob:pw@files.example.com/")
    assert [m.kind for m in matches] == ["URL_CREDENTIALS"]


# ------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------

_LOCAL = st.from_regex(r"[A-Za-z0-9]{1,10}(?:[._+-][A-Za-z0-9]{1,8}){0,2}", fullmatch=True)
_LABEL = st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True)
_TLD = st.sampled_from(["com", "org", "io", "de", "co.uk", "example"])


@st.composite
def emails(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_LABEL, min_size=1, max_size=3))
    return f"{draw(_LOCAL)}@{'.'.join(labels)}.{draw(_TLD)}"


@st.composite
def luhn_cards(draw: st.DrawFn) -> str:
    length = draw(st.integers(13, 19))
    body = [draw(st.integers(1, 9))] + draw(
        st.lists(st.integers(0, 9), min_size=length - 2, max_size=length - 2)
    )
    total = 0
    for i, d in enumerate(reversed(body)):  # the check digit will sit to the right
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    digits = "".join(map(str, body)) + str((10 - total % 10) % 10)
    assume(len(set(digits)) > 1)
    sep = draw(st.sampled_from(["", " ", "-"]))
    return sep.join(digits[i : i + 4] for i in range(0, len(digits), 4))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_scrub_never_raises_and_is_idempotent(text: str) -> None:
    once = scrub(text)
    assert isinstance(once, str)
    assert scrub(once) == once
    assert contains_pii(text) == bool(find_pii(text))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40), st.one_of(emails(), luhn_cards()), st.text(max_size=40))
def test_inserted_email_or_card_never_survives(prefix: str, secret: str, suffix: str) -> None:
    assume(secret not in prefix + suffix)
    text = f"{prefix}\n{secret}\n{suffix}"
    out = scrub(text)
    assert secret not in out
    assert ("[EMAIL]" in out) or ("[CARD]" in out)
