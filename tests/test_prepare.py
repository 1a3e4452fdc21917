"""data/prepare.py: every layout, bad files, resuming, refusing to overwrite, batches, workers,
shards and merging, bad flags."""
import glob
import importlib.util
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import valle
from extras import audio, cli, codecs
from conftest import ROOT, run_script, write_corpus

spec = importlib.util.spec_from_file_location("prepare", os.path.join(ROOT, "data", "prepare.py"))
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)


def tone(path, seconds, sr=22050, amp=0.3, f0=200):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (amp * np.sin(2 * np.pi * f0 * t)).astype(np.float32), sr)


def prepared_meta(out):
    with open(os.path.join(out, "meta.json")) as f:
        return json.load(f)


def refused(argv, capsys):
    """Run prepare.py's main, expecting it to stop with one `error: ...` line and status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        prepare.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def dataset_files(out):
    """The bytes of a prepared dataset's files, by name (meta.json parsed)."""
    files = {name: open(os.path.join(out, name), "rb").read()
             for name in ("phones.bin", "codes.bin", "index.npy")}
    return {**files, "meta.json": prepared_meta(out), "listing": sorted(os.listdir(out))}


def test_ljspeech_layout_with_bad_files(tmp_path, capsys):
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
                               "unreadable audio": 1, "missing audio file": 1, "silent": 1}
    # the console names the first five (a corrupt file and a missing one apart), meta.json all
    named = [l.strip() for l in capsys.readouterr().out.splitlines() if l.startswith("  ")]
    assert named == ["skipped LJ004: shorter than 0.5 s", "skipped LJ005: longer than 2.0 s",
                     "skipped LJ006: unreadable audio", "skipped LJ007: silent",
                     "skipped LJ008: missing audio file"]
    assert [tuple(x) for x in meta["skipped_ids"]] == [
        ("LJ004", "shorter than 0.5 s"), ("LJ005", "longer than 2.0 s"),
        ("LJ006", "unreadable audio"), ("LJ007", "silent"), ("LJ008", "missing audio file")]
    # the stored values are the codec's codes and the normalized text's phones
    index = np.load(os.path.join(out, "index.npy"))
    codes = np.fromfile(os.path.join(out, "codes.bin"), dtype=np.int16).reshape(-1, 8)
    phones = np.fromfile(os.path.join(out, "phones.bin"), dtype=np.uint8)
    po, pn, co, cn, spk, language = index[1]
    assert (index[:, cli.LANGUAGE] == 0).all()  # --language en, the default
    expected = codecs.untrained(0).encode(audio.load_audio(str(src / "wavs" / "LJ002.wav")))
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


def test_librispeech_layout(tmp_path):
    # LibriSpeech's own folders: <speaker>/<chapter>/<id>.flac at 16 kHz, each chapter's
    # transcripts in <speaker>-<chapter>.trans.txt (upper case, one "<id> <TEXT>" a line)
    src = tmp_path / "train-clean-100"
    chapters = {("19", "198"): [("19-198-0000", "NORTHANGER ABBEY", 1.0, 200),
                                ("19-198-0001", "THIS LITTLE WORK", 1.2, 300),
                                ("19-198-0002", "HAS NO AUDIO FILE", None, 0)],
                ("103", "1240"): [("103-1240-0000", "CHAPTER ONE", 0.9, 250)]}
    for (spk, chap), utts in chapters.items():
        d = src / spk / chap
        d.mkdir(parents=True)
        (d / f"{spk}-{chap}.trans.txt").write_text("".join(f"{u} {t}\n" for u, t, _, _ in utts))
        for utt, _, seconds, f0 in utts:
            if seconds:
                tone(d / f"{utt}.flac", seconds, sr=16000, f0=f0)
    out = str(tmp_path / "out")
    prepare.main(["--layout", "librispeech", "--src", str(src), "--out", out, "--codec", "untrained"])
    meta = prepared_meta(out)
    assert meta["ids"] == ["103-1240-0000", "19-198-0000", "19-198-0001"]  # sorted, as eval.py reads
    assert meta["speakers"] == ["103", "19"] and meta["layout"] == "librispeech"
    assert meta["skipped"] == {"missing audio file": 1}
    index = np.load(os.path.join(out, "index.npy"))
    codes = np.fromfile(os.path.join(out, "codes.bin"), dtype=np.int16).reshape(-1, 8)
    phones = np.fromfile(os.path.join(out, "phones.bin"), dtype=np.uint8)
    po, pn, co, cn, spk, _ = index[2]  # 19-198-0001: its own text, audio and speaker
    assert phones[po:po + pn].tolist() == valle.text_to_ids("THIS LITTLE WORK")
    expected = codecs.untrained(0).encode(audio.load_audio(str(src / "19" / "198" / "19-198-0001.flac")))
    assert torch.equal(torch.from_numpy(codes[co:co + cn].T.astype(np.int64)), expected)
    assert meta["speakers"][spk] == "19" and cn == expected.shape[1] == round(1.2 * valle.FRAME_RATE)


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
    assert meta["skipped"] == {"missing audio file": 1}


def test_folder_layout_resumes_and_never_overwrites(tmp_path, monkeypatch, capsys):
    write_corpus(str(tmp_path / "src"), n_speakers=2, per_speaker=3)
    out = str(tmp_path / "out")
    argv = ["--layout", "folder", "--src", str(tmp_path / "src"), "--out", out, "--codec", "untrained"]
    monkeypatch.setattr(prepare, "CHUNK", 2)
    real, calls = prepare.load_one, []

    def crash_on_fifth(*a):
        calls.append(a[0])
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed in the middle of the third chunk
        return real(*a)
    monkeypatch.setattr(prepare, "load_one", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(argv)
    assert not os.path.exists(os.path.join(out, "meta.json"))
    calls.clear()
    monkeypatch.setattr(prepare, "load_one", lambda *a: calls.append(a[0]) or real(*a))
    prepare.main(argv)
    assert len(calls) == 2  # only the unfinished third chunk was encoded again
    assert prepared_meta(out)["utterances"] == 6
    assert "already holds a finished dataset" in refused(argv, capsys)
    prepare.main(argv + ["--overwrite"])
    assert prepared_meta(out)["utterances"] == 6


def test_missing_source_and_wrong_layout(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "does not exist" in refused(["--layout", "folder", "--src", str(tmp_path / "nope"),
                                        "--out", out], capsys)
    (tmp_path / "empty").mkdir()
    assert "not in the ljspeech layout" in refused(["--layout", "ljspeech", "--src",
                                                    str(tmp_path / "empty"), "--out", out], capsys)
    assert "no utterances" in refused(["--layout", "folder", "--src", str(tmp_path / "empty"),
                                       "--out", out], capsys)
    assert not os.path.exists(out)


def test_batched_encoding_matches_one_at_a_time(tmp_path):
    # 8 demo utterances of 4 voices (2.7-3.3 s), encoded 4 per EnCodec call (sorted by length,
    # right-padded) against Codec.encode one at a time. Lengths must be exact. Codes may differ
    # in near ties: for a quarter of the frames, the two codebook entries nearest at level 0 of
    # the untrained test codec differ by less than 1e-7 in squared distances computed from
    # terms of ~0.1, so other kernels' rounding flips some, and a flip changes the levels below.
    # Measured: 443 of 14504 codes (3.1%) differ here; on the whole demo corpus (80 utterances)
    # 2.6%, at 4 and at 16 per call. One per call (the CPU default) gives identical codes.
    paths = sorted(glob.glob(os.path.join(ROOT, "data", "demo", "*", "*.flac")))[::10]
    lines = [f"{p}|{open(p[: -len('.flac')] + '.txt').read().strip()}|spk" for p in paths]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    prepare.main(["--layout", "manifest", "--src", str(tmp_path / "list.txt"), "--out", out,
                  "--codec", "untrained", "--batch-size", "4"])
    index = np.load(os.path.join(out, "index.npy"))
    codes = np.fromfile(os.path.join(out, "codes.bin"), dtype=np.int16).reshape(-1, 8)
    codec, differ, total = codecs.untrained(0), 0, 0
    assert len(index) == len(paths)
    for path, (_, _, offset, frames, _, _) in zip(paths, index):
        wav = audio.load_audio(path)
        alone = codec.encode(wav).T.numpy()  # (T, 8)
        assert frames == len(alone) == -(-len(wav) // 320)
        differ += int((codes[offset: offset + frames] != alone).sum())
        total += alone.size
    assert differ / total < 0.06, differ / total


def test_workers_give_the_same_dataset(tmp_path):
    write_corpus(str(tmp_path / "src"), n_speakers=2, per_speaker=3)
    argv = ["--layout", "folder", "--src", str(tmp_path / "src"), "--codec", "untrained"]
    prepare.main(argv + ["--out", str(tmp_path / "w0")])
    # a separate process: spawned workers import prepare.py by its path, as a user runs it
    run = run_script("data/prepare.py", *argv, "--out", str(tmp_path / "w2"), "--workers", "2")
    assert run.returncode == 0, run.stderr
    assert dataset_files(str(tmp_path / "w0")) == dataset_files(str(tmp_path / "w2"))


def test_shards_merge_to_the_same_dataset(tmp_path, monkeypatch, capsys):
    write_corpus(str(tmp_path / "src"), n_speakers=2, per_speaker=3)
    monkeypatch.setattr(prepare, "CHUNK", 2)  # 3 chunks: shard 0/2 gets chunks 0 and 2
    argv = ["--layout", "folder", "--src", str(tmp_path / "src"), "--codec", "untrained"]
    whole, sharded = str(tmp_path / "whole"), str(tmp_path / "sharded")
    prepare.main(argv + ["--out", whole])
    prepare.main(argv + ["--out", sharded, "--shard", "0/2"])
    assert "--merge" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(sharded, "parts-0of2"))) == [
        "00000.npz", "00002.npz", "settings.json"]
    assert "1 of 3 chunks are missing" in refused(["--merge", "--out", sharded], capsys)
    assert os.listdir(sharded) == ["parts-0of2"]  # the refused merge wrote nothing
    prepare.main(argv + ["--out", sharded, "--shard", "1/2"])
    assert not os.path.exists(os.path.join(sharded, "meta.json"))  # a shard does not finish
    prepare.main(["--merge", "--out", sharded])
    assert dataset_files(sharded) == dataset_files(whole)  # parts folders deleted too
    assert "already holds a finished dataset" in refused(["--merge", "--out", sharded], capsys)
    assert "no parts folders" in refused(["--merge", "--out", sharded, "--overwrite"], capsys)
    assert dataset_files(sharded) == dataset_files(whole)  # a refused overwrite keeps it whole


def test_shard_resumes_and_checks_settings(tmp_path, monkeypatch, capsys):
    write_corpus(str(tmp_path / "src"), n_speakers=2, per_speaker=3)
    monkeypatch.setattr(prepare, "CHUNK", 1)  # 6 chunks: shard 1/2 gets 1, 3 and 5
    out = str(tmp_path / "out")
    argv = ["--layout", "folder", "--src", str(tmp_path / "src"), "--out", out,
            "--codec", "untrained", "--shard", "1/2"]
    real, calls = prepare.load_one, []

    def crash_on_second(*a):
        calls.append(a[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in its second chunk, chunk 3
        return real(*a)
    monkeypatch.setattr(prepare, "load_one", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(argv)
    assert "other settings (max_seconds)" in refused(argv + ["--max-seconds", "9"], capsys)
    calls.clear()
    monkeypatch.setattr(prepare, "load_one", lambda *a: calls.append(a[0]) or real(*a))
    # speed settings may change between runs: they do not change what is encoded
    prepare.main(argv + ["--batch-size", "3", "--device", "cpu"])
    assert len(calls) == 2  # chunks 3 and 5
    assert sorted(os.listdir(os.path.join(out, "parts-1of2"))) == [
        "00001.npz", "00003.npz", "00005.npz", "settings.json"]


@pytest.mark.parametrize("flags, message", [
    (["--shard", "2/2"], "--shard wants i/n"), (["--shard", "x"], "--shard wants i/n"),
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--batch-size", "0"], "--batch-size must be 1 or more"),
    (["--min-seconds", "-1"], "--min-seconds (-1.0) must be 0 or more"),
    (["--min-seconds", "5", "--max-seconds", "5"], "below --max-seconds"),
    (["--merge", "--shard", "0/2"], "give it no --shard"),
])
def test_bad_flags_stop_before_writing(tmp_path, capsys, flags, message):
    write_corpus(str(tmp_path / "src"), n_speakers=1, per_speaker=1)
    out = tmp_path / "out"
    assert message in refused(["--layout", "folder", "--src", str(tmp_path / "src"),
                               "--out", str(out), "--codec", "untrained", *flags], capsys)
    assert not out.exists()


def test_a_codec_that_cannot_load_stops_before_writing(tmp_path, capsys):
    write_corpus(str(tmp_path / "src"), n_speakers=1, per_speaker=1)
    (tmp_path / "bad.th").write_bytes(b"not EnCodec's weights")
    out = tmp_path / "out"
    error = refused(["--layout", "folder", "--src", str(tmp_path / "src"), "--out", str(out),
                     "--codec", "pretrained", "--encodec-checkpoint", str(tmp_path / "bad.th")], capsys)
    assert "cannot load pretrained EnCodec" in error and "\n" not in error.strip()
    assert not out.exists()


def test_merge_without_parts(tmp_path, capsys):
    assert "does not exist" in refused(["--merge", "--out", str(tmp_path / "nope")], capsys)
    assert "no parts folders" in refused(["--merge", "--out", str(tmp_path)], capsys)
    assert "--layout and --src are required" in refused(["--out", str(tmp_path)], capsys)


def test_progress_shows_real_time_multiples_to_two_digits():
    assert [prepare.times(s) for s in (0.0042, 0.42, 1.4, 9.96, 37.4)] == \
        ["0.0042x", "0.42x", "1.4x", "10x", "37x"]
