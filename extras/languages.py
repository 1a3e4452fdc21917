"""
Other languages (VALL-E X, arXiv 2303.03926): German, Spanish and French text to IPA phones
through the eSpeak NG program, cut into the phone table's symbols (valle.IPA). Importing this
module gives valle.text_to_ids these languages:

    import valle
    from extras import languages  # noqa: F401  (registers de, es, fr)
    valle.text_to_ids("Guten Morgen.", "de")

English keeps g2p-en and ARPAbet (valle.py). The language table, the IPA symbols and the
language embedding are the model's and stay in valle.py; this is only the frontend. Needs
the espeak-ng program. docs/languages.md has the measurements.
"""
import re
import unicodedata

import valle
from extras import long_text

ESPEAK_VOICES = {"de": "de", "es": "es", "fr": "fr-fr"}  # English keeps g2p-en and ARPAbet
ESPEAK_INSTALL = "sudo apt-get install espeak-ng (Debian, Ubuntu) or brew install espeak-ng (macOS)"


def _espeak(clauses, voice):
    """Clauses -> eSpeak NG's IPA for each. One call reads them a line each and answers a line
    per clause; should it answer otherwise (it splits a clause it finds too long), each clause
    gets a call of its own."""
    import subprocess

    def run(text):
        try:
            out = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", voice], input=text,
                                 capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise FileNotFoundError("espeak-ng is missing (it phonemizes the languages other "
                                    f"than English): {ESPEAK_INSTALL}") from None
        except subprocess.TimeoutExpired:
            raise ValueError(f"espeak-ng gave no answer in 60 s for {text[:60]!r}") from None
        if out.returncode:
            raise ValueError(f"espeak-ng failed: {out.stderr.strip()[:200]}")
        return out.stdout.splitlines()
    lines = run("\n".join(clauses))
    return lines if len(lines) == len(clauses) else [" ".join(run(c)) for c in clauses]


def segment_ipa(ipa):
    """eSpeak NG's IPA for one clause -> symbols, with word boundaries between its words.

    What eSpeak writes (NG 1.51 and 1.52): the stress marks ˈ ˌ just before the stressed
    vowel; the length mark ː after its vowel; diphthongs and affricates as two letters, with a
    tie bar in some words and versions and not in others; diacritics (nasal ˜, cedilla ç) as
    combining marks after their letter; in French, "-" linking words (liaison, "le-z"); and
    "(en)" where it read a word by another language's rules. So: tie bars, links and language
    switches are dropped, then each word is cut left to right into two-letter units
    (valle.IPA_UNITS) where one starts, else single letters; a combining mark joins the symbol before
    it; stress and length marks are symbols of their own. Symbols outside the table come back
    as they are: text_to_ids reads them as <unk>."""
    ipa = re.sub(r"\([a-z]{2,3}(-[a-z]+)?\)", " ", unicodedata.normalize("NFD", ipa))
    ipa = ipa.replace("\u0361", "").replace("\u035c", "").replace("-", "")  # ties, links
    symbols = []
    for word in ipa.split():
        cut, i = [], 0
        while i < len(word):
            if unicodedata.category(word[i]) == "Mn":  # a diacritic: part of the symbol before
                if cut:
                    cut[-1] += word[i]
                i += 1
                continue
            n = 2 if unicodedata.normalize("NFC", word[i: i + 2]) in valle.IPA_UNITS else 1
            cut.append(word[i: i + n])
            i += n
        symbols += [unicodedata.normalize("NFC", s) for s in cut] + [valle.WORD_BOUNDARY]
    return symbols[:-1]


# Clause marks -> the table's punctuation. The table is append-only and English's six marks
# were there first: ";" and ":" pause like "," and read as one.
CLAUSE_MARKS = {".": ".", "?": "?", "!": "!", ",": ",", ";": ",", ":": ","}


def clauses(text, language):
    """Text -> [(clause, the marks after it)]: cut after . , ; : ? ! where a space or the end
    follows, so "3,5" and "z.B." stay whole, and not after an abbreviation's period ("Dr.
    Müller": long_text.ABBREVIATIONS, shared with split_sentences)."""
    pieces, start = [], 0
    for mark in re.finditer(r"[.,;:?!]+(?=\s|$)", text):
        words = text[start: mark.start()].split()
        word = words[-1].lower().lstrip("\"'(\u201c\u201e\u00ab") if words else ""
        if mark.group() == "." and word in long_text.ABBREVIATIONS.get(language, ()):
            continue
        pieces.append((text[start: mark.start()], mark.group()))
        start = mark.end()
    return pieces + [(text[start:], "")]


def phonemize_ipa(text, language):
    """Text in a language other than English -> IPA symbols, punctuation, word boundaries.

    eSpeak reads punctuation but writes none: each clause ends its line instead. So the text
    is cut into clauses here, eSpeak phonemizes them (numbers and abbreviations included, by the
    language's rules), and the marks go back in between, as English's phones carry them. Other
    marks ("-", "'", quotes) are left to eSpeak, which reads them as part of the words ("s'il"
    is one word) and writes nothing for them."""
    text = unicodedata.normalize("NFC", text).replace("¿", " ").replace("¡", " ")
    pieces = clauses(text, language)
    # a clause with a letter or digit always makes eSpeak write a line (it spells what it
    # cannot read), so _espeak's count of lines per clause holds
    spoken = [c for c, _ in pieces if re.search(r"[^\W_]", c)]
    ipa = iter(_espeak(spoken, ESPEAK_VOICES[language]) if spoken else [])
    phones = []
    for clause, marks in pieces:
        if re.search(r"[^\W_]", clause):
            phones += segment_ipa(next(ipa)) + [valle.WORD_BOUNDARY]
        phones += [p for m in marks for p in (CLAUSE_MARKS[m], valle.WORD_BOUNDARY)]
    while phones and phones[-1] == valle.WORD_BOUNDARY:
        phones.pop()
    return phones


def count_unknown(ids):
    """How many text tokens are <unk>: symbols eSpeak wrote that the phone table lacks."""
    return sum(1 for t in ids if t % valle.PHONE_SLOTS == valle.UNK_ID)


def _register():
    """valle.text_to_ids reads every language through valle.PHONEMIZERS."""
    for language in ESPEAK_VOICES:
        valle.PHONEMIZERS[language] = lambda text, language=language: phonemize_ipa(text, language)


_register()
