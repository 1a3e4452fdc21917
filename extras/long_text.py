"""
Long text: any length of text in one voice, spoken in chunks of whole sentences that fit the
model's position tables, and the chunks' waveforms joined into one.

    from extras import long_text
    chunks = long_text.generate_long(ar, nar, story, prompt_codes, prompt_text)  # per candidate
    wav = long_text.join_speech([codec.decode(c) for c in chunks[0][1]])

One model call is limited by its tables (prompt + speech at most 40 s at the paper's size), so
the text is split into sentences (split_sentences), packed into chunks with margin
(chunk_text, chunk_frames), spoken with batched.generate, and joined (join_speech). docs/long-text.md
has the measurements.
"""
import re
from functools import lru_cache

import torch

import valle
from extras import audio, batched

# Where sentences end, by language. A period after one of these
# abbreviations ends no sentence; nor after those of the second table when a number follows
# ("No. 5", "5 Dec. 2020"), nor after a single letter other than "I" (an initial: "J. R. R.").
ABBREVIATIONS = {
    "en": {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "e.g", "i.e", "inc",
           "ltd", "corp", "dept", "capt", "approx", "a.m", "p.m", "u.s", "u.k"},
    "de": {"dr", "prof", "hr", "fr", "z.b", "d.h", "u.a", "bzw", "usw", "ca", "evtl", "str"},
    "es": {"sr", "sra", "srta", "dr", "dra", "ud", "uds", "etc", "p.ej", "av"},
    "fr": {"m", "mme", "mlle", "dr", "pr", "etc", "p.ex", "av", "bd"},
}
NUMBER_ABBREVIATIONS = {
    "en": {"no", "nos", "vol", "fig", "p", "pp", "ch", "jan", "feb", "mar", "apr", "jun", "jul",
           "aug", "sep", "sept", "oct", "nov", "dec"},
    "de": {"nr", "s", "bd", "jan", "feb", "apr", "aug", "sept", "okt", "nov", "dez"},
    "es": {"núm", "pág", "vol", "cap"},
    "fr": {"no", "p", "vol", "chap"},
}
SENTENCE_END = re.compile(r"[.!?]+[\"')\]\u201d\u2019]*\s+")  # . ! ? and closing quotes, a space
FRAMES_PER_PHONE = 8  # chunk sizing: read English takes about 5.4 frames per phone: margin
CROSSFADE_SECONDS = 0.05  # where two chunks' waveforms overlap


def split_sentences(text, language="en"):
    """Text -> sentences: each paragraph (blank lines part them) split after . ! ? (with any
    closing quotes) and a space. Decimal numbers ("3.5") have no space after the point."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        start = 0
        for end in SENTENCE_END.finditer(paragraph):
            words = paragraph[start:end.start()].split()
            word = words[-1].lower().lstrip("\"'(\u201c\u2018") if words else ""
            one_period = end.group()[0] == "." and end.group()[1:2] != "."  # not "?", "!", "..."
            after = paragraph[end.end(): end.end() + 1]
            initial = len(word) == 1 and word.isalpha() and word != "i"
            abbreviation = (word in ABBREVIATIONS.get(language, ()) or initial
                            or word in NUMBER_ABBREVIATIONS.get(language, ()) and after.isdigit())
            if one_period and abbreviation:
                continue  # "Dr. Smith", "e.g. This", "J. R. R. Tolkien", "No. 5"
            if after.islower():
                continue  # a lowercase word goes on: "etc. and so on"
            sentences.append(paragraph[start:end.end()].strip())
            start = end.end()
        sentences.append(paragraph[start:].strip())
    return [s for s in sentences if s]


def chunk_text(text, max_phones, language="en", word_limit=None):
    """Text -> chunks of whole sentences, each at most max_phones phones. A sentence longer
    than that is split at commas (and ; :), then between words: no spoken word is dropped
    (pieces with nothing to pronounce are). A word longer than a chunk is a chunk of its own
    up to word_limit phones; beyond that it is a ValueError."""
    phones_of = lru_cache(maxsize=None)(lambda s: valle.phonemize(s, language))  # each piece once

    def n_phones(s):
        return len(phones_of(s))

    def pieces(s, level=0):  # level 0: a sentence, 1: a part between commas, 2: a word
        limit = max(max_phones, word_limit or 0) if level == 2 else max_phones
        if n_phones(s) <= limit:
            return [s]
        if level == 2:
            raise ValueError(f"{s!r} alone is longer than a chunk of {max_phones} phones")
        parts = re.split(r"(?<=[,;:])\s+", s) if level == 0 else s.split()
        return pack([p for part in parts for p in pieces(part, level + 1)])

    def pack(items):  # greedy, in order: each chunk takes pieces while it fits
        chunks = []
        for item in items:
            if chunks and n_phones(chunks[-1] + " " + item) <= max_phones:
                chunks[-1] += " " + item
            else:
                chunks.append(item)
        return chunks
    return pack([p for sentence in split_sentences(text, language) for p in pieces(sentence)
                 if valle.speakable(phones_of(p))])


def chunk_frames(cfg, prompt_frames, prompt_phones, mode, max_seconds=None, chunk_seconds=None):
    """-> (frames, phones, most_phones): the cap on a chunk's speech, the phones a chunk is
    planned to hold, and the most it may hold so that prompt + chunk fit both position
    tables. In rolling mode a chunk is the next one's prompt, so two chunks must fit: each
    gets half of each table. chunk_seconds plans shorter chunks (the lengths a model was
    trained on); max_seconds lowers the cap (a cut the caller asks for) but not the plan."""
    frames = cfg.max_frames - prompt_frames
    phones = cfg.max_text_tokens - 1 - prompt_phones  # 1: the word boundary between them
    if mode == "rolling":
        frames = min(frames, cfg.max_frames // 2)
        phones = min(phones, (cfg.max_text_tokens - 1) // 2)
    most_phones = min(phones, frames // FRAMES_PER_PHONE)
    planned = min(frames, int(chunk_seconds * valle.FRAME_RATE)) if chunk_seconds else frames
    cap = min(frames, int(max_seconds * valle.FRAME_RATE)) if max_seconds else frames
    return cap, min(most_phones, planned // FRAMES_PER_PHONE), most_phones


def generate_long(ar, nar, text, prompt_codes, prompt_text, mode="fixed", sampling=valle.Sampling(),
                  seed=0, max_seconds=None, use_cache=True, progress=None, cache_class=valle.KVCache,
                  language="en", chunk_seconds=None, candidates=1, prompt_language="en",
                  max_batch=batched.MAX_BATCH, log=None):
    """Text of any length in the voice of a prompt -> per candidate, its chunks: (texts, list of
    (8, T_k) codes, whether each drew <eos>, which chunk prompted each: an index, or None for
    the voice prompt).

    The text is cut into chunks of whole sentences that fit the position tables with margin
    (chunk_text, chunk_frames) and spoken chunk after chunk:
      fixed:   every chunk is prompted with the voice prompt; all run as one batch (fast);
      rolling: chunk k is prompted with chunk k-1's own speech and text, which carries prosody
               and loudness across the seams; one chunk at a time. The voice prompt serves the
               first chunk, and any chunk whose predecessor is no fit prompt: shorter than a
               second (or empty), or cut off (its audio would not match its text).
    A chunk that reaches its cap without <eos> was cut off: it is split again and spoken
    anew (a single word is kept as it came). With max_seconds, a chunk that reaches it is kept
    as it came: the caller asked for the cut. Candidate c draws from seed + c * batched.SEED_STRIDE, as
    in `batched.generate`; the candidates' chunks that share a prompt run in one batch (fixed: all of
    them; rolling: the first chunks, and any the voice prompts). Decode the chunks and
    join them with join_speech. progress(label, step, total) names each AR run's chunks;
    log(line), if given, hears the plan: each chunk's first words, and each split.
    language, prompt_language, max_batch: as in `batched.generate` (a chunk's own speech prompts in
    `language`)."""
    if mode not in ("fixed", "rolling"):
        raise ValueError(f"mode must be fixed or rolling, not {mode!r}")
    prompt_phones = len(valle.text_to_ids(prompt_text, prompt_language)) if prompt_text is not None else 0
    frames, phones, most_phones = chunk_frames(ar.cfg, prompt_codes.shape[1], prompt_phones, mode,
                                               max_seconds, chunk_seconds)
    if most_phones < 1:
        raise ValueError("the prompt leaves no room for speech in the model's tables: shorten it")
    if phones < 1:
        raise ValueError(f"chunks of {chunk_seconds} s hold no phone: plan longer ones")
    texts = chunk_text(text, phones, language, word_limit=most_phones)
    if not texts:
        raise ValueError(f"nothing to pronounce in {text[:50]!r}: give words of {language!r}")
    log = log or (lambda line: None)
    if len(texts) > 1:
        log(f"{len(texts)} chunks of at most {phones} phones, {mode} mode:")
        for k, t in enumerate(texts):
            log(f"  chunk {k + 1}: {first_words(t)} ({len(valle.phonemize(t, language))} phones)")
    # per candidate, its chunks in order: [text, codes, ended with <eos>, prompted by], where
    # "prompted by" is the index of the chunk whose speech was the prompt (None: the voice prompt)
    runs = [[[t, None, False, None] for t in texts] for _ in range(candidates)]

    def prompted_by(chunks, k):  # rolling: the chunk before, if it makes a fit prompt
        before = chunks[k - 1] if mode == "rolling" and k > 0 else None
        fit = before and before[2] and valle.FRAME_RATE <= before[1].shape[1] <= ar.cfg.max_frames - frames
        return k - 1 if fit else None

    while True:
        todo = [(c, k) for c, chunks in enumerate(runs) for k, chunk in enumerate(chunks)
                if chunk[1] is None]  # (candidate, chunk), in order
        if not todo:
            break
        if mode == "rolling":  # each candidate's next chunk: those the voice prompts in one batch
            nexts = sorted({c: (c, k) for c, k in reversed(todo)}.values())
            todo = [(c, k) for c, k in nexts if prompted_by(runs[c], k) is None] or nexts[:1]
        c0, k0 = todo[0]
        j = prompted_by(runs[c0], k0)  # the same for the whole batch
        prompt, prompt_ids_text = (runs[c0][j][1], runs[c0][j][0]) if j is not None else \
            (prompt_codes, prompt_text)
        who = f"candidate {c0 + 1}: " if candidates > 1 else ""
        label = (f"{who}chunk {k0 + 1} of {len(runs[c0])}" if len(todo) == 1 else
                 f"{len(todo)} chunks in one batch" if len(todo) <= (max_batch or len(todo)) else
                 f"{len(todo)} chunks in batches of {max_batch}")
        report = (lambda s, m: progress(label, s, m)) if progress else None
        codes, ended = batched.generate(ar, nar, [runs[c][k][0] for c, k in todo], prompt, prompt_ids_text,
                                sampling, [seed + batched.SEED_STRIDE * c for c, _ in todo],
                                frames / valle.FRAME_RATE, use_cache, report, cache_class,
                                language=language,
                                prompt_language=language if j is not None else prompt_language,
                                max_batch=max_batch)
        for (c, k), code, e in reversed(list(zip(todo, codes, ended))):  # back to front: k stays valid
            chunks = runs[c]
            halves = None if e or max_seconds else _split_again(chunks[k][0], language)
            if halves:
                whose = f"candidate {c + 1}, " if candidates > 1 else ""
                log(f"{whose}{first_words(chunks[k][0])} ran {code.shape[1] / valle.FRAME_RATE:.1f} s "
                    f"without <eos>: spoken again as {len(halves)} chunks")
            chunks[k: k + 1] = [[h, None, False, None] for h in halves] if halves else \
                [[chunks[k][0], code, e, j]]
    return [tuple(map(list, zip(*chunks))) for chunks in runs]  # (texts, codes, ended, prompted by)


def first_words(text, n=6):
    """What a chunk says, for the console: its first n words."""
    words = text.split()
    return repr(" ".join(words[:n]) + (" ..." if len(words) > n else ""))


def _split_again(text, language):
    """A chunk that was cut off -> two or more smaller chunks, or None for a single word."""
    try:
        parts = chunk_text(text, max(1, len(valle.phonemize(text, language)) // 2), language)
    except ValueError:  # a word longer than half the chunk: halve the words instead
        words = text.split()
        parts = [" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])]
    parts = [p for p in parts if valle.speakable(valle.phonemize(p, language))]
    return parts if len(parts) > 1 else None


def join_speech(waves, crossfade_seconds=CROSSFADE_SECONDS):
    """Chunk waveforms -> one. At each seam, the silence that ends one chunk and starts the
    next is trimmed (audio.trim_silence keeps 50 ms of each: a short pause), and the two overlap by
    a linear crossfade. The outer ends stay as they are; a silent chunk drops out."""
    parts = []  # joined once at the end: an hour of chunks is not copied again at each seam
    for k, w in enumerate(waves):
        wav = audio.trim_silence(w.float().cpu(), start=k > 0, end=k < len(waves) - 1)
        if len(wav) == 0:
            continue
        if parts:
            left = parts.pop()
            n = min(int(crossfade_seconds * valle.SAMPLE_RATE), len(left), len(wav))
            fade = torch.linspace(0, 1, n + 2)[1:-1]  # (n,), strictly between 0 and 1
            parts += [left[: len(left) - n], left[len(left) - n:] * (1 - fade) + wav[:n] * fade]
            wav = wav[n:]
        parts.append(wav)
    return torch.cat(parts) if parts else torch.zeros(0)
