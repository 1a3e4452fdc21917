"""Other languages (VALL-E X): the IPA frontend, the language embedding, files made before
languages were added, and a bilingual corpus end to end (the last needs espeak-ng)."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

import valle
from extras import batched, cli, languages, long_text
from conftest import run_script

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None and not os.environ.get("CI"),
                                  reason="espeak-ng is not installed (apt install espeak-ng)")  # CI: fails
BEFORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "before_languages")
DE = valle.LANGUAGE_ID["de"] * valle.PHONE_SLOTS  # a German token's high bits


# --- the phone and language tables ------------------------------------------------

def test_phone_table_only_grows_at_its_end():
    with open(os.path.join(BEFORE, "dataset", "meta.json")) as f:
        before = json.load(f)["phones"]  # the table before languages were added
    assert len(before) == 3 + 6 + 70 and valle.PHONES[: len(before)] == before
    assert cli.known_phones(before) and cli.known_phones(valle.PHONES)
    assert not cli.known_phones(before[:5] + before[6:]) and not cli.known_phones([])
    # today's table, pinned: a change that reorders or removes a symbol must fail here
    # (appending is fine: then pin the longer table)
    assert len(valle.PHONES) == 206 <= valle.PHONE_SLOTS
    digest = hashlib.sha1("\n".join(valle.PHONES).encode()).hexdigest()
    assert digest == "9aa5a5b82517e19ee58d4cc2e1b18b7996727468", digest


def test_unknown_language_is_one_error_that_lists_the_supported_ones():
    for call in (lambda: valle.text_to_ids("Hallo.", "xx"), lambda: valle.phonemize("Hallo", "EN")):
        with pytest.raises(ValueError, match="unknown language .*choose one of en, de, es, fr"):
            call()


def test_english_is_unchanged_and_carries_no_language_bits():
    assert valle.phonemize("Hello, world.") == ["HH", "AH0", "L", "OW1", "_", ",", "_", "W",
                                                 "ER1", "L", "D", "_", "."]
    ids = valle.text_to_ids("Hello, world.")
    assert ids == valle.text_to_ids("Hello, world.", "en") and max(ids) < valle.PHONE_SLOTS


# --- segmenting eSpeak NG's IPA (no espeak-ng needed) -----------------------------

def test_segment_ipa_cuts_units_marks_and_diacritics():
    seg = languages.segment_ipa
    assert seg("tsvˈœlf pfˈeːɾdə") == ["ts", "v", "ˈ", "œ", "l", "f", "_",
                                       "pf", "ˈ", "e", "ː", "ɾ", "d", "ə"]
    assert seg("t\u0361svˈœlf") == seg("tsvˈœlf")  # tie bars, present or not, cut the same
    assert seg("dˈɔ\u0361øtʃ") == ["d", "ˈ", "ɔø", "tʃ"]
    assert seg("bˈɔ̃ le-z ɑ̃fˈɑ̃") == ["b", "ˈ", "ɔ̃", "_", "l", "e", "z", "_", "ɑ̃", "f", "ˈ", "ɑ̃"]
    assert seg("(en)kəmpjˈuːtɚ(de) ja") == ["k", "ə", "m", "p", "j", "ˈ", "u", "ː", "t", "ɚ",
                                            "_", "j", "a"]
    assert seg("ɪç") == seg("ɪc\u0327") == ["ɪ", "ç"]  # precomposed or combining cedilla
    assert seg("ã") == seg("a\u0303") == ["ã"]
    assert all(s in valle.PHONE_ID for s in seg("tsvˈœlf bˈɔ̃ le-z ɑ̃fˈɑ̃ ɪç ã"))


def test_symbols_outside_the_table_read_as_unk_and_are_counted(monkeypatch):
    monkeypatch.setattr(languages, "_espeak", lambda clauses, voice: ["ʘaʘ ǀa"] * len(clauses))
    assert valle.phonemize("Klick.", "de") == ["ʘ", "a", "ʘ", "_", "ǀ", "a", "_", "."]
    ids = valle.text_to_ids("Klick.", "de")
    unk, a = DE + valle.UNK_ID, DE + valle.PHONE_ID["a"]
    assert ids[:6] == [unk, a, unk, DE + valle.PHONE_ID["_"], unk, a]
    assert languages.count_unknown(ids) == 3


def test_punctuation_goes_back_between_the_clauses(monkeypatch):
    seen = []
    monkeypatch.setattr(languages, "_espeak", lambda clauses, voice: seen.extend(clauses) or
                        ["a"] * len(clauses))
    assert valle.phonemize("¿Uno, dos; tres? ¡Sí!", "es") == [
        "a", "_", ",", "_", "a", "_", ",", "_", "a", "_", "?", "_", "a", "_", "!"]
    assert [c.strip() for c in seen] == ["Uno", "dos", "tres", "Sí"]


def test_missing_espeak_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng there
    with pytest.raises(FileNotFoundError, match="espeak-ng is missing.*apt-get install espeak-ng"):
        valle.text_to_ids("Guten Morgen.", "de")
    assert valle.text_to_ids("Good morning.")  # English needs no espeak-ng


# --- the IPA frontend on eSpeak NG (properties and words stable across 1.51 and 1.52) ------

@needs_espeak
def test_german_ipa():
    text = "Ich spreche Deutsch, und du? Zwölf Katzen."
    phones = valle.phonemize(text, "de")
    assert "ç" in phones[:3] and "ʃ" in phones and "tʃ" in phones  # ich, spreche, Deutsch
    assert phones.count(",") == 1 and phones.count("?") == 1 and phones[-1] == "."
    assert phones[phones.index("?") + 2] == "ts"  # "Zwölf" starts with the affricate
    assert phones.count("_") == 9  # between 7 words and 3 marks
    assert "ˈ" in phones and "ː" in phones  # stress and length: symbols of their own
    assert languages.count_unknown(valle.text_to_ids(text, "de")) == 0


@needs_espeak
def test_spanish_ipa():
    phones = valle.phonemize("Mañana, el niño come en la ciudad.", "es")
    assert phones.count("ɲ") == 2 and "θ" in phones  # mañana, niño; ciudad (Castilian)
    assert phones.count(",") == 1 and phones[-1] == "."


@needs_espeak
def test_french_ipa():
    phones = valle.phonemize("Un bon vin blanc, rouge!", "fr")
    assert {"ɔ̃", "ɑ̃"} <= set(phones)  # nasal vowels: one symbol each
    assert "ʁ" in phones and "ʒ" in phones and phones[-1] == "!"


@needs_espeak
def test_the_corpus_grammars_need_no_unk_and_numbers_are_read():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_corpus", os.path.join(
        os.path.dirname(BEFORE), "..", "..", "data", "make_corpus.py"))
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    for language, words in [("de", make_corpus.SUBJECTS_DE + make_corpus.VERBS_DE
                              + make_corpus.OBJECTS_DE + make_corpus.PLACES_DE),
                            ("es", make_corpus.SUBJECTS_ES + make_corpus.VERBS_ES
                             + make_corpus.OBJECTS_ES + make_corpus.PLACES_ES)]:
        ids = valle.text_to_ids(", ".join(words) + ".", language)
        assert languages.count_unknown(ids) == 0, language
        assert all(valle.LANGUAGE_ID[language] == t // valle.PHONE_SLOTS for t in ids)
    assert valle.phonemize("12", "de")[0] == "ts"  # zwölf


# --- the language embedding (VALL-E X §3) -------------------------------------------

def text_batch(language):
    phones = [valle.PHONE_ID[p] for p in ["h", "ˈ", "a", "l", "o", "_", "v", "ɛ", "l", "t"]]
    return valle.pad_ids([[valle.LANGUAGE_ID[language] * valle.PHONE_SLOTS + p for p in phones]])


def ar_logits(ar, text, text_valid, c0):
    groups = valle.group_codes(c0, ar.cfg.group_size)[None, :-1]  # (1, N, G)
    return ar(groups, None, None, text, text_valid)


def test_the_language_embedding_changes_the_outputs_and_nothing_else(models):
    ar, nar = models
    c0 = torch.arange(10, 30)
    codes = torch.randint(0, valle.CODEBOOK_SIZE, (1, valle.N_CODEBOOKS, 20),
                          generator=torch.Generator().manual_seed(0))
    valid = torch.ones(1, 10, dtype=torch.bool)

    def outputs(language):
        text, text_valid = text_batch(language)
        return (ar_logits(ar, text, text_valid, c0),
                nar(text, text_valid, codes[:, :, :8], valid[:, :8], codes[:, :, 8:],
                    torch.ones(1, 12, dtype=torch.bool), 3))
    masked = outputs("en")  # English's row is zero: the phones alone, the English-only path
    assert all(torch.equal(a, b) for a, b in zip(outputs("de"), masked))  # zero rows: no effect
    with torch.no_grad():
        for model in models:
            model.language_emb.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    german, spanish, english = outputs("de"), outputs("es"), outputs("en")
    assert all(torch.equal(a, b) for a, b in zip(english, masked))  # English: never an offset
    for g, s, m in zip(german, spanish, masked):
        assert (g - m).abs().max() > 1e-2 and (g - s).abs().max() > 1e-2
    # the language reaches the outputs through the text tokens only: German tokens whose
    # phone embeddings have German's row taken off compute what the phones alone did
    with torch.no_grad():
        ids = text_batch("de")[0][0] % valle.PHONE_SLOTS
        for model in models:
            model.text_emb.weight[ids] -= model.language_emb[0]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outputs("de"), masked))


def test_prompt_and_target_carry_their_own_language():
    target = [DE + valle.PHONE_ID[p] for p in ["h", "ˈ", "a", "l", "o"]]
    text, valid = valle.prompted_text(valle.get_config("tiny"), [target], "Good morning.",
                                      prompt_language="en")
    text = text[0][valid[0]].tolist()
    prompt = valle.text_to_ids("Good morning.")
    assert text == prompt + [valle.PHONE_ID["_"]] + target
    assert max(text[: len(prompt) + 1]) < valle.PHONE_SLOTS and min(text[len(prompt) + 1:]) >= DE


@needs_espeak
def test_a_german_prompt_transcript_carries_german():
    target = valle.text_to_ids("Good morning.")
    text, valid = valle.prompted_text(valle.get_config("tiny"), [target], "Guten Morgen.",
                                      prompt_language="de")
    text = text[0][valid[0]].tolist()
    prompt = text[: len(text) - len(target) - 1]
    assert prompt == valle.text_to_ids("Guten Morgen.", "de") and min(prompt) >= DE
    assert text[len(prompt):] == [valle.PHONE_ID["_"]] + target


def test_english_only_training_leaves_the_language_embedding_at_zero(models):
    ar, nar = models
    ar.train()
    text, text_valid = valle.pad_ids([valle.text_to_ids("Hello world."), valle.text_to_ids("Hi.")])
    codes = torch.randint(0, valle.CODEBOOK_SIZE, (2, valle.N_CODEBOOKS, 30))
    loss, _ = ar.loss(text, text_valid.sum(1), codes, torch.tensor([30, 20]))
    loss.backward()
    assert ar.language_emb.grad.abs().max() == 0 and ar.text_emb.weight.grad.abs().max() > 0
    german = torch.tensor([[DE + valle.PHONE_ID["a"]] * 4])
    loss, _ = ar.loss(german, torch.tensor([4]), codes[:1], torch.tensor([30]))
    ar.zero_grad()
    loss.backward()
    rows = ar.language_emb.grad.abs().sum(1)
    assert rows[0] > 0 and rows[1:].abs().max() == 0  # only German's row (row 0 = language 1)


# --- files made before languages were added (tests/data/make_before_languages.py) ----------

def test_a_checkpoint_from_before_gives_exactly_the_codes_it_gave():
    with open(os.path.join(BEFORE, "expected.json")) as f:
        expected = json.load(f)
    cfg, ar, nar, ckpt = cli.load_checkpoint(os.path.join(BEFORE, "checkpoint.pt"))
    saved = torch.load(os.path.join(BEFORE, "checkpoint.pt"), weights_only=True)["phones"]
    assert len(saved) == 79 and ckpt["phones"] == valle.PHONES  # brought up to date
    assert ar.text_emb.weight.shape[0] == len(valle.PHONES)
    assert ar.language_emb.abs().max() == 0 and nar.language_emb.abs().max() == 0
    prompt = torch.load(os.path.join(BEFORE, "prompt.pt"), weights_only=True)["prompt"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the codes were made
    try:
        for name, sampling in [("greedy", valle.Sampling(top_p=0.0)), ("sampled", valle.Sampling())]:
            codes = valle.generate(ar, nar, expected["texts"], prompt, expected["prompt_text"],
                                   sampling, seed=3, max_seconds=0.4)
            assert [c.tolist() for c in codes] == expected[name], name
    finally:
        torch.set_num_threads(threads)


def test_another_phone_table_is_still_refused(tmp_path):
    ckpt = torch.load(os.path.join(BEFORE, "checkpoint.pt"), weights_only=True)
    ckpt["phones"] = ckpt["phones"][:10] + ["X"] + ckpt["phones"][11:]
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="another phone table"):
        cli.load_checkpoint(str(tmp_path / "other.pt"))


def test_a_dataset_from_before_reads_as_english():
    import train
    data = train.Dataset(os.path.join(BEFORE, "dataset"))
    assert data.index.shape == (3, 6) and (data.index[:, cli.LANGUAGE] == 0).all()
    phones = np.fromfile(os.path.join(BEFORE, "dataset", "phones.bin"), dtype=np.uint8)
    tokens, codes = data.item(1)
    po, pn = data.index[1, cli.PHONE_OFFSET], data.index[1, cli.PHONE_COUNT]
    assert tokens.tolist() == phones[po: po + pn].tolist() and codes.shape[1] == 8


def test_a_checkpoint_from_before_fine_tunes_on_a_dataset_from_before(tmp_path):
    out = tmp_path / "run"
    r = run_script("train.py", "--data", os.path.join(BEFORE, "dataset"), "--init-from",
                   os.path.join(BEFORE, "checkpoint.pt"), "--out", str(out), "--max-steps", "2",
                   "--eval-every", "2", "--log-every", "1", "--val-fraction", "0.34")
    assert r.returncode == 0, r.stderr
    assert "1 val utterances" in r.stdout or "2 train / 1 val" in r.stdout, r.stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["phones"] == valle.PHONES and "language_emb" in ckpt["ar"]


# --- a bilingual corpus, end to end (espeak-ng) -----------------------------------

@pytest.fixture(scope="module")
def bilingual(tmp_path_factory):
    """English and German sentences in the same two voices; prepared; a tiny model trained on
    them for 40 steps. -> (root, prepared train, prepared test, run folder)."""
    root = tmp_path_factory.mktemp("bilingual")
    r = run_script("data/make_corpus.py", "--out", str(root / "corpus"), "--languages", "en,de",
                   "--train", "24", "--test", "6", "--voices", "2")
    assert r.returncode == 0, r.stderr
    for part in ("train", "test"):
        r = run_script("data/prepare.py", "--layout", "manifest", "--src",
                       str(root / "corpus" / f"{part}.list"), "--out", str(root / part),
                       "--codec", "untrained")
        assert r.returncode == 0, r.stderr
    r = run_script("train.py", "--data", str(root / "train"), "--out", str(root / "run"),
                   "--preset", "tiny", "--max-steps", "40", "--lr", "2e-3", "--warmup", "5",
                   "--batch-frames", "3000", "--eval-every", "40", "--log-every", "10")
    assert r.returncode == 0, r.stderr
    return root


@needs_espeak
def test_prepare_records_each_utterances_language(bilingual):
    with open(bilingual / "train" / "meta.json") as f:
        meta = json.load(f)
    assert meta["utterances_by_language"] == {"en": 24, "de": 24}
    assert meta["unknown_phones"] == 0 and meta["languages"] == valle.LANGUAGES
    index = np.load(bilingual / "train" / "index.npy")
    lines = open(bilingual / "corpus" / "train.list").read().splitlines()
    by_id = {f"{n:06d}": line.split("|")[3] for n, line in enumerate(lines)}
    assert [valle.LANGUAGES[k] for k in index[:, cli.LANGUAGE]] == \
        [by_id[i] for i in meta["ids"]]
    # train.py reads each utterance's tokens with its language, as text_to_ids makes them
    import train
    data = train.Dataset(str(bilingual / "train"))
    texts = {f"{n:06d}": line.split("|")[1] for n, line in enumerate(lines)}
    for k in (0, len(meta["ids"]) - 1):  # the manifest lists English first, German last
        language = valle.LANGUAGES[index[k, cli.LANGUAGE]]
        tokens, _ = data.item(k)
        assert tokens.tolist() == valle.text_to_ids(texts[meta["ids"][k]], language)
    assert {valle.LANGUAGES[index[k, cli.LANGUAGE]] for k in (0, len(index) - 1)} == {"en", "de"}


@needs_espeak
def test_a_tiny_model_learns_both_languages(bilingual):
    """Validation loss on held-out sentences falls in each language: the model trained on the
    bilingual corpus against the same model at its first step (train.py seeds the init)."""
    import train
    data = train.Dataset(str(bilingual / "test"))
    _, ar, nar, _ = cli.load_checkpoint(str(bilingual / "run" / "last.pt"))
    torch.manual_seed(0)  # train.py's --seed: the weights it started from
    ar0, nar0 = valle.ARModel(ar.cfg).eval(), valle.NARModel(ar.cfg).eval()
    for language in ("en", "de"):
        ids = [i for i in range(len(data)) if data.index[i, cli.LANGUAGE] == valle.LANGUAGE_ID[language]]
        examples = np.array([[i, train.NO_PARTNER] for i in ids])
        text, text_lens, codes, code_lens = train.collate(data, examples)
        with torch.no_grad():
            losses = [(a.loss(text, text_lens, codes, code_lens)[0].item(),
                       n.loss(text, text_lens, codes, code_lens, torch.Generator().manual_seed(0),
                              j=1)[0].item()) for a, n in ((ar0, nar0), (ar, nar))]
        (ar_before, nar_before), (ar_after, nar_after) = losses
        assert ar_after < ar_before - 0.5 and nar_after < nar_before - 0.5, (language, losses)


@needs_espeak
def test_an_english_voice_speaks_german(bilingual, tmp_path):
    out = tmp_path / "de.wav"
    prompt_line = open(bilingual / "corpus" / "test.list").read().splitlines()[0]
    path, text, _, language = prompt_line.split("|")
    assert language == "en"
    r = run_script("sample.py", "--checkpoint", str(bilingual / "run" / "last.pt"),
                   "--prompt", str(bilingual / "corpus" / path), "--prompt-text", text,
                   "--language", "de", "--text", "Der Hund sieht den Ball im Garten.",
                   "--out", str(out), "--max-new-seconds", "2")
    assert r.returncode == 0, r.stderr
    import soundfile as sf
    wav, sr = sf.read(out)
    assert sr == valle.SAMPLE_RATE and len(wav) > 0 and np.isfinite(wav).all()


@needs_espeak
@pytest.mark.parametrize("flags", [[], ["--long-text-file"]])
def test_sample_hands_both_languages_to_the_model(bilingual, tmp_path, monkeypatch, flags):
    import sample
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("spied")
    monkeypatch.setattr(batched, "generate", spy)
    monkeypatch.setattr(long_text, "generate_long", spy)
    text = "Der Hund sieht den Ball."
    if flags:
        (tmp_path / "story.txt").write_text(text)
        flags = flags + [str(tmp_path / "story.txt")]
    else:
        flags = ["--text-file", str(tmp_path / "lines.txt")]
        (tmp_path / "lines.txt").write_text(text + "\n")
    args = sample.parse_args(["--checkpoint", str(bilingual / "run" / "last.pt"), "--prompt",
                              str(bilingual / "corpus" / "test" / "us_male" / "us_male_de_test_00000.flac"),
                              "--prompt-text", "Der Vogel.", "--prompt-language", "de",
                              "--language", "es", "--out", str(tmp_path / "o.wav"), *flags])
    with pytest.raises(ValueError, match="spied"):
        sample.run(args)
    assert seen["language"] == "es" and seen["prompt_language"] == "de"


@needs_espeak
def test_eval_reads_each_utterances_language(bilingual, tmp_path, monkeypatch, capsys):
    import eval as ev
    seen, generate = [], batched.generate

    def spy(ar, nar, texts, prompt_codes, prompt_text, *args, **kwargs):
        seen.append((texts[0], prompt_text, kwargs["language"], kwargs["prompt_language"]))
        return generate(ar, nar, texts, prompt_codes, prompt_text, *args, **kwargs)
    monkeypatch.setattr(batched, "generate", spy)
    src = str(bilingual / "corpus" / "test.list")
    common = ["--checkpoint", str(bilingual / "run" / "last.pt"), "--layout", "manifest",
              "--src", src, "--prompt-seconds", "1", "--max-new-seconds", "0.3"]
    ev.main(common + ["--tokens-only", "--out", str(tmp_path / "o")])
    language = {line.split("|")[1]: line.split("|")[3] for line in open(src).read().splitlines()}
    assert len(seen) == 2 * len(language) and {s[2] for s in seen} == {"en", "de"}
    for text, prompt_text, lang, prompt_lang in seen:
        assert lang == language[text]
        assert prompt_lang == (lang if prompt_text is None else language[prompt_text])
    assert any(s[3] != s[2] for s in seen)  # cross: a speaker's German prompted by its English
    with pytest.raises(SystemExit):  # without --tokens-only: the ASR reads English only
        ev.main(common + ["--out", str(tmp_path / "p")])
    assert "read English only" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p")


@pytest.mark.parametrize("flags, match", [
    (["--language", "xx"], "--language: unknown language 'xx': choose one of en, de, es, fr"),
    (["--prompt-language", "klingon"], "--prompt-language: unknown language"),
])
def test_sample_refuses_unknown_languages(tmp_path, flags, match):
    r = run_script("sample.py", "--checkpoint", str(tmp_path / "none.pt"), "--prompt", "x.wav",
                   "--prompt-text", "Hi.", "--text", "Hallo.", "--out", str(tmp_path / "o.wav"),
                   *flags)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "o.wav")


def test_prepare_refuses_unknown_languages(tmp_path):
    r = run_script("data/prepare.py", "--layout", "folder", "--src", str(tmp_path),
                   "--out", str(tmp_path / "out"), "--language", "xx")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "choose one of en, de, es, fr" in lines[0]
    manifest = tmp_path / "list.txt"
    manifest.write_text("a.wav|Hallo.|spk|xx\n")
    r = run_script("data/prepare.py", "--layout", "manifest", "--src", str(manifest),
                   "--out", str(tmp_path / "out"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "unknown language 'xx'" in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "out")
