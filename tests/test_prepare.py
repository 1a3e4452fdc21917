"""data/prepare.py: every layout, bad files, resuming, refusing to overwrite."""
import importlib.util
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import valle
from conftest import ROOT, write_corpus

spec = importlib.util.spec_from_file_location("prepare", os.path.join(ROOT, "data", "prepare.py"))
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)


def tone(path, seconds, sr=22050, amp=0.3, f0=200):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (amp * np.sin(2 * np.pi * f0 * t)).astype(np.float32), sr)


def prepared_meta(out):
    with open(os.path.join(out, "meta.json")) as f:
        return json.load(f)


def test_ljspeech_layout_with_bad_files(tmp_path):
    src = tmp_path / "LJSpeech-1.1"
    (src / "wavs").mkdir(parents=True)
    rows = ["LJ001|Raw text one.|Normalized text one.", "LJ002|Two.|Second sentence here.",
            "LJ003|x|", "LJ004|Too short.|Too short.", "LJ005|Too long.|Too long.",
            "LJ006|Unreadable.|Unreadable.", "LJ007|Silent.|Silent.", "LJ008|Missing.|Missing."]
    (src / "metadata.csv").write_text("\n".join(rows) + "\n")
    tone(src / "wavs" / "LJ001.wav", 1.0)
    tone(src / "wavs" / "LJ002.wav", 1.2, f0=300)
    tone(src / "wavs" / "LJ003.wav", 1.0)  # transcript "x": fine, is a letter
    tone(src / "wavs" / "LJ004.wav", 0.2)
    tone(src / "wavs" / "LJ005.wav", 3.0)
    (src / "wavs" / "LJ006.wav").write_bytes(b"RIFF garbage")
    tone(src / "wavs" / "LJ007.wav", 1.0, amp=0.0)
    out = str(tmp_path / "out")
    prepare.main(["--layout", "ljspeech", "--src", str(src), "--out", out, "--codec", "untrained",
                  "--max-seconds", "2"])
    meta = prepared_meta(out)
    assert meta["ids"] == ["LJ001", "LJ002", "LJ003"]
    assert meta["skipped"] == {"shorter than 0.5 s": 1, "longer than 2.0 s": 1,
                               "unreadable audio": 2, "silent": 1}
    # the stored values are the codec's codes and the normalized text's phones
    index = np.load(os.path.join(out, "index.npy"))
    codes = np.fromfile(os.path.join(out, "codes.bin"), dtype=np.int16).reshape(-1, 8)
    phones = np.fromfile(os.path.join(out, "phones.bin"), dtype=np.uint8)
    po, pn, co, cn, spk = index[1]
    expected = valle.Codec.untrained(0).encode(valle.load_audio(str(src / "wavs" / "LJ002.wav")))
    assert torch.equal(torch.from_numpy(codes[co:co + cn].T.astype(np.int64)), expected)
    assert phones[po:po + pn].tolist() == valle.text_to_ids("Second sentence here.")
    assert meta["codec"] == "untrained-seed0" and meta["speakers"] == ["ljspeech"]


def test_libritts_layout(tmp_path):
    for spk, chap, utt, text in [("19", "198", "19_198_000000_000000", "Hello there."),
                                 ("26", "495", "26_495_000004_000000", "General Kenobi."),
                                 ("26", "495", "26_495_000005_000000", "")]:
        d = tmp_path / "train-clean-100" / spk / chap
        d.mkdir(parents=True, exist_ok=True)
        tone(d / f"{utt}.wav", 1.0)
        (d / f"{utt}.normalized.txt").write_text(text)
        (d / f"{utt}.original.txt").write_text("IGNORED " + text)
    out = str(tmp_path / "out")
    prepare.main(["--layout", "libritts", "--src", str(tmp_path / "train-clean-100"), "--out", out,
                  "--codec", "untrained"])
    meta = prepared_meta(out)
    assert meta["utterances"] == 2 and meta["speakers"] == ["19", "26"]
    assert meta["skipped"] == {"empty transcript": 1}


def test_vctk_layout_keeps_one_microphone(tmp_path):
    src = tmp_path / "VCTK"
    for spk in ["p225", "p226"]:
        (src / "wav48_silence_trimmed" / spk).mkdir(parents=True)
        (src / "txt" / spk).mkdir(parents=True)
        for n in range(2):
            (src / "txt" / spk / f"{spk}_00{n}.txt").write_text("Please call Stella.")
            for mic in (1, 2):
                tone(src / "wav48_silence_trimmed" / spk / f"{spk}_00{n}_mic{mic}.flac", 0.9)
    out = str(tmp_path / "out")
    prepare.main(["--layout", "vctk", "--src", str(src), "--out", out, "--codec", "untrained"])
    meta = prepared_meta(out)
    assert meta["ids"] == ["p225_000", "p225_001", "p226_000", "p226_001"]
    assert meta["speakers"] == ["p225", "p226"]


def test_manifest_layout(tmp_path):
    tone(tmp_path / "a.wav", 1.0)
    tone(tmp_path / "b.ogg", 1.0, sr=16000)
    (tmp_path / "list.txt").write_text("a.wav|First one.|alice\nb.ogg|Second one.|bob\n"
                                       "nope.wav|Missing file.|bob\n")
    out = str(tmp_path / "out")
    prepare.main(["--layout", "manifest", "--src", str(tmp_path / "list.txt"), "--out", out,
                  "--codec", "untrained"])
    meta = prepared_meta(out)
    assert meta["utterances"] == 2 and meta["speakers"] == ["alice", "bob"]
    assert meta["skipped"] == {"unreadable audio": 1}


def test_folder_layout_resumes_and_never_overwrites(tmp_path, monkeypatch):
    write_corpus(str(tmp_path / "src"), n_speakers=2, per_speaker=3)
    out = str(tmp_path / "out")
    argv = ["--layout", "folder", "--src", str(tmp_path / "src"), "--out", out, "--codec", "untrained"]
    monkeypatch.setattr(prepare, "CHUNK", 2)
    real, calls = prepare.encode_one, []

    def crash_on_fifth(*a):
        calls.append(a[1])
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed in the middle of the third chunk
        return real(*a)
    monkeypatch.setattr(prepare, "encode_one", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(argv)
    assert not os.path.exists(os.path.join(out, "meta.json"))
    calls.clear()
    monkeypatch.setattr(prepare, "encode_one", lambda *a: calls.append(a[1]) or real(*a))
    prepare.main(argv)
    assert len(calls) == 2  # only the unfinished third chunk was encoded again
    assert prepared_meta(out)["utterances"] == 6
    with pytest.raises(SystemExit, match="already holds a finished dataset"):
        prepare.main(argv)
    prepare.main(argv + ["--overwrite"])
    assert prepared_meta(out)["utterances"] == 6


def test_missing_source_and_wrong_layout(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        prepare.main(["--layout", "folder", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="not in the ljspeech layout"):
        prepare.main(["--layout", "ljspeech", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no utterances"):
        prepare.main(["--layout", "folder", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
