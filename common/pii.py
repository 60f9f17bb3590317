"""On-device PII scrubbing: find and mask personal data in text before it is stored or trained on.

(One file on purpose, over the usual length: the detectors of every kind share the overlap
and priority rules of :func:`find_pii`; split, a new kind could be added without them.)

This module owns the detection and masking of personally identifying information (PII) in
free text: everything a user types, and every answer, is passed through :func:`scrub` before
it is persisted or used for training. The live conversation between a user and their own
local model is not scrubbed; scrubbed text shown back to a model goes through
:func:`naturalize`, so that no bracketed tag is there to copy.
It runs fully on the device, uses only the standard library and needs no network, no model
download and no spaCy / NER pipeline.

It is **pattern based**: regular expressions, tightened with checksums (Luhn for payment
cards, ISO 7064 mod-97 plus per-country lengths for IBANs, area/group rules for US SSNs, octet
ranges for IPv4, :mod:`ipaddress` for IPv6) and with context cues for the weaker kinds
(account numbers, person names). The kinds are listed in :data:`KINDS`:

* ``URL_CREDENTIALS``: ``scheme://user:password@host`` (the whole authority is masked).
* ``EMAIL``: addresses incl. plus-addressing and sub-domains (ASCII only).
* ``IBAN``: mod-97 valid IBANs of known countries, compact or in groups of four.
* ``CARD``: 13-19 digit numbers (optional single spaces/dashes) that pass the Luhn check.
* ``SSN``: US ``###-##-####`` with a valid area/group/serial, or 9 digits after an "SSN" cue.
* ``IP``: IPv4 with valid octets, IPv6 (full or ``::``-compressed, at least three groups).
* ``PHONE``: NANP (``+1 (415) 555-0132``, ``415-555-0132``, ``415.555.0132``), international
  ``+CC ...`` with 8-15 digits, national trunk-0 numbers (``020 7946 0958``) and any 7-15
  digit number after a cue such as "tel:" or "phone number".
* ``ACCOUNT``: digit runs after a cue ("account number", "acct #", "routing number",
  "sort code", "a/c no."); only the number is masked.
* ``ADDRESS``: house number + capitalized street name + common suffix (Street/St, Avenue/Ave,
  Road/Rd, Boulevard/Blvd, Lane/Ln, Drive/Dr, Court/Ct, Way, Place/Pl, ...), optionally with a
  direction, a unit ("Apt 4B"), a city, a US state + ZIP or a UK postcode; "City, ST 12345"
  lines; P.O. boxes.
* ``NAME``: capitalized names after a cue: honorifics (Mr., Mrs., Ms., Mx., Miss, Dr., Prof.,
  Sir, Madam), self-introductions ("my name is", "I'm", "I am", "call me"), "contact X at",
  sign-offs ("Regards,\\nJane Doe", "Thanks, John"), greetings ("Dear Jane,", "Hi Bob,") and
  labelled fields ("Name: X", "From: X"). The cue is kept, only the name is masked.

Limits, stated plainly:

* A name with no cue is **not** caught: "O Romeo, Romeo, wherefore art thou Romeo?" is left
  alone, and so is "Jane said hi" or a bare first name in the middle of a sentence. Names
  written in lower case ("my name is jane") and non-Latin scripts are not caught either.
* Cues are English only. Names after "I'm"/"I am" are filtered through a small stop list of
  common capitalized words ("I am Happy to help" is not a name), which also means that a real
  name that is on that list ("I'm Christian", "I'm Will") is missed, while a capitalized word
  that is not on it is masked ("I'm Batman"). Cues also fire in fiction: "Sir Toby" and "call
  me Ganymede" in a Shakespeare play are masked like any other name (about 460 matches in
  the 38 plays, all after a cue).
* Street addresses need a house number and a known street suffix; "the house by the church",
  non-English address formats ("5 Rue de Rivoli"), named buildings and addresses written in
  lower case are missed. A house number
  that is really a year ("In 1969 Abbey Road came out") is over-masked.
* Phone numbers without a cue need an international "+" prefix, a NANP 3-3-4 layout with
  separators, or a national trunk "0"; bare 7-digit local numbers need a cue. Card numbers
  must be a contiguous run (digits split by other characters are not re-joined); a Luhn-valid
  13-19 digit number is masked even when it is, say, a tracking number. IPv4 octets with
  leading zeros ("192.168.001.001") are not treated as addresses.
* No free-text identifiers: dates of birth, passport/driver's licence numbers, usernames,
  API keys and medical data are out of scope.

:func:`find_pii` returns non-overlapping matches sorted by position; when candidates overlap,
the longest wins, and among equally long ones the most specific kind (lowest index in
:data:`KINDS`). :func:`scrub` replaces each match with ``[KIND]`` and repeats until the text
is stable, so ``scrub(scrub(x)) == scrub(x)`` and ``contains_pii(scrub(x))`` is ``False``.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = [
    "KINDS",
    "PiiMatch",
    "contains_pii",
    "find_pii",
    "naturalize",
    "placeholder",
    "scrub",
]

#: Every kind :func:`find_pii` can report, most specific first (this order breaks length ties).
KINDS: tuple[str, ...] = (
    "URL_CREDENTIALS",
    "EMAIL",
    "IBAN",
    "CARD",
    "SSN",
    "IP",
    "PHONE",
    "ACCOUNT",
    "ADDRESS",
    "NAME",
)
_PRIORITY = {kind: i for i, kind in enumerate(KINDS)}

# scrub() re-runs until nothing is found; each pass masks at least one character of original
# text, so this bound is only a guard against a bug, never reached on real input.
_MAX_PASSES = 8


@dataclass(frozen=True)
class PiiMatch:
    """One piece of PII found in a text.

    Attributes:
        kind: One of :data:`KINDS`.
        start: Offset of the first character of the match in the scanned text.
        end: Offset one past the last character (``text[start:end] == match.text``).
        text: The matched characters.
    """

    kind: str
    start: int
    end: int
    text: str


def placeholder(kind: str) -> str:
    """Return the mask that :func:`scrub` puts in place of a match of ``kind``, e.g. ``[EMAIL]``.

    Args:
        kind: One of :data:`KINDS`.

    Returns:
        The placeholder string.
    """
    return f"[{kind}]"


# --------------------------------------------------------------------------------------------
# Checksums and validators
# --------------------------------------------------------------------------------------------


def _digits(s: str) -> str:
    return "".join(c for c in s if "0" <= c <= "9")


def _luhn_ok(digits: str) -> bool:
    """Luhn (mod-10) check of an all-digit string."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# ISO 13616 IBAN lengths per country (SWIFT IBAN registry).
_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def _iban_ok(compact: str) -> bool:
    """Country length and mod-97 check of an IBAN without spaces (upper case)."""
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def _ssn_ok(digits: str) -> bool:
    """US SSN rules: area not 000/666/9xx, group not 00, serial not 0000."""
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in ("000", "666") or area[0] == "9":
        return False
    return group != "00" and serial != "0000"


def _ipv6_ok(s: str) -> bool:
    groups = [g for g in s.split(":") if g]
    if len(groups) < 3 or ("::" not in s and s.count(":") != 7):
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Patterns. Digit-oriented ones are compiled with re.ASCII so that \d, \w and \b only mean
# ASCII; separators are horizontal (space, tab, dot, dash) so no match runs across lines
# except where a line break is part of the form (sign-offs, multi-line addresses).
# --------------------------------------------------------------------------------------------

_A = re.ASCII
_AI = re.ASCII | re.IGNORECASE

_URL_CREDENTIALS = re.compile(
    r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://"
    r"(?P<v>[^\s:/?#@\[\]]{1,256}:[^\s/?#@\[\]]{1,256}@[^\s/?#\[\]<>\"']{1,256})",
    _A,
)

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])"
    r"[A-Za-z0-9_%+-][A-Za-z0-9._%+-]{0,63}"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9-])",
    _A,
)

_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])", _A)

# 13-19 digits with optional single space/dash separators; only maximal runs are considered.
_CARD = re.compile(r"(?<![0-9+-])[0-9](?:[ -]?[0-9]){12,18}(?![ -]?[0-9])", _A)

_SSN = re.compile(r"(?<![0-9-])[0-9]{3}-[0-9]{2}-[0-9]{4}(?![0-9]|-[0-9])", _A)
_SSN_CUE = re.compile(
    r"\b(?:ssn|social[ \t]+security(?:[ \t]+(?:number|num|no\.?|\#))?)"
    r"[ \t]*(?:(?::|\#|is)[ \t]*)?"
    r"(?P<v>[0-9]{3}([ -]?)[0-9]{2}\2[0-9]{4})(?![0-9])",
    _AI,
)

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(
    rf"(?<![0-9A-Za-z.]){_OCTET}(?:\.{_OCTET}){{3}}(?![0-9]|\.[0-9])",
    _A,
)
_IPV6 = re.compile(
    r"(?<![0-9A-Za-z:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z:])", _A
)
_VERSION_CUE = re.compile(r"(?:version|release|build|ver\.?)[ \t]*$", re.IGNORECASE)

# Phones. Each alternative ends where no further digit group follows.
_PHONE_END = r"(?![0-9]|[ .-][0-9])"
_PHONE = re.compile(
    r"(?<![0-9A-Za-z+.-])(?:"
    # NANP with optional +1: (415) 555-0132, 415-555-0132, 415.555.0132, 415 555 0132.
    r"(?:\+?1[ .-]?)?(?:\([2-9][0-9]{2}\)[ .-]?[2-9][0-9]{2}[ .-][0-9]{4}"
    r"|[2-9][0-9]{2}(?P<sep>[ .-])[2-9][0-9]{2}(?P=sep)[0-9]{4})"
    # +1 followed by 10 digits without separators.
    r"|\+1[2-9][0-9]{2}[2-9][0-9]{6}"
    # National numbers with a trunk 0: 020 7946 0958, (020) 7946 0958, 030 1234567.
    r"|(?:\(0[0-9]{1,4}\)|0[0-9]{1,4})[ .-]?[0-9]{3,4}[ .-]?[0-9]{3,4}"
    r")" + _PHONE_END,
    _A,
)
# International: +CC then digit groups, 8-15 digits in all (checked in code).
_PHONE_INTL = re.compile(
    r"(?<![0-9A-Za-z+])\+[1-9][0-9]{0,2}(?:[ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,5})){1,7}" + _PHONE_END,
    _A,
)
_PHONE_CUE = re.compile(
    r"\b(?:phone|tel|telephone|mobile|cell|cellphone|fax|whatsapp)"
    r"(?:[ \t]+(?:number|num|no\.?|\#))?[ \t]*(?:(?::|\#|is|=)[ \t]*)?"
    r"(?P<v>\+?(?:\([0-9]{1,4}\)|[0-9])(?:[ .-]?(?:\([0-9]{1,4}\)|[0-9])){5,18})" + _PHONE_END,
    _AI,
)

_ACCOUNT = re.compile(
    r"\b(?:"
    r"(?:(?:bank|checking|savings|current|chequing|credit[ \t]+card)[ \t]+)?"
    r"(?:account|acct\.?|a/c)(?:[ \t]*(?:number|num\.?|no\.?|nr\.?|\#))?"
    r"|routing(?:[ \t]*(?:number|num\.?|no\.?|\#))?"
    r"|(?:aba|bsb|rtn)(?:[ \t]*(?:number|num\.?|no\.?|\#))?"
    r"|sort[ \t]*code"
    r")[ \t]*(?:(?::|\#|=|is|-)[ \t]*)?"
    r"(?P<v>[0-9](?:[ -]?[0-9]){5,33})(?![ -]?[0-9])",
    _AI,
)

# Street addresses (case-sensitive: street names are capitalized).
_STREET_SUFFIX_WORD = (
    r"(?:Street|Avenue|Road|Boulevard|Lane|Drive|Court|Way|Place|Terrace|Highway|Parkway"
    r"|Circle|Square|Crescent|Close|Alley|Trail|Plaza|Row|Walk|Gardens|Grove|Mews|Loop)"
)
_STREET_SUFFIX_ABBR = r"(?:St|Ave|Av|Rd|Blvd|Ln|Dr|Ct|Pl|Ter|Hwy|Pkwy|Cir|Sq|Cres)"
_DIRECTION = r"(?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)"
_STREET_WORD = r"(?:[A-Z][A-Za-z'’-]+|[0-9]{1,3}(?:st|nd|rd|th))"
_CITY = r"[A-Z][a-z]+(?:[ -][A-Z][a-z]+){0,2}"
_US_STATES = (
    "AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH"
    "|NJ|NM|NY|NC|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|PR|GU|VI"
)
_STATE = rf"(?:{_US_STATES})(?![A-Za-z0-9])"
_ZIP = r"[0-9]{5}(?:-[0-9]{4})?(?![0-9])"
_UK_POSTCODE = r"[A-Z]{1,2}[0-9][A-Z0-9]?[ \t]?[0-9][A-Z]{2}(?![A-Za-z0-9])"
_POSTAL = rf"(?:,?[ \t]+{_UK_POSTCODE}|,?[ \t]+{_STATE}(?:[ \t]+{_ZIP})?|,?[ \t]+{_ZIP})"
_ADDRESS_TAIL = (
    # An optional unit, then either ", City [postal]" or a line break + "City postal".
    r"(?:,?[ \t]+(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl|Room|Rm)\.?[ \t]*(?:\#[ \t]*)?"
    r"[A-Za-z0-9-]{1,6}(?![A-Za-z0-9])|,?[ \t]*\#[ \t]*[A-Za-z0-9-]{1,6}(?![A-Za-z0-9]))?"
    rf"(?:,[ \t]*{_CITY}{_POSTAL}?|[ \t]*\r?\n[ \t]*{_CITY}{_POSTAL}|{_POSTAL})?"
)
_ADDRESS = re.compile(
    r"(?<![\w$£€.,/:-])"
    r"[0-9]{1,6}[A-Za-z]?(?:-[0-9]{1,4})?[ \t]+"
    rf"(?:{_DIRECTION}\.?[ \t]+)?"
    rf"{_STREET_WORD}(?:[ \t]+{_STREET_WORD}){{0,3}}[ \t]+"
    rf"(?:{_STREET_SUFFIX_WORD}|{_STREET_SUFFIX_ABBR}(?:\.(?=,))?)(?![\w])"
    rf"(?:[ \t]+(?:N|S|E|W|NE|NW|SE|SW)(?![\w]))?" + _ADDRESS_TAIL
)
_PO_BOX = re.compile(
    r"\b(?i:P\.?[ \t]?O\.?[ \t]*Box|Post[ \t]+Office[ \t]+Box)[ \t]+[0-9]{1,7}(?![0-9])"
    + _ADDRESS_TAIL
)
_CITY_STATE_ZIP = re.compile(rf"(?<![\w])(?:{_CITY}),[ \t]*{_STATE}[ \t]+{_ZIP}")

# Person names (case-sensitive; the cue is matched separately and kept).
_UP = "A-ZÀ-ÖØ-Þ"
_LO = "a-zß-öø-ÿ"
# A whole capitalized word (O'Brien, McDonald, Jean-Luc), possibly possessive ("Smith's").
_NAME_WORD = (
    rf"(?:[{_UP}][{_LO}]+(?:['’-]?[{_UP}][{_LO}]+)?|[{_UP}]['’][{_UP}][{_LO}]+)"
    r"(?!\w|['’](?!s\b)\w)"
)
_FULL_NAME = rf"{_NAME_WORD}(?:[ \t]+(?:[{_UP}]\.[ \t]*)?{_NAME_WORD}){{0,2}}"

_HONORIFIC = r"(?:Mr|Mrs|Ms|Mx|Miss|Dr|Prof|Sir|Madam|Mme|Mlle)"
# Start of a line, of a sentence, or a dash: "Regards,", "Great. Thanks, Jo", "ok — Thanks, Jo".
_SIGN_OFF_LEAD = (
    r"(?:^[ \t]*(?:[-–—]+[ \t]*)?|(?<=[.!?;])[ \t]+(?:[-–—]+[ \t]*)?|(?<=[ \t])[-–—]+[ \t]*)"
)
_SIGN_OFF_GAP = r"(?:[ \t]*,[ \t]*(?:\r?\n[ \t]*){0,2}|[ \t]*(?:\r?\n[ \t]*){1,2})(?:[-–—]+[ \t]*)?"
# Unambiguous sign-offs: a capitalized word right after them is a name (or on the stop list).
_SIGN_OFF = (
    r"(?i:(?:(?:best|kind|warm|warmest|many|with)[ \t]+)?regards|thanks|thank[ \t]+you"
    r"|many[ \t]+thanks|thx|cheers|sincerely|yours[ \t]+(?:truly|sincerely|faithfully)"
    r"|take[ \t]+care|all[ \t]+the[ \t]+best|respectfully)"
)
# Words that are also ordinary prose ("Best, Worst, and the rest"): the name must end the line.
_WEAK_SIGN_OFF = r"(?i:best(?:[ \t]+wishes)?|love|yours|xoxo)"
_END_OF_LINE = r"(?=[ \t]*[.!]?[ \t]*(?:\r?\n|$))"
_NAME_PATTERNS: tuple[tuple[re.Pattern[str], bool], ...] = tuple(
    (re.compile(cue + rf"(?P<v>{_FULL_NAME})" + after, re.MULTILINE), strict)
    for cue, after, strict in (
        # Honorifics: "Dr. Jane Doe", "Mr Smith", "Sir John".
        (rf"\b{_HONORIFIC}\.?[ \t]+", "", False),
        # Self-introductions.
        (r"(?i:\bmy[ \t]+name[ \t]*(?:is|['’]s)|\bname['’]s|\bi[ \t]+am[ \t]+called"
         r"|\bi['’]m[ \t]+called|\bcall[ \t]+me)[ \t]+", "", True),
        (r"\bI(?:['’]m|[ \t]+am)[ \t]+", "", True),
        # "contact Jane Doe at ...", "reach out to Bob on Slack".
        (r"(?i:\b(?:contact|ask[ \t]+for|speak[ \t]+(?:to|with)|reach[ \t]+out[ \t]+to"
         r"|talk[ \t]+to))[ \t]+", r"(?=[ \t]+(?i:at|on|via|by)\b|[ \t]*[(<])", True),
        # Sign-offs at the start of a line or a sentence, name on the same or next line(s).
        (_SIGN_OFF_LEAD + _SIGN_OFF + _SIGN_OFF_GAP, "", True),
        (_SIGN_OFF_LEAD + _WEAK_SIGN_OFF + _SIGN_OFF_GAP, _END_OF_LINE, True),
        # Greetings: "Dear Jane,", "Hi Bob!".
        (r"(?:\bDear|(?:^[ \t]*|(?<=[.!?])[ \t]+)(?i:hi|hello|hey))[ \t]+",
         r"(?=[ \t]*(?:[,!:]|\r?\n|$))", True),
        # Labelled fields and mail headers: "Name: Jane Doe", "From: Bob Jones <bob@x.com>".
        (r"(?i:\b(?:(?:full|first|last|given|family|contact|customer|patient|user)[ \t]*)?name"
         r"|^[ \t]*(?:from|to|cc|bcc|reply-to|sender|attn|signed))[ \t]*:[ \t]*", "", False),
    )
)  # fmt: skip

# Capitalized words that follow name cues but are not names. The first word of a candidate
# name must not be one of these (for strict cues); trailing ones are trimmed off.
_NOT_A_NAME_WORDS = """
    a about actually afraid again ago all almost also always am american an and angry another
    any anyone anything anytime anyway are around as asking at available aware away awesome
    back bad based be because been being best better big bored both british busy but by bye
    calling can canadian catholic certain christian colleagues coming completely confused
    could currently customer customers dad daddy dear definitely delighted did do does doing
    done down during each early either else english even ever every everybody everyone
    everything excited exhausted extremely fairly feeling fine finished folks for french
    friday friends from fully german getting glad going gone good got great guys had happy
    has have he hello help her here hers hey hi him hindu hiring his hoping how however i
    if im in indeed indian interested irish is it its jewish just keen kind lady last late
    later leaving let like likely little looking lost lucky ma'am madam major manager many
    married may maybe me mexican might mine miss mom mommy monday more most mr mrs ms much
    muslim mx my myself near nearly needing neither nervous never new next nice no none nor
    not nothing now of off ok okay old on once one only open or other our ours out over
    own perfectly please pleased pretty prof professor proud quite rather ready really
    retired right sad safe same saturday scared see she should sick since single sir so some
    someone something sometimes soon sorry still such sunday support sure surprised talk
    team than thank thankful thanks that the their them then there these they thinking
    this those though thrilled through thursday tired to today together tomorrow tonight
    too totally trying tuesday unable under until up upset us very waiting was we wednesday
    welcome well were what when where which while who whoever why will with without
    wondering world worried would yes yesterday yet you your yours yourself
    january february march july august september october november december
    doctor dr mister sales service services billing admin hr it's i'm i'll i've
    speaker president chair chairman chairwoman secretary officer
"""
_NOT_A_NAME = frozenset(_NOT_A_NAME_WORDS.split())


# --------------------------------------------------------------------------------------------
# Detectors: each yields (kind, start, end) candidates.
# --------------------------------------------------------------------------------------------

_Candidate = tuple[str, int, int]


def _group_span(m: re.Match[str], group: str = "v") -> tuple[int, int]:
    return m.start(group), m.end(group)


def _find_url_credentials(text: str) -> Iterator[_Candidate]:
    for m in _URL_CREDENTIALS.finditer(text):
        yield ("URL_CREDENTIALS", *_group_span(m))


def _find_emails(text: str) -> Iterator[_Candidate]:
    for m in _EMAIL.finditer(text):
        yield "EMAIL", m.start(), m.end()


def _find_ibans(text: str) -> Iterator[_Candidate]:
    for m in _IBAN.finditer(text):
        s = m.group()
        # The greedy match may run into a following code word; try every shorter end that
        # falls on a group boundary, longest first.
        for end in range(len(s), 14, -1):
            if end < len(s) and s[end] != " ":
                continue
            if s[end - 1] == " ":
                continue
            if _iban_ok(s[:end].replace(" ", "")):
                yield "IBAN", m.start(), m.start() + end
                break


def _find_cards(text: str) -> Iterator[_Candidate]:
    for m in _CARD.finditer(text):
        digits = _digits(m.group())
        if digits[0] != "0" and len(set(digits)) > 1 and _luhn_ok(digits):
            yield "CARD", m.start(), m.end()


def _find_ssns(text: str) -> Iterator[_Candidate]:
    for m in _SSN.finditer(text):
        if _ssn_ok(_digits(m.group())):
            yield "SSN", m.start(), m.end()
    for m in _SSN_CUE.finditer(text):
        if _ssn_ok(_digits(m.group("v"))):
            yield ("SSN", *_group_span(m))


def _find_ips(text: str) -> Iterator[_Candidate]:
    for m in _IPV4.finditer(text):
        before = text[max(0, m.start() - 12) : m.start()]
        if before.endswith(("v", "V")) or _VERSION_CUE.search(before):
            continue
        yield "IP", m.start(), m.end()
    for m in _IPV6.finditer(text):
        if _ipv6_ok(m.group()):
            yield "IP", m.start(), m.end()


def _find_phones(text: str) -> Iterator[_Candidate]:
    for m in _PHONE.finditer(text):
        if 10 <= len(_digits(m.group())) <= 11:
            yield "PHONE", m.start(), m.end()
    for m in _PHONE_INTL.finditer(text):
        if 8 <= len(_digits(m.group())) <= 15:
            yield "PHONE", m.start(), m.end()
    for m in _PHONE_CUE.finditer(text):
        if 7 <= len(_digits(m.group("v"))) <= 15:
            yield ("PHONE", *_group_span(m))


def _find_accounts(text: str) -> Iterator[_Candidate]:
    for m in _ACCOUNT.finditer(text):
        yield ("ACCOUNT", *_group_span(m))


def _find_addresses(text: str) -> Iterator[_Candidate]:
    for pattern in (_ADDRESS, _PO_BOX, _CITY_STATE_ZIP):
        for m in pattern.finditer(text):
            yield "ADDRESS", m.start(), m.end()


_NAME_SPLIT = re.compile(r"[ \t]+")


def _find_names(text: str) -> Iterator[_Candidate]:
    for pattern, strict in _NAME_PATTERNS:
        for m in pattern.finditer(text):
            start, end = _group_span(m)
            name = text[start:end]
            words = _NAME_SPLIT.split(name)
            first = words[0].lower()
            if first in _NOT_A_NAME or (strict and first.endswith("ing")):
                continue
            while len(words) > 1 and words[-1].lower() in _NOT_A_NAME:
                name = name[: name.rfind(words.pop())].rstrip()
            yield "NAME", start, start + len(name)


_DETECTORS: tuple[Callable[[str], Iterator[_Candidate]], ...] = (
    _find_url_credentials,
    _find_emails,
    _find_ibans,
    _find_cards,
    _find_ssns,
    _find_ips,
    _find_phones,
    _find_accounts,
    _find_addresses,
    _find_names,
)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def find_pii(text: str) -> list[PiiMatch]:
    """Find PII in ``text``.

    Args:
        text: Any string.

    Returns:
        Non-overlapping matches sorted by ``start``. Where candidates overlap, the longest one
        is kept; among equally long ones, the kind listed first in :data:`KINDS`.
    """
    candidates = {c for detect in _DETECTORS for c in detect(text) if c[2] > c[1]}
    ranked = sorted(candidates, key=lambda c: (c[1] - c[2], _PRIORITY[c[0]], c[1]))
    starts: list[int] = []  # kept spans, sorted by start; they never overlap
    ends: list[int] = []
    kinds: list[str] = []
    for kind, start, end in ranked:
        i = bisect_left(starts, start)
        if i > 0 and ends[i - 1] > start:
            continue
        if i < len(starts) and starts[i] < end:
            continue
        starts.insert(i, start)
        ends.insert(i, end)
        kinds.insert(i, kind)
    return [PiiMatch(k, s, e, text[s:e]) for k, s, e in zip(kinds, starts, ends, strict=True)]


def _mask(text: str, matches: list[PiiMatch]) -> str:
    parts: list[str] = []
    pos = 0
    for m in matches:
        parts.append(text[pos : m.start])
        parts.append(placeholder(m.kind))
        pos = m.end
    parts.append(text[pos:])
    return "".join(parts)


def scrub(text: str) -> str:
    """Replace every piece of PII in ``text`` by its placeholder (``[EMAIL]``, ``[NAME]``, ...).

    Cue words are kept ("my name is [NAME]", "account number [ACCOUNT]"). Masking can bring
    new text together, so the scan is repeated until nothing more is found; the result is a
    fixed point: ``scrub(scrub(text)) == scrub(text)``.

    Args:
        text: Any string.

    Returns:
        The text with all matches of :func:`find_pii` masked.
    """
    for _ in range(_MAX_PASSES):
        matches = find_pii(text)
        if not matches:
            break
        text = _mask(text, matches)
    return text


def contains_pii(text: str) -> bool:
    """Return whether :func:`find_pii` finds anything in ``text``.

    Args:
        text: Any string.

    Returns:
        ``True`` if at least one match is found.
    """
    return bool(find_pii(text))


# What each placeholder reads as inside a prompt: plain words a model does not copy as a tag.
_NATURAL = {
    "URL_CREDENTIALS": "a private link",
    "EMAIL": "an email address",
    "IBAN": "a bank account",
    "CARD": "a card number",
    "SSN": "an ID number",
    "IP": "an IP address",
    "PHONE": "a phone number",
    "ACCOUNT": "an account number",
    "ADDRESS": "an address",
    "NAME": "someone",
}
_PLACEHOLDER = re.compile(r"\[(" + "|".join(KINDS) + r")\]")


def naturalize(text: str) -> str:
    """Turn :func:`scrub`'s placeholders into plain words ("[EMAIL]" -> "an email address").

    Scrubbed text shown to a model (retrieved history, feedback examples) must not teach it to
    write bracketed tags back to the user. The result holds no more PII than the scrubbed input.

    Args:
        text: Text already passed through :func:`scrub`.

    Returns:
        The text with every placeholder replaced by a neutral phrase.
    """
    return _PLACEHOLDER.sub(lambda m: _NATURAL[m.group(1)], text)
