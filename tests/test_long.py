"""Long-form speech: sentence splitting, chunking, the seams, rolling prompts, cut chunks."""

import pytest
import torch

import valle
from extras import audio, batched, long_text
from valle import EOS


# --- splitting and chunking ---------------------------------------------------------

def test_sentences_split_at_their_ends_only():
    text = ('Dr. Smith paid $3.50 at 5 p.m. on Jan. 5th. He said, "Stop." Then he left! Did he? '
            'Yes, e.g. when J. R. R. Tolkien wrote... It ended.\n\nA title without a period\n\n'
            'Mrs. Jones (of the U.S. Navy) agreed; etc. and so on. Ask the W.H.O. about it. '
            'We need tools, e.g. Hammers. They sell fruit, bread, etc. They open at 9 a.m. Monday '
            'to Friday. See No. 5 and fig. 3. I said no. So do I. He wrote \u201cyes.\u201d Then '
            'he left.')
    assert long_text.split_sentences(text) == [
        "Dr. Smith paid $3.50 at 5 p.m. on Jan. 5th.",  # abbreviations, a decimal, a time
        'He said, "Stop."',  # the closing quote stays with its sentence
        "Then he left!", "Did he?",
        "Yes, e.g. when J. R. R. Tolkien wrote...",  # "e.g.", initials
        "It ended.",
        "A title without a period",  # a paragraph ends a sentence
        "Mrs. Jones (of the U.S. Navy) agreed; etc. and so on.",
        "Ask the W.H.O. about it.",  # not an abbreviation we know, but a lowercase word goes on
        "We need tools, e.g. Hammers.", "They sell fruit, bread, etc.",  # "etc." can end one
        "They open at 9 a.m. Monday to Friday.",
        "See No. 5 and fig. 3.",  # abbreviations before a number
        "I said no.", "So do I.",  # "no" and "I" without a number or a name after them
        "He wrote \u201cyes.\u201d", "Then he left.",  # a curly closing quote
    ]


def words(texts):
    return [w for t in texts for w in t.split()]


def test_chunks_hold_whole_sentences_and_never_drop_a_word():
    long_sentence = ("It was a long day, and the road went on and on, past the river, past the "
                     "mill and the old church on the hill, until the light was gone")
    text = f"Short one. {long_sentence}. Another short one! And {'very ' * 30}long."
    budget = 40
    chunks = long_text.chunk_text(text, budget)
    assert words(chunks) == text.split()  # every word, in order
    assert all(len(valle.phonemize(c)) <= budget for c in chunks)
    assert any("Another short one!" in c for c in chunks)  # a sentence that fits stays whole
    assert len(chunks) < len(words(chunks)) / 3  # packed: chunks take all that fits
    assert "and the road went on and on," in chunks  # a long sentence splits at its commas
    assert any(c.endswith("very") for c in chunks)  # ... and a comma-less one between words
    with pytest.raises(ValueError, match="longer than a chunk"):
        long_text.chunk_text("Incomprehensibilities.", 5)
    # a word longer than a planned chunk is a chunk of its own, up to what the tables hold
    assert long_text.chunk_text("It cost 1,234,567 dollars.", 10, word_limit=80) == [
        "It cost", "1,234,567", "dollars."]
    # pieces with nothing to pronounce are not chunks (generate would refuse them)
    assert long_text.chunk_text("Hello there. ?! \u041f\u0440\u0438\u0432\u0435\u0442. Goodbye now.", 100) == [
        "Hello there. Goodbye now."]


def test_chunk_budget_fits_prompt_and_chunk_in_the_tables():
    cfg = valle.get_config("tiny")  # 2250 frames, 512 phones: the frames bind
    assert long_text.chunk_frames(cfg, 225, 20, "fixed") == (2025, 253, 253)  # 2025 // 8 phones
    assert long_text.chunk_frames(cfg, 225, 20, "rolling") == (1125, 140, 140)  # half: two fit
    assert long_text.chunk_frames(cfg, 225, 20, "fixed", max_seconds=4) == (300, 253, 253)  # cap only
    assert long_text.chunk_frames(cfg, 225, 20, "fixed", chunk_seconds=4) == (2025, 37, 253)  # plan only
    small = valle.get_config("tiny", max_text_tokens=60)  # the text table binds
    assert long_text.chunk_frames(small, 225, 20, "fixed") == (2025, 39, 39)  # 60 - 1 - 20
    assert long_text.chunk_frames(small, 225, 20, "rolling") == (1125, 29, 29)  # (60 - 1) // 2


# --- the seams ------------------------------------------------------------------------

def test_join_trims_the_silence_at_each_seam_and_crossfades():
    sr = valle.SAMPLE_RATE
    t = torch.arange(sr) / sr
    tone = lambda f: 0.5 * torch.sin(2 * torch.pi * f * t)  # noqa: E731  1 s of sound
    silence = torch.zeros(sr // 2)
    chunks = [torch.cat([silence, tone(200), silence]), torch.cat([silence, tone(300), silence]),
              torch.zeros(sr), torch.cat([tone(400), silence])]  # the third is silent
    trimmed = [audio.trim_silence(chunks[0], start=False), audio.trim_silence(chunks[1]),
               audio.trim_silence(chunks[3], end=False)]
    margin = int(0.05 * sr)
    assert [len(w) for w in trimmed] == [sr // 2 + sr + margin, 2 * margin + sr, sr + sr // 2]
    out = long_text.join_speech(chunks)
    n = int(long_text.CROSSFADE_SECONDS * sr)
    assert len(out) == sum(len(w) for w in trimmed) - 2 * n  # two seams: the silent chunk drops out
    # away from the seams, every sample is the chunk's own
    assert torch.equal(out[: len(trimmed[0]) - n], trimmed[0][:-n])
    start = len(trimmed[0]) - n
    assert torch.equal(out[start + n: start + len(trimmed[1]) - n], trimmed[1][n:-n])
    assert torch.equal(out[-(len(trimmed[2]) - n):], trimmed[2][n:])
    seam = out[start: start + n]  # a crossfade: between the two sides, sample by sample
    lo, hi = torch.minimum(trimmed[0][-n:], trimmed[1][:n]), torch.maximum(trimmed[0][-n:], trimmed[1][:n])
    assert ((seam >= lo - 1e-6) & (seam <= hi + 1e-6)).all()
    assert torch.equal(long_text.join_speech([chunks[0]]), chunks[0])  # one chunk: untouched
    fade = long_text.join_speech([torch.full((sr,), 0.5), torch.full((sr,), -0.5)])[sr - n: sr]
    assert fade[0] > 0.45 and fade[-1] < -0.45 and (fade.diff() < 0).all()  # from one to the other
    assert len(long_text.join_speech([torch.zeros(sr)])) == 0


# --- generate_long with a stand-in for generate ------------------------------------------

class FakeGenerate:
    """Records each call to batched.generate and answers with codes whose length follows the text;
    `cut` texts never end (no <eos>) and `mute` texts end at once."""

    def __init__(self, cut=(), mute=()):
        self.calls, self.seeds, self.cut, self.mute = [], [], set(cut), set(mute)

    def __call__(self, ar, nar, texts, prompt_codes, prompt_text, sampling=None, seed=0, *args, **kw):
        self.calls.append((list(texts), prompt_codes, prompt_text))
        self.seeds.append(seed)
        codes = [torch.full((8, 0 if t in self.mute else 40 * len(t.split())), len(self.calls))
                 for t in texts]  # 40 frames a word: a chunk of 2+ words makes a 1 s prompt
        ended = [t not in self.cut for t in texts]
        return codes, ended


@pytest.fixture
def tiny(models):
    return models


def test_rolling_prompts_each_chunk_with_the_one_before(tiny, monkeypatch):
    ar, nar = tiny
    fake = FakeGenerate(mute={"Third one is silent."})
    monkeypatch.setattr(batched, "generate", fake)
    monkeypatch.setattr(long_text, "chunk_frames", lambda *a, **k: (1000, 20, 20))  # a sentence a chunk
    prompt = torch.randint(0, 1024, (8, 20))
    text = "First one here. Second one here. Third one is silent. Fourth one here."
    [(texts, codes, _, prompted_by)] = long_text.generate_long(ar, nar, text, prompt, "The prompt.",
                                                           mode="rolling")
    assert texts == ["First one here.", "Second one here.", "Third one is silent.", "Fourth one here."]
    assert prompted_by == [None, 0, 1, None]
    assert [call[0] for call in fake.calls] == [[t] for t in texts]  # one chunk at a time
    assert fake.calls[0][1] is prompt and fake.calls[0][2] == "The prompt."
    assert fake.calls[1][1] is codes[0] and fake.calls[1][2] == texts[0]  # chunk 1's own codes
    assert fake.calls[2][1] is codes[1] and fake.calls[2][2] == texts[1]
    assert codes[2].shape == (8, 0)  # the silent chunk ...
    assert fake.calls[3][1] is prompt and fake.calls[3][2] == "The prompt."  # ... hands back
    # a chunk cut at the caller's cap is no prompt: its audio stops before its text does ...
    cut = FakeGenerate(cut={"Second one here."})
    monkeypatch.setattr(batched, "generate", cut)
    long_text.generate_long(ar, nar, "First one here. Second one here. Fourth one here.", prompt,
                        "The prompt.", mode="rolling", max_seconds=30)
    assert cut.calls[1][1] is not prompt and cut.calls[2][1] is prompt
    # ... nor is a chunk shorter than a second (one word: 40 frames)
    short = FakeGenerate()
    monkeypatch.setattr(batched, "generate", short)
    long_text.generate_long(ar, nar, "Hello. Second one here.", prompt, "The prompt.", mode="rolling")
    assert len(short.calls) == 2 and short.calls[1][1] is prompt


def test_rolling_candidates_share_a_batch_where_the_voice_prompts_them(tiny, monkeypatch):
    ar, nar = tiny
    fake = FakeGenerate()
    monkeypatch.setattr(batched, "generate", fake)
    monkeypatch.setattr(long_text, "chunk_frames", lambda *a, **k: (1000, 20, 20))  # a sentence a chunk
    prompt = torch.randint(0, 1024, (8, 20))
    runs = long_text.generate_long(ar, nar, "First one here. Second one here.", prompt, "The prompt.",
                               mode="rolling", seed=7, candidates=2)
    S = batched.SEED_STRIDE
    assert fake.calls[0][0] == ["First one here."] * 2 and fake.calls[0][1] is prompt  # one batch
    assert fake.seeds == [[7, 7 + S], [7], [7 + S]]  # then each candidate after its own chunk
    for c, (texts, codes, _, prompted_by) in enumerate(runs):
        assert fake.calls[1 + c][0] == ["Second one here."] and fake.calls[1 + c][1] is codes[0]
        assert prompted_by == [None, 0]


def test_fixed_mode_runs_every_chunk_in_one_batch_with_the_voice_prompt(tiny, monkeypatch):
    ar, nar = tiny
    fake = FakeGenerate()
    monkeypatch.setattr(batched, "generate", fake)
    monkeypatch.setattr(long_text, "chunk_frames", lambda *a, **k: (100, 12, 12))
    prompt = torch.randint(0, 1024, (8, 20))
    [(texts, codes, _, _)] = long_text.generate_long(ar, nar, "One here. Two here. Three here.", prompt, "P.")
    assert len(fake.calls) == 1 and fake.calls[0][0] == texts == ["One here.", "Two here.", "Three here."]
    assert fake.calls[0][1] is prompt


@pytest.mark.parametrize("mode", ["fixed", "rolling"])
def test_continuation_without_a_prompt_transcript(tiny, mode, monkeypatch):
    # prompt_text=None, as valle.generate takes it: the text includes what the prompt says
    ar, nar = tiny
    fake = FakeGenerate()
    monkeypatch.setattr(batched, "generate", fake)
    prompt = torch.randint(0, 1024, (8, 20))
    [(texts, codes, _, _)] = long_text.generate_long(ar, nar, "One here. Two here.", prompt, None, mode)
    assert words(texts) == "One here. Two here.".split()
    assert fake.calls[0][2] is None  # the first chunk: the voice prompt, no transcript
    [(texts, codes, ended, _)] = long_text.generate_long(*tiny, "Hello there.", prompt, None, mode)
    assert texts == ["Hello there."] and codes[0].shape[0] == 8  # the real generate too


def test_a_chunk_cut_off_is_split_and_spoken_again(tiny, monkeypatch):
    ar, nar = tiny
    fake = FakeGenerate(cut={"Two words here and there.", "Alone."})
    monkeypatch.setattr(batched, "generate", fake)
    monkeypatch.setattr(long_text, "chunk_frames", lambda *a, **k: (100, 22, 22))  # a sentence a chunk
    [(texts, codes, _, _)] = long_text.generate_long(ar, nar, "One. Two words here and there. Alone.",
                                       torch.zeros(8, 20, dtype=torch.long), "P.")
    assert words(texts) == "One. Two words here and there. Alone.".split()  # nothing lost
    assert "Two words here and there." not in texts and len(texts) > 2  # redone in pieces
    assert "Alone." in texts  # a single word that is cut stays as it came
    assert [c.shape[1] for c in codes] == [40 * len(t.split()) for t in texts]  # each its own
    cut = FakeGenerate(cut={"Go internationalization."})  # one word longer than half the chunk
    monkeypatch.setattr(batched, "generate", cut)
    [(texts, _, _, _)] = long_text.generate_long(ar, nar, "Go internationalization.", torch.zeros(8, 20, dtype=torch.long), "P.")
    assert texts == ["Go", "internationalization."]
    with_cap = FakeGenerate(cut={"Two words here and there."})
    monkeypatch.setattr(batched, "generate", with_cap)
    [(texts, _, _, _)] = long_text.generate_long(ar, nar, "One. Two words here and there. Alone.",
                                   torch.zeros(8, 20, dtype=torch.long), "P.", max_seconds=9)
    assert len(with_cap.calls) == 1 and len(texts) == 3  # the caller's cap: the cut is kept


# --- real models: nothing overflows a table --------------------------------------------

class EndsSoon(valle.ARModel):
    """Random weights with <eos> made likelier (bias 2: 1 in ~140 codes; 3: 1 in ~50): chunks
    end at random lengths, some at the cap."""
    bias = 2.0

    def logits(self, h):
        out = super().logits(h)
        out[..., EOS] += self.bias
        return out


@pytest.mark.parametrize("mode, n_words", [("fixed", 2000), ("rolling", 100)])  # rolling: chunk by chunk
def test_two_thousand_words_never_overflow_a_position_table(mode, n_words, monkeypatch):
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.0, max_frames=600, max_text_tokens=60)
    ar, nar = EndsSoon(cfg).eval(), valle.NARModel(cfg).eval()
    ar.bias = 3.0 if mode == "fixed" else 2.0  # rolling: chunks of a second or more, to prompt
    calls, generate = [], batched.generate

    def spy(ar, nar, texts, prompt_codes, prompt_text, *a, **k):
        codes, ended = generate(ar, nar, texts, prompt_codes, prompt_text, *a, **k)
        calls.extend((prompt_codes.shape[1], prompt_text, t, c) for t, c in zip(texts, codes))
        return codes, ended
    monkeypatch.setattr(batched, "generate", spy)
    sentence = "The quick brown fox jumps over the lazy dog, and then it runs away. "
    text = sentence * (n_words // len(sentence.split()))
    prompt = torch.randint(0, 1024, (8, 40))
    [(texts, codes, _, _)] = long_text.generate_long(ar, nar, text, prompt, "A prompt.", mode)
    assert words(texts) == text.split()
    assert len(calls) >= len(texts) > n_words / 20
    for prompt_frames, prompt_text, chunk, c in calls:  # against the tables themselves
        assert len(valle.text_to_ids(prompt_text)) + 1 + len(valle.text_to_ids(chunk)) <= 60
        assert prompt_frames + c.shape[1] <= 600
    assert any(p != 40 for p, *_ in calls) == (mode == "rolling")  # rolling: chunks as prompts


def test_a_compiled_long_text_compiles_once_per_shape(monkeypatch):
    """sample.py --compile on a long text: each chunk is a batch of its own, with a new
    FixedShapeCache (and, with progress, a new cache class: batched.reporting). Caches of one
    shape hand the compiled step the same buffers, and the step sees one class, so 12 chunks
    compile once per shape, not once per chunk (the ninth would hit the recompile limit), and
    the buffers kept are one set per shape. The graphs are counted with a backend that runs
    them as traced: dynamo's guards decide what recompiles, whatever compiles it after."""
    from extras import speedups
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    step = torch.compile(speedups.decode_step, backend=backend, fullgraph=True, dynamic=False)
    monkeypatch.setattr(speedups, "compiled_step", lambda device_type: step)
    monkeypatch.setattr(speedups, "BUFFERS", {})
    buffers = []  # each chunk's keys of layer 0, as its compiled steps see them (held: no reuse)

    class Slots(speedups.Slots):
        def __init__(self, cache):
            super().__init__(cache)
            buffers.append(self.k[0])
    monkeypatch.setattr(speedups, "Slots", Slots)
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", d_model=16, n_head=2, n_layer=2, d_ff=64, dropout=0.0,
                           max_frames=600, max_text_tokens=60)
    ar, nar = EndsSoon(cfg).eval(), valle.NARModel(cfg).eval()
    ar.bias = 5.0  # a chunk ends within a few steps
    short, long = "Go now.", "The seven quiet rivers ran far away to the sea."  # 7 and 43 phones
    steps = []
    try:
        [(texts, codes, _, _)] = long_text.generate_long(
            ar, nar, " ".join([short, long] * 6), torch.randint(0, 1024, (8, 40)), "A prompt.",
            "fixed", cache_class=speedups.FixedShapeCache, max_batch=1,
            progress=lambda label, step, total: steps.append(step))
    finally:
        torch._dynamo.reset()
    assert texts == [short, long] * 6 and max(steps) > 1  # 12 batches of one chunk, each decoded
    shapes = {key[0] for key in speedups.BUFFERS}  # a short chunk's cache rounds to 256, a long one's to 512
    assert shapes == {(1, cfg.n_head, 256, cfg.head_dim), (1, cfg.n_head, 512, cfg.head_dim)}
    assert len(graphs) == len(shapes)  # once per shape
    assert len(buffers) == 12 and len({t.data_ptr() for t in buffers}) == len(shapes)  # memory flat
    assert len(speedups.BUFFERS) == len(shapes) * (1 + cfg.n_layer)  # valid/pos, then k/v per layer
