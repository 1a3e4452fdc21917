"""eval.py: the token-space helpers, the speaker pairing, the LibriSpeech reader, bad inputs, and
a run end to end on the demo corpus with a tiny random checkpoint (untrained codec)."""
import csv
import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ROOT, random_checkpoint, run_script
from extras import batched

spec = importlib.util.spec_from_file_location("evaluation", os.path.join(ROOT, "eval.py"))
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)


# -----------------------------------------------------------------------------
# Token space and pairing


def test_code_edit_distance_counts_codebook0_edits_over_the_reference_length():
    ref = torch.tensor([1, 2, 3, 4])
    assert ev.code_edit_distance(ref, ref) == 0.0
    assert ev.code_edit_distance([1, 2, 9, 4], ref) == 0.25  # one substitution
    assert ev.code_edit_distance([1, 2, 4], ref) == 0.25  # one deletion
    assert ev.code_edit_distance([1, 2, 3, 4, 5], ref) == 0.25  # one insertion
    assert ev.code_edit_distance([], ref) == 1.0  # all deleted
    assert ev.code_edit_distance([1, 2, 3, 4, 7, 7, 7, 7], ref) == 1.0  # twice as long
    # (8, T) codes: codebook 0 only; the other seven may differ
    a, b = torch.randint(0, 1024, (2, 8, 30))
    b[0] = a[0]
    assert ev.code_edit_distance(a, b) == 0.0
    b[0, 5] = (a[0, 5] + 1) % 1024
    assert ev.code_edit_distance(a, b) == pytest.approx(1 / 30)


def test_code_edits_agree_with_rapidfuzz_on_random_sequences():
    """eval.py's own edit distance (numpy, for the core install) against rapidfuzz's."""
    from rapidfuzz.distance import Levenshtein
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = (rng.integers(0, 4, rng.integers(0, 25)).tolist() for _ in range(2))
        assert ev.code_edits(a, b) == Levenshtein.distance(a, b), (a, b)


def test_code_error_rate_is_corpus_level_like_wer():
    pairs = [([1, 2, 9, 4], [1, 2, 3, 4]),  # 1 edit of 4
             ([5, 5], [6, 7])]  # 2 edits of 2
    assert ev.code_error_rate(pairs) == 3 / 6  # not the mean of 0.25 and 1.0
    assert ev.code_error_rate([([1, 2], [1, 2])]) == 0.0


def test_token_references_skip_the_prompt_in_continuation_only():
    def utt(codes):
        return ev.Utterance("u", "text", "s", torch.zeros(len(codes) * ev.HOP),
                            torch.tensor(codes).expand(8, -1))
    u, other = utt(list(range(10))), utt(list(range(100, 112)))
    ref, base = ev.token_references("continuation", u, other, prompt_frames=4)
    assert ref[0].tolist() == list(range(4, 10)) and base[0].tolist() == list(range(104, 112))
    # new codes all wrong score 1 (6 edits over 6), not 0.6 (against prompt + continuation)
    assert ev.code_edit_distance(torch.arange(200, 206), ref) == 1.0
    ref, base = ev.token_references("cross", u, other, prompt_frames=4)
    assert ref[0].tolist() == list(range(10)) and base[0].tolist() == list(range(100, 112))


def test_along_speaker_pairs_within_each_speaker_cyclically():
    speakers = ["a", "a", "a", "b", "b", "c", "a"]  # a's list: 0, 1, 2, 6
    assert ev.along_speaker(speakers, -1) == [6, 0, 1, 4, 3, 5, 2]  # the first with the last
    assert ev.along_speaker(speakers, +1) == [1, 2, 6, 4, 3, 5, 0]


def test_select_per_speaker_then_limit():
    items = [(f"{s}{n}", "", "", s) for s in "ab" for n in range(4)]
    assert [i[0] for i in ev.select(items, per_speaker=2)] == ["a0", "a1", "b0", "b1"]
    assert [i[0] for i in ev.select(items, per_speaker=3, limit=4)] == ["a0", "a1", "a2", "b0"]
    assert ev.select(items) == items


# -----------------------------------------------------------------------------
# LibriSpeech's layout and bad inputs


def librispeech_tree(root, seconds_by_utt):
    """A fake LibriSpeech folder: speaker/chapter/utt.flac tones and the chapter's trans.txt."""
    chapters = {}
    for utt, seconds in seconds_by_utt.items():
        speaker, chapter, _ = utt.split("-")
        folder = os.path.join(root, speaker, chapter)
        os.makedirs(folder, exist_ok=True)
        t = np.arange(int(seconds * 16000)) / 16000
        sf.write(os.path.join(folder, utt + ".flac"), (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
        chapters.setdefault((speaker, chapter), []).append(f"{utt} HELLO THERE NUMBER {utt[-1]}")
    for (speaker, chapter), lines in chapters.items():
        with open(os.path.join(root, speaker, chapter, f"{speaker}-{chapter}.trans.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def test_librispeech_layout_reads_trans_txt_and_keeps_4_to_10_seconds(tmp_path):
    librispeech_tree(str(tmp_path), {"19-198-0001": 3.0, "19-198-0000": 5.0, "19-227-0000": 11.0,
                                     "103-1240-0000": 4.5, "103-1240-0002": 9.5})
    assert ev.LAYOUTS["librispeech"] is ev.prepare.librispeech  # one reader: data/prepare.py's
    items = ev.LAYOUTS["librispeech"](str(tmp_path))
    assert [i[0] for i in items] == ["103-1240-0000", "103-1240-0002", "19-198-0000", "19-198-0001",
                                     "19-227-0000"]  # sorted ids: each speaker's official order
    utt, path, text, speaker = items[2]
    assert path == os.path.join(str(tmp_path), "19", "198", "19-198-0000.flac") and os.path.isfile(path)
    assert text == "HELLO THERE NUMBER 0" and speaker == "19"
    args = ev.parse_args(["--layout", "librispeech", "--src", str(tmp_path)])
    assert [i[0] for i in ev.list_utterances(args)] == ["103-1240-0000", "103-1240-0002", "19-198-0000"]
    args = ev.parse_args(["--layout", "librispeech", "--src", str(tmp_path), "--min-seconds", "2"])
    assert len(ev.list_utterances(args)) == 4  # 3 s kept, 11 s still out
    args = ev.parse_args(["--layout", "librispeech", "--src", str(tmp_path), "--per-speaker", "2",
                          "--limit", "3"])
    assert [i[0] for i in ev.list_utterances(args)] == ["103-1240-0000", "103-1240-0002", "19-198-0000"]


@pytest.fixture(scope="module")
def short_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("short")
    librispeech_tree(str(root), {"7-1-0000": 2.0, "7-1-0001": 2.5})  # none within 4-10 s
    (root / "file.txt").write_text("not a folder")
    return root


BAD = [
    (["--layout", "librispeech"], "the following arguments are required: --src"),
    (["--layout", "timit", "--src", "."], "argument --layout: invalid choice: 'timit'"),
    (["--layout", "librispeech", "--src", "{root}/nowhere"], "does not exist"),
    (["--layout", "librispeech", "--src", "{root}"], "none of the 2 utterances"),
    (["--layout", "librispeech", "--src", "{root}", "--min-seconds", "1"], "cannot write to"),
    (["--layout", "librispeech", "--src", "{root}", "--min-seconds", "1", "--out", "{root}/file.txt"],
     "is a file"),
    (["--layout", "librispeech", "--src", "{root}", "--min-seconds", "1", "--out", "{root}/o"],
     "no checkpoint at"),  # the input is fine: the checkpoint is missing
    (["--layout", "folder", "--src", "{root}", "--modes", "continuation,both"], "--modes"),
    (["--layout", "folder", "--src", "{root}", "--prompt-seconds", "0"], "--prompt-seconds must be positive"),
    (["--layout", "folder", "--src", "{root}", "--per-speaker", "1"], "--per-speaker must be at least 2"),
    (["--layout", "folder", "--src", "{root}", "--limit", "0"], "--limit must be at least 1"),
    (["--layout", "folder", "--src", "{root}", "--top-p", "nan"], "--top-p must be in [0, 1]"),
    (["--layout", "folder", "--src", "{root}", "--asr", "kaldi"], "--asr must be whisper or whisper:<model>"),
    (["--layout", "folder", "--src", "{root}", "--speaker-encoder", "ecapa"],
     "argument --speaker-encoder: invalid choice"),
    (["--layout", "folder", "--src", "{root}", "--min-seconds", "5", "--max-seconds", "2"],
     "--min-seconds (5) must be below --max-seconds (2)"),
    (["--layout", "librispeech", "--src", "{root}", "--min-seconds", "11"],
     "--min-seconds (11) must be below --max-seconds (10)"),
]


@pytest.mark.parametrize("argv,match", BAD, ids=[m for _, m in BAD])
def test_bad_input_gets_one_line_and_status_2_and_writes_nothing(argv, match, short_tree, capsys):
    argv = [a.format(root=short_tree) for a in argv] + ["--checkpoint", str(short_tree / "none.pt")]
    if "cannot write to" in match:
        argv += ["--out", str(short_tree / "missing" / "o")]
    before = sorted(p for p in short_tree.rglob("*"))
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert sorted(p for p in short_tree.rglob("*")) == before


def test_a_missing_extra_stops_the_run_before_any_work(tmp_path, monkeypatch, capsys):
    """Without jiwer (what scores the WER) a full evaluation stops while it loads its scorers:
    one line naming the package, nothing generated, nothing written."""
    import valle
    random_checkpoint(tmp_path / "model.pt")

    def refuse(*args, **kwargs):
        raise AssertionError("work began before the run's needs were checked")
    monkeypatch.setattr(batched, "generate", refuse)
    monkeypatch.setattr(valle.Codec, "encode", refuse)
    monkeypatch.setitem(sys.modules, "jiwer", None)
    with pytest.raises(SystemExit) as e:
        ev.main(["--checkpoint", str(tmp_path / "model.pt"), "--layout", "folder", "--src",
                 os.path.join(ROOT, "data", "demo"), "--per-speaker", "2", "--limit", "2",
                 "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the optional package jiwer" in err[0], err
    assert not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------
# End to end on the demo corpus


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """eval.py on 6 demo utterances (3 of gb_male, 3 of scot_female: 3 make the previous and the
    next utterance differ), a tiny random checkpoint, the untrained test codec."""
    d = tmp_path_factory.mktemp("eval")
    random_checkpoint(d / "model.pt")
    out = run_script("eval.py", "--checkpoint", str(d / "model.pt"), "--layout", "folder",
                     "--src", os.path.join(ROOT, "data", "demo"), "--per-speaker", "3", "--limit", "6",
                     "--prompt-seconds", "1.5", "--max-new-seconds", "1", "--out", str(d / "out"),
                     env={"OMP_NUM_THREADS": "1"})  # resemblyzer's LSTM crawls with 2 threads on a busy 2-core CPU
    return d, out


def table_row(stdout, mode, system):
    """The printed table's figures for one row: [SIM, WER %, duration, c0 edit, baseline]."""
    for line in stdout.splitlines():
        if line.startswith(mode) and system in line:
            cells = line[len(mode):].replace(system, "").split()
            return [None if c == "-" else float(c.rstrip("*")) for c in cells]
    raise AssertionError(f"no {mode} {system!r} row in:\n{stdout}")


def test_demo_run_prints_ground_truth_model_and_paper_rows(demo_run):
    d, out = demo_run
    assert out.returncode == 0, out.stderr
    assert "6 utterances of 2 speakers" in out.stdout
    assert "test codec (untrained-seed0)" in out.stderr and "* a test codec" in out.stdout
    # The real recordings through Whisper tiny.en and resemblyzer, measured with this command: WER
    # 9.6%, SIM 0.936 (continuation) and 0.882 (cross): robotic espeak voices, yet words.
    for mode in ("continuation", "cross"):
        sim, wer, *rest = table_row(out.stdout, mode, "recordings (ground truth)")
        assert wer < 30 and sim > (0.7 if mode == "continuation" else 0.5), out.stdout
        assert sim < 0.99, out.stdout  # a recording against itself would be 1: not the prompt
        assert rest == [None, None, None]
        sim, wer, duration, c0, baseline = table_row(out.stdout, mode, "this model, G=2")
        assert f"{wer:.1f}*" in out.stdout and 0 < duration and c0 > 0 and baseline > 0
        assert table_row(out.stdout, mode, "paper: ground truth")[:2] == (
            [0.905, 1.6] if mode == "continuation" else [0.779, 1.6])
        assert table_row(out.stdout, mode, "paper: VALL-E 2, G=2")[:2] == (
            [0.777, 1.5] if mode == "continuation" else [0.635, 1.5])


def test_demo_run_writes_outputs_and_pairs_each_utterance_with_the_previous_one(demo_run):
    d, out = demo_run
    assert out.returncode == 0, out.stderr
    with open(d / "out" / "scores.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["mode"] for r in rows] == ["continuation"] * 6 + ["cross"] * 6
    cross = {r["utterance"]: r["prompt"] for r in rows if r["mode"] == "cross"}
    assert cross == {"gb_male/gb_male_00": "gb_male/gb_male_02",  # the first with the last
                     "gb_male/gb_male_01": "gb_male/gb_male_00",
                     "gb_male/gb_male_02": "gb_male/gb_male_01",
                     "scot_female/scot_female_00": "scot_female/scot_female_02",
                     "scot_female/scot_female_01": "scot_female/scot_female_00",
                     "scot_female/scot_female_02": "scot_female/scot_female_01"}
    for mode in ("continuation", "cross"):  # the printed duration: output over recording
        ratios = [float(r["output_seconds"]) / float(r["seconds"]) for r in rows if r["mode"] == mode]
        assert table_row(out.stdout, mode, "this model, G=2")[2] == pytest.approx(sum(ratios) / 6, abs=0.006)
    for r in rows:
        assert float(r["baseline"]) > 0.3  # another sentence's codes, not the reference itself
        output, _ = sf.read(d / "out" / r["mode"] / (r["utterance"] + ".wav"))
        assert len(output) / 24000 == pytest.approx(float(r["output_seconds"]), abs=1e-3)
        if r["mode"] == "continuation":  # the prompt (112 frames), then at most 1 s (75 frames)
            assert r["prompt"] == r["utterance"] and 112 < len(output) / 320 <= 112 + 76


class Lengths:
    """A speaker-encoder stand-in: an 'embedding' is the waveform's length."""
    def __init__(self, backend):
        pass

    def embed(self, wav, sr):
        return np.array([float(len(wav))])


class Echo:
    """An ASR stand-in that hears "hello" in everything."""
    name = "echo"  # what eval.py prints under its table

    def __init__(self, backend):
        pass

    def transcribe(self, wav, sr):
        return "hello"


def test_what_each_mode_prompts_with_and_compares(tmp_path, monkeypatch):
    """In process, with stand-ins: an 'embedding' is the waveform's length and a 'similarity' the
    ratio of two lengths, so each SIM says which two waveforms it compared."""
    from extras import scorers
    import valle
    random_checkpoint(tmp_path / "model.pt")
    calls = []
    generate = batched.generate

    def spy(ar, nar, texts, prompt_codes, prompt_text, *a, **k):
        calls.append((texts[0], prompt_codes.shape[1], prompt_text))
        return generate(ar, nar, texts, prompt_codes, prompt_text, *a, **k)

    monkeypatch.setattr(batched, "generate", spy)
    monkeypatch.setattr(scorers, "SpeakerEncoder", Lengths)
    monkeypatch.setattr(scorers, "ASR", Echo)
    monkeypatch.setattr(scorers, "similarity", lambda enc, wav, sr, ref: len(wav) / ref[0])
    ev.main(["--checkpoint", str(tmp_path / "model.pt"), "--layout", "folder", "--src",
             os.path.join(ROOT, "data", "demo"), "--per-speaker", "3", "--limit", "3",
             "--prompt-seconds", "1.5", "--max-new-seconds", "0.5", "--out", str(tmp_path / "o")])
    with open(tmp_path / "o" / "scores.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    texts = {r["utterance"]: r["text"] for r in rows}
    seconds = {r["utterance"]: float(r["seconds"]) for r in rows}
    P = int(1.5 * valle.FRAME_RATE)  # 112 prompt frames
    for r, (text, prompt_frames, prompt_text) in zip(rows, calls):
        out_len = float(r["output_seconds"]) * valle.SAMPLE_RATE
        assert text == r["text"]
        assert float(r["duration_ratio"]) == pytest.approx(float(r["output_seconds"]) / float(r["seconds"]), abs=1e-3)
        if r["mode"] == "continuation":  # its own start, no transcript: the text says it all
            assert prompt_frames == P and prompt_text is None and r["prompt"] == r["utterance"]
            assert float(r["sim"]) == pytest.approx(out_len / (P * ev.HOP), abs=1e-3)  # vs the prompt
            # the recording: its first 1.5 s against all of it
            assert float(r["recording_sim"]) == pytest.approx(P * ev.HOP / (seconds[r["utterance"]] * 24000), abs=1e-3)
        else:  # the previous utterance of the speaker, with its transcript
            assert prompt_text == texts[r["prompt"]] and r["prompt"] != r["utterance"]
            prompt_len = seconds[r["prompt"]] * valle.SAMPLE_RATE
            assert float(r["sim"]) == pytest.approx(out_len / prompt_len, rel=1e-3)
            assert float(r["recording_sim"]) == pytest.approx(seconds[r["utterance"]] * prompt_len * 24000, rel=1e-3)
    assert len(calls) == len(rows) == 6


def test_real_c0_row_runs_the_nar_over_each_recordings_own_codebook0(tmp_path, monkeypatch, capsys):
    """--real-c0: the NAR gets the recording's real codebook 0 (continuation: after its own
    prompt; cross: all of it, under the previous utterance's prompt and transcript), and the row
    scores the decoded output (continuation: prompt included) as the model's row is scored."""
    from extras import scorers
    import valle
    random_checkpoint(tmp_path / "model.pt")
    loaded, nar_calls = [], []
    load, nar = ev.load_utterances, valle.generate_nar

    def load_spy(*a, **k):
        loaded.append(load(*a, **k))
        return loaded[-1]

    def nar_spy(model, text, text_valid, prompt, c0_list):
        nar_calls.append((text[0][text_valid[0]].tolist(), prompt.cpu(), c0_list[0].cpu()))
        return nar(model, text, text_valid, prompt, c0_list)

    monkeypatch.setattr(ev, "load_utterances", load_spy)
    monkeypatch.setattr(valle, "generate_nar", nar_spy)
    monkeypatch.setattr(scorers, "SpeakerEncoder", Lengths)
    monkeypatch.setattr(scorers, "ASR", Echo)
    monkeypatch.setattr(scorers, "similarity", lambda enc, wav, sr, ref: len(wav) / ref[0])
    ev.main(["--checkpoint", str(tmp_path / "model.pt"), "--layout", "folder", "--src",
             os.path.join(ROOT, "data", "demo"), "--per-speaker", "3", "--limit", "3",
             "--prompt-seconds", "1.5", "--max-new-seconds", "0.2", "--real-c0"])
    stdout = capsys.readouterr().out
    [(utts, _)] = loaded
    P = int(1.5 * valle.FRAME_RATE)
    real = nar_calls[:6]  # the row's passes come first, then the model's own (after its AR)
    assert len(nar_calls) == 12
    sims = {"continuation": [], "cross": []}
    for k, (text, prompt, c0) in enumerate(real):
        mode, i = ("continuation", k) if k < 3 else ("cross", k - 3)
        u, previous = utts[i], utts[(i - 1) % 3]
        if mode == "continuation":
            assert torch.equal(c0, u.codes[0, P:]) and torch.equal(prompt, u.codes[:, :P])
            assert text == valle.text_to_ids(u.text)
            sims[mode].append(u.codes.shape[1] / P)  # the prompt's frames and the rest, decoded
        else:
            assert torch.equal(c0, u.codes[0]) and torch.equal(prompt, previous.codes)
            assert text == valle.join_phones(valle.text_to_ids(previous.text), valle.text_to_ids(u.text))
            sims[mode].append(u.codes.shape[1] * ev.HOP / len(previous.wav))
    for mode in ("continuation", "cross"):
        sim, wer, *rest = table_row(stdout, mode, "NAR on the real codebook 0")
        assert sim == pytest.approx(sum(sims[mode]) / 3, abs=1e-3) and rest == [None, None, None]
        assert wer == table_row(stdout, mode, "this model, G=2")[1]  # "hello" for every output


def test_tokens_only_scores_the_text_gaps_without_decoding_or_scorers(tmp_path, monkeypatch, capsys):
    """--tokens-only: no ASR, speaker encoder or decoding; each row's text gaps compare the
    utterance's own text with the text of the sentence its baseline codes come from (the next
    one of its speaker), under the mode's prompt; the table prints their means."""
    from extras import scorers
    import valle
    random_checkpoint(tmp_path / "model.pt")
    calls, gaps = [], ev.text_gaps

    def spy(ar, nar, text, other_text, prompt_codes, prompt_text, reference, languages):
        assert languages == ("en", "en", "en")
        real = gaps(ar, nar, text, other_text, prompt_codes, prompt_text, reference, languages)
        assert all(map(math.isfinite, real))  # about 0 for a random model: stand in for them
        result = (0.1 * len(calls), -0.05 * len(calls) - 1)
        calls.append((text, other_text, prompt_codes.shape[1], prompt_text, reference, result))
        return result

    def refuse(*args, **kwargs):
        raise AssertionError("--tokens-only must not decode, transcribe or embed")
    monkeypatch.setattr(ev, "text_gaps", spy)
    monkeypatch.setattr(scorers, "ASR", refuse)
    monkeypatch.setattr(scorers, "SpeakerEncoder", refuse)
    monkeypatch.setattr(valle.Codec, "decode", refuse)
    for extra in ("jiwer", "rapidfuzz", "rapidfuzz.distance"):  # the core install: no extras
        monkeypatch.setitem(sys.modules, extra, None)
    ev.main(["--checkpoint", str(tmp_path / "model.pt"), "--layout", "folder", "--src",
             os.path.join(ROOT, "data", "demo"), "--per-speaker", "3", "--limit", "6",
             "--prompt-seconds", "1.5", "--max-new-seconds", "0.5", "--tokens-only",
             "--out", str(tmp_path / "o")])
    with open(tmp_path / "o" / "scores.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == len(calls) == 12
    texts = {r["utterance"]: r["text"] for r in rows}
    following = {"gb_male/gb_male_00": "gb_male/gb_male_01", "gb_male/gb_male_01": "gb_male/gb_male_02",
                 "gb_male/gb_male_02": "gb_male/gb_male_00"}
    P = int(1.5 * valle.FRAME_RATE)
    for r, (text, other_text, prompt_frames, prompt_text, reference, result) in zip(rows, calls):
        assert text == r["text"]
        if r["utterance"] in following:
            assert other_text == texts[following[r["utterance"]]]
        assert (float(r["ar_gap"]), float(r["nar_gap"])) == pytest.approx(result, abs=1e-4)
        if r["mode"] == "continuation":  # after its own first 1.5 s
            assert prompt_frames == P and prompt_text is None
        else:
            assert prompt_text == texts[r["prompt"]] and prompt_text != text
        whole = float(r["seconds"]) * valle.FRAME_RATE  # the real codes, after the prompt
        assert abs(reference.shape[1] - (whole - (P if r["mode"] == "continuation" else 0))) <= 1
    out = capsys.readouterr().out
    for mode in ("continuation", "cross"):
        line = next(l for l in out.splitlines() if l.startswith(mode))
        *_, ar_gap, nar_gap = line.split()
        mine = [c[-1] for c, r in zip(calls, rows) if r["mode"] == mode]
        assert float(ar_gap) == pytest.approx(sum(g[0] for g in mine) / 6, abs=1e-3)
        assert float(nar_gap) == pytest.approx(sum(g[1] for g in mine) / 6, abs=1e-3)
