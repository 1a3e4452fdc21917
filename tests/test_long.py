"""Long-form speech: sentence splitting, chunking, the seams, rolling prompts, cut chunks."""

import pytest
import torch

import valle
from valle import EOS


# --- splitting and chunking ---------------------------------------------------------

def test_sentences_split_at_their_ends_only():
    text = ('Dr. Smith paid $3.50 at 5 p.m. on Jan. 5th. He said, "Stop." Then he left! Did he? '
            'Yes, e.g. when J. R. R. Tolkien wrote... It ended.\n\nA title without a period\n\n'
            'Mrs. Jones (of the U.S. Navy) agreed; etc. and so on. Ask the W.H.O. about it.')
    assert valle.split_sentences(text) == [
        "Dr. Smith paid $3.50 at 5 p.m. on Jan. 5th.",  # abbreviations, a decimal, a time
        'He said, "Stop."',  # the closing quote stays with its sentence
        "Then he left!", "Did he?",
        "Yes, e.g. when J. R. R. Tolkien wrote...",  # "e.g.", initials
        "It ended.",
        "A title without a period",  # a paragraph ends a sentence
        "Mrs. Jones (of the U.S. Navy) agreed; etc. and so on.",
        "Ask the W.H.O. about it.",  # not an abbreviation we know, but a lowercase word goes on
    ]


def words(texts):
    return [w for t in texts for w in t.split()]


def test_chunks_hold_whole_sentences_and_never_drop_a_word():
    long_sentence = ("It was a long day, and the road went on and on, past the river, past the "
                     "mill and the old church on the hill, until the light was gone")
    text = f"Short one. {long_sentence}. Another short one! And {'very ' * 30}long."
    budget = 40
    chunks = valle.chunk_text(text, budget)
    assert words(chunks) == text.split()  # every word, in order
    assert all(len(valle.phonemize(c)) <= budget for c in chunks)
    assert any("Another short one!" in c for c in chunks)  # a sentence that fits stays whole
    assert len(chunks) < len(words(chunks)) / 3  # packed: chunks take all that fits
    assert "and the road went on and on," in chunks  # a long sentence splits at its commas
    assert any(c.endswith("very") for c in chunks)  # ... and a comma-less one between words
    with pytest.raises(ValueError, match="longer than a chunk"):
        valle.chunk_text("Incomprehensibilities.", 5)


def test_chunk_budget_fits_prompt_and_chunk_in_the_tables():
    cfg = valle.get_config("tiny")  # 2250 frames, 512 phones
    frames, phones = valle.chunk_frames(cfg, 225, 20, "fixed")
    assert frames == 2250 - 225 and phones == min(512 - 1 - 20, frames // valle.FRAMES_PER_PHONE)
    frames, phones = valle.chunk_frames(cfg, 225, 20, "rolling")  # two chunks must fit
    assert 2 * frames <= 2250 and 2 * phones + 1 <= 512
    assert valle.chunk_frames(cfg, 225, 20, "fixed", max_seconds=4)[0] == 300


# --- the seams ------------------------------------------------------------------------

def test_join_trims_the_silence_at_each_seam_and_crossfades():
    sr = valle.SAMPLE_RATE
    t = torch.arange(sr) / sr
    tone = lambda f: 0.5 * torch.sin(2 * torch.pi * f * t)  # noqa: E731  1 s of sound
    silence = torch.zeros(sr // 2)
    chunks = [torch.cat([silence, tone(200), silence]), torch.cat([silence, tone(300), silence]),
              torch.zeros(sr), torch.cat([tone(400), silence])]  # the third is silent
    trimmed = [valle.trim_silence(chunks[0], start=False), valle.trim_silence(chunks[1]),
               valle.trim_silence(chunks[3], end=False)]
    margin = int(0.05 * sr)
    assert [len(w) for w in trimmed] == [sr // 2 + sr + margin, 2 * margin + sr, sr + sr // 2]
    out = valle.join_speech(chunks)
    n = int(valle.CROSSFADE_SECONDS * sr)
    assert len(out) == sum(len(w) for w in trimmed) - 2 * n  # two seams: the silent chunk drops out
    # away from the seams, every sample is the chunk's own
    assert torch.equal(out[: len(trimmed[0]) - n], trimmed[0][:-n])
    start = len(trimmed[0]) - n
    assert torch.equal(out[start + n: start + len(trimmed[1]) - n], trimmed[1][n:-n])
    assert torch.equal(out[-(len(trimmed[2]) - n):], trimmed[2][n:])
    seam = out[start: start + n]  # a crossfade: between the two sides, sample by sample
    lo, hi = torch.minimum(trimmed[0][-n:], trimmed[1][:n]), torch.maximum(trimmed[0][-n:], trimmed[1][:n])
    assert ((seam >= lo - 1e-6) & (seam <= hi + 1e-6)).all()
    assert torch.equal(valle.join_speech([chunks[0]]), chunks[0])  # one chunk: untouched
    assert len(valle.join_speech([torch.zeros(sr)])) == 0


# --- generate_long with a stand-in for generate ------------------------------------------

class FakeGenerate:
    """Records each call to valle.generate and answers with codes whose length follows the text;
    `cut` texts never end (no <eos>) and `mute` texts end at once."""

    def __init__(self, cut=(), mute=()):
        self.calls, self.cut, self.mute = [], set(cut), set(mute)

    def __call__(self, ar, nar, texts, prompt_codes, prompt_text, *args, return_ended=False, **kw):
        self.calls.append((list(texts), prompt_codes, prompt_text))
        codes = [torch.full((8, 0 if t in self.mute else 3 * len(t.split())), len(self.calls))
                 for t in texts]
        ended = [t not in self.cut for t in texts]
        return codes, ended


@pytest.fixture
def tiny(models):
    return models


def test_rolling_prompts_each_chunk_with_the_one_before(tiny, monkeypatch):
    ar, nar = tiny
    fake = FakeGenerate(mute={"Third one is silent."})
    monkeypatch.setattr(valle, "generate", fake)
    monkeypatch.setattr(valle, "chunk_frames", lambda *a, **k: (100, 20))  # a sentence a chunk
    prompt = torch.randint(0, 1024, (8, 20))
    text = "First one here. Second one here. Third one is silent. Fourth one here."
    texts, codes = valle.generate_long(ar, nar, text, prompt, "The prompt.", mode="rolling")
    assert texts == ["First one here.", "Second one here.", "Third one is silent.", "Fourth one here."]
    assert [call[0] for call in fake.calls] == [[t] for t in texts]  # one chunk at a time
    assert fake.calls[0][1] is prompt and fake.calls[0][2] == "The prompt."
    assert fake.calls[1][1] is codes[0] and fake.calls[1][2] == texts[0]  # chunk 1's own codes
    assert fake.calls[2][1] is codes[1] and fake.calls[2][2] == texts[1]
    assert codes[2].shape == (8, 0)  # the silent chunk ...
    assert fake.calls[3][1] is prompt and fake.calls[3][2] == "The prompt."  # ... hands back


def test_fixed_mode_runs_every_chunk_in_one_batch_with_the_voice_prompt(tiny, monkeypatch):
    ar, nar = tiny
    fake = FakeGenerate()
    monkeypatch.setattr(valle, "generate", fake)
    monkeypatch.setattr(valle, "chunk_frames", lambda *a, **k: (100, 12))
    prompt = torch.randint(0, 1024, (8, 20))
    texts, codes = valle.generate_long(ar, nar, "One here. Two here. Three here.", prompt, "P.")
    assert len(fake.calls) == 1 and fake.calls[0][0] == texts == ["One here.", "Two here.", "Three here."]
    assert fake.calls[0][1] is prompt


def test_a_chunk_cut_off_is_split_and_spoken_again(tiny, monkeypatch):
    ar, nar = tiny
    fake = FakeGenerate(cut={"Two words here and there.", "Alone."})
    monkeypatch.setattr(valle, "generate", fake)
    monkeypatch.setattr(valle, "chunk_frames", lambda *a, **k: (100, 22))  # a sentence a chunk
    texts, codes = valle.generate_long(ar, nar, "One. Two words here and there. Alone.",
                                       torch.zeros(8, 20, dtype=torch.long), "P.")
    assert words(texts) == "One. Two words here and there. Alone.".split()  # nothing lost
    assert "Two words here and there." not in texts and len(texts) > 2  # redone in pieces
    assert "Alone." in " ".join(texts)  # a single word that is cut stays as it came
    assert all(c.shape[1] > 0 for c in codes)
    with_cap = FakeGenerate(cut={"Two words here and there."})
    monkeypatch.setattr(valle, "generate", with_cap)
    texts, _ = valle.generate_long(ar, nar, "One. Two words here and there. Alone.",
                                   torch.zeros(8, 20, dtype=torch.long), "P.", max_seconds=9)
    assert len(with_cap.calls) == 1 and len(texts) == 3  # the caller's cap: the cut is kept


# --- real models: nothing overflows a table --------------------------------------------

class EndsSoon(valle.ARModel):
    """Random weights with <eos> made likely: chunks end at random lengths, some at the cap."""

    def logits(self, h):
        out = super().logits(h)
        out[..., EOS] += 5.0
        return out


@pytest.mark.parametrize("mode", ["fixed", "rolling"])
def test_two_thousand_words_never_overflow_a_position_table(mode):
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.0, max_frames=300, max_text_tokens=120)
    ar, nar = EndsSoon(cfg).eval(), valle.NARModel(cfg).eval()
    sentence = "The quick brown fox jumps over the lazy dog, and then it runs away. "
    n_words = 2000 if mode == "fixed" else 200  # rolling runs chunk by chunk: fewer
    text = sentence * (n_words // len(sentence.split()))
    prompt = torch.randint(0, 1024, (8, 40))
    texts, codes = valle.generate_long(ar, nar, text, prompt, "A prompt.", mode)
    assert words(texts) == text.split()
    frames, phones = valle.chunk_frames(cfg, 40, len(valle.text_to_ids("A prompt.")), mode)
    assert all(c.shape[1] <= frames for c in codes)
    assert all(len(valle.text_to_ids(t)) <= phones for t in texts)
    assert sum(c.shape[1] for c in codes) > 0
