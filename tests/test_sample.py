"""sample.py end to end, its bad inputs, and the README's two commands."""
import os
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import valle
from extras import batched, cli
from conftest import ROOT, random_checkpoint, run_script, write_prompt

PROMPT_TEXT = "The train leaves at nine."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random checkpoint (made here, untrained codec) and a 2-second voice prompt."""
    d = tmp_path_factory.mktemp("sample")
    random_checkpoint(d / "model.pt")
    write_prompt(d / "prompt.wav")
    return d


def sample(d, *args, out="out.wav", flags=()):
    """sample.py with defaults; args are --option value pairs that add or override them."""
    base = {"--checkpoint": str(d / "model.pt"), "--prompt": str(d / "prompt.wav"),
            "--prompt-text": PROMPT_TEXT, "--out": str(d / out), "--max-new-seconds": "1.5"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = [x for kv in base.items() for x in kv] + list(flags)
    if not {"--text", "--text-file", "--long-text-file"} & set(base):
        argv += ["--text", "Hello world."]
    return run_script("sample.py", *argv)


def test_writes_24khz_wav_and_reports_the_real_time_factor(setup):
    out = sample(setup, "--seed", "3")
    assert out.returncode == 0, out.stderr
    audio, sr = sf.read(setup / "out.wav")
    assert sr == 24000 and audio.ndim == 1 and 0 < len(audio) <= 1.5 * 24000 + 320
    assert np.abs(audio).max() > 0.0
    assert f"{len(audio) / 24000:.2f} s" in out.stdout and "real-time factor" in out.stdout
    again = sample(setup, "--seed", "3", out="again.wav")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(sf.read(setup / "again.wav")[0], audio)  # a seed reproduces
    compiled = sample(setup, "--seed", "3", out="compiled.wav", flags=["--compile"])
    assert compiled.returncode == 0, compiled.stderr
    assert np.array_equal(sf.read(setup / "compiled.wav")[0], audio)  # the same codes


def test_continuation_mode_keeps_the_prompt(setup):
    cross = sample(setup, "--top-p", "0", out="cross.wav", flags=["--no-ras"])
    cont = sample(setup, "--top-p", "0", "--mode", "continuation", out="cont.wav", flags=["--no-ras"])
    assert cross.returncode == 0 and cont.returncode == 0, cross.stderr + cont.stderr
    n_cross = len(sf.read(setup / "cross.wav")[0])
    n_cont = len(sf.read(setup / "cont.wav")[0])
    assert n_cont == n_cross + 150 * 320  # + the 2 s prompt (nothing to trim): 150 frames


def test_batch_of_sentences_and_candidates(setup):
    (setup / "lines.txt").write_text("First sentence.\n\nSecond one, a bit longer.\n")
    out = sample(setup, "--text-file", str(setup / "lines.txt"), "--candidates", "2", out="b.wav")
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in setup.iterdir() if p.name.startswith("b_"))
    assert names == ["b_1_c1.wav", "b_1_c2.wav", "b_2_c1.wav", "b_2_c2.wav"]
    # the four rows one at a time (--max-batch 1): the same audio, on the CPU in fp32
    one = sample(setup, "--text-file", str(setup / "lines.txt"), "--candidates", "2",
                 "--max-batch", "1", out="one.wav")
    assert one.returncode == 0, one.stderr
    for name in names:
        assert (setup / name).read_bytes() == (setup / name.replace("b_", "one_")).read_bytes()


def test_long_text_becomes_one_file_and_a_seed_reproduces_it(setup):
    story = ("The lamp was lit at dusk. It burned all night, every night, for a hundred years.\n\n"
             "Then, one winter, the keeper retired. The town kept the light burning.")
    (setup / "story.txt").write_text(story)
    runs = {name: sample(setup, "--long-text-file", str(setup / "story.txt"), "--long-mode", mode,
                         "--chunk-seconds", "1.5", "--seed", "4", out=f"story_{name}.wav")
            for name, mode in [("fixed", "fixed"), ("again", "fixed"), ("rolling", "rolling")]}
    assert all(r.returncode == 0 for r in runs.values()), runs["fixed"].stderr
    audio, sr = sf.read(setup / "story_fixed.wav")
    assert sr == 24000 and len(audio) > 2 * 1.5 * sr  # several chunks of at most 1.5 s, one file
    assert np.array_equal(sf.read(setup / "story_again.wav")[0], audio)  # a seed reproduces it
    # rolling runs and writes one file; whether a chunk prompts the next depends on the random
    # model drawing <eos> (test_long.py tests the prompting itself)
    assert len(sf.read(setup / "story_rolling.wav")[0]) > 2 * 1.5 * sr
    assert sorted(p.name for p in setup.iterdir() if p.name.startswith("story_")) == [
        "story_again.wav", "story_fixed.wav", "story_rolling.wav"]  # nothing else written


def bad(setup, *args, out="bad.wav", match):
    result = sample(setup, *args, out=out)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], result.stderr
    assert not os.path.exists(setup / out) and not os.path.exists(setup / (out + ".tmp"))


def test_bad_prompts(setup, tmp_path):
    bad(setup, "--prompt", str(tmp_path / "missing.wav"), match="no such audio file")
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really")
    bad(setup, "--prompt", str(tmp_path / "junk.wav"), match="cannot read")
    (tmp_path / "notes.txt").write_text("hello")
    bad(setup, "--prompt", str(tmp_path / "notes.txt"), match="cannot read")
    sf.write(tmp_path / "short.wav", np.full(8000, 0.2, np.float32), 16000)
    bad(setup, "--prompt", str(tmp_path / "short.wav"), match="at least 1.0 s of speech")
    sf.write(tmp_path / "silent.wav", np.zeros(48000, np.float32), 24000)
    bad(setup, "--prompt", str(tmp_path / "silent.wav"), match="silent")


def test_long_prompt_is_cropped_with_a_warning(setup, tmp_path):
    t = np.arange(12 * 8000) / 8000
    sf.write(tmp_path / "long.wav", np.stack([np.sin(2 * np.pi * 200 * t)] * 2, 1).astype(np.float32), 8000)
    out = sample(setup, "--prompt", str(tmp_path / "long.wav"), "--mode", "continuation", out="long.wav")
    assert out.returncode == 0 and "prompt cropped to its first 10 s" in out.stderr
    assert len(sf.read(setup / "long.wav")[0]) >= 10 * 24000


def test_bad_text_checkpoint_and_output(setup, tmp_path):
    bad(setup, "--text", "", match="nothing to pronounce")
    bad(setup, "--text", "?! 123"[:2], match="nothing to pronounce")
    bad(setup, "--checkpoint", str(tmp_path / "none.pt"), match="no checkpoint")
    ckpt = torch.load(setup / "model.pt", weights_only=True)
    ckpt["config"]["d_model"] = 256  # weights from another config
    cli.save_checkpoint(str(tmp_path / "other.pt"), **ckpt)
    bad(setup, "--checkpoint", str(tmp_path / "other.pt"), match="do not fit its config")
    ckpt["config"]["d_model"], ckpt["phones"] = 128, valle.PHONES[:40] + ["XX"] + valle.PHONES[41:]
    cli.save_checkpoint(str(tmp_path / "phones.pt"), **ckpt)
    bad(setup, "--checkpoint", str(tmp_path / "phones.pt"), match="another phone table")
    bad(setup, out="no/such/folder/x.wav", match="cannot write")
    bad(setup, out="x.mp3", match="must name a .wav")


def test_no_speech_for_one_sentence_writes_the_others(setup, monkeypatch, capsys):
    import sample as sample_script
    real = batched.generate

    def first_is_mute(*a, **kw):
        codes, ended = real(*a, **kw)
        return [codes[0][:, :0]] + codes[1:], [True] + ended[1:]  # as if <eos> came at once
    monkeypatch.setattr(batched, "generate", first_is_mute)
    (setup / "two.txt").write_text("First sentence.\nSecond one.\n")
    argv = ["--checkpoint", str(setup / "model.pt"), "--prompt", str(setup / "prompt.wav"),
            "--prompt-text", PROMPT_TEXT, "--max-new-seconds", "1", "--text-file", str(setup / "two.txt")]
    sample_script.main(argv + ["--out", str(setup / "mute.wav")])  # returns: status 0
    err = capsys.readouterr().err
    assert "no speech for" in err and "mute_1.wav" in err
    assert not (setup / "mute_1.wav").exists() and (setup / "mute_2.wav").exists()
    monkeypatch.setattr(batched, "generate", lambda *a, **kw: ([c[:, :0] for c in real(*a, **kw)[0]],
                                                             [True] * 2))
    with pytest.raises(SystemExit) as e:
        sample_script.main(argv + ["--out", str(setup / "none.wav")])
    assert e.value.code == 2 and "produced no speech for any sentence" in capsys.readouterr().err


def test_long_text_shows_its_chunks_and_warns_of_each_one_that_ends_early(setup, monkeypatch, capsys):
    """A stand-in model that draws <eos> after 3 frames, whatever the text: the plan names each
    chunk's first words, and every chunk far shorter than its text gets a warning naming it; a
    chunk cut at --max-new-seconds (no <eos>) was cut on request and gets none."""
    import sample as sample_script
    calls = []

    def ends_at_once(ar, nar, texts, *a, **kw):
        calls.append(list(texts))
        return [torch.randint(0, 1024, (8, 3)) for _ in texts], [True] * len(texts)
    monkeypatch.setattr(batched, "generate", ends_at_once)
    story = ("The lamp was lit at dusk, and it burned all night for a hundred years. "
             "Then one winter the old keeper retired to a small house by the sea. "
             "The town kept the light burning every night after that.")
    (setup / "story.txt").write_text(story)
    argv = ["--checkpoint", str(setup / "model.pt"), "--prompt", str(setup / "prompt.wav"),
            "--prompt-text", PROMPT_TEXT, "--chunk-seconds", "8"]
    sample_script.main(argv + ["--long-text-file", str(setup / "story.txt"),
                               "--out", str(setup / "early.wav")])
    err = capsys.readouterr().err
    assert calls == [[
        "The lamp was lit at dusk, and it burned all night for a hundred years.",
        "Then one winter the old keeper retired to a small house by the sea.",
        "The town kept the light burning every night after that."]]
    assert "3 chunks of at most 75 phones, fixed mode:" in err
    assert "  chunk 1: 'The lamp was lit at dusk, ...' (" in err
    assert "  chunk 3: 'The town kept the light burning ...' (" in err
    warnings = [l for l in err.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 3, err
    phones = len(valle.text_to_ids(calls[0][1]))
    assert warnings[1] == (f"warning: {setup / 'early.wav'}, chunk 2 of 3 ('Then one winter the old "
                           f"keeper ...'): 0.04 s of speech for {phones} phones ({3 / phones:.2f} "
                           "frames a phone, where read speech takes about 5.4): the model ended "
                           "early and words are likely missing")
    assert (setup / "early.wav").exists()  # written all the same: the warning says what to doubt
    # one sentence (--text) is checked the same way; a cut (no <eos>) is not warned about
    sample_script.main(argv + ["--text", "Hello there, my friend.", "--out", str(setup / "one.wav")])
    assert "warning: " + str(setup / "one.wav") + " ('Hello there, my friend.'): 0.04 s" in \
        capsys.readouterr().err
    monkeypatch.setattr(batched, "generate", lambda ar, nar, texts, *a, **kw: (
        [torch.randint(0, 1024, (8, 3)) for _ in texts], [False] * len(texts)))
    sample_script.main(argv + ["--text", "Hello there, my friend.", "--max-new-seconds", "0.04",
                               "--out", str(setup / "cut.wav")])
    assert "warning" not in capsys.readouterr().err


def test_bf16_flag_writes_audio(setup):
    out = sample(setup, "--seed", "1", out="bf16.wav", flags=["--bf16"])
    assert out.returncode == 0, out.stderr
    audio, sr = sf.read(setup / "bf16.wav")
    assert sr == 24000 and len(audio) > 0


# --- the README's two commands, in a fresh clone ----------------------------------

def git(*args):
    import subprocess
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


needs_git = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".git")) or not shutil.which("git"),
                               reason="not a git checkout")


@needs_git
def test_no_tracked_path_is_ignored_or_leaves_the_repository():
    # A tracked .venv symlink to one machine's path once broke both README commands on every
    # fresh clone while CI (which sets its own venv) stayed green.
    assert git("ls-files", "-ci", "--exclude-standard") == ""
    root = os.path.realpath(ROOT)
    for name in git("ls-files", "-z").split("\0"):
        path = os.path.join(ROOT, name)
        if name and os.path.islink(path):
            target = os.path.realpath(path)
            assert target.startswith(root + os.sep) and os.path.exists(target), (name, target)


def fresh_clone(dst):
    """What `git clone` of this checkout gives, with the working tree's versions of the tracked
    files (so uncommitted changes are tested too) and nothing untracked or ignored."""
    for name in git("ls-files", "-z").split("\0"):
        src = os.path.join(ROOT, name)
        if not name or not os.path.lexists(src):
            continue
        os.makedirs(os.path.join(dst, os.path.dirname(name)), exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), os.path.join(dst, name))
        else:
            shutil.copy2(src, os.path.join(dst, name))


def run_sh(cwd, *args, **env):
    """`bash run.sh ...` as the README gives it. The clone's .venv points at this interpreter's
    venv (the README: run.sh installs into .venv, once), so nothing is downloaded."""
    import subprocess
    os.symlink(sys.prefix, os.path.join(cwd, ".venv"))  # fails if the clone already has a .venv
    try:
        clean = {k: v for k, v in os.environ.items() if k != "VALLE_VENV"}  # as a new user has it
        return subprocess.run(["bash", "run.sh", *args], cwd=cwd, capture_output=True, text=True,
                              env={**clean, **env}, timeout=900)
    finally:
        os.remove(os.path.join(cwd, ".venv"))


@needs_git
def test_readme_demo_command(tmp_path):
    """`bash run.sh demo` in a fresh clone, shortened to 3 training steps (DEMO_STEPS, which the
    README documents): prepares, trains, speaks."""
    fresh_clone(tmp_path)
    out = run_sh(tmp_path, "demo", DEMO_STEPS="3")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "80 utterances, 4 speakers" in out.stdout
    assert "val      3 |" in out.stdout
    audio, sr = sf.read(tmp_path / "runs" / "demo" / "out.wav")
    assert sr == 24000 and len(audio) > 24000


@needs_git
def test_readme_test_command(tmp_path):
    """`bash run.sh test` in a fresh clone, on a subset: it runs pytest and fails when a test fails."""
    fresh_clone(tmp_path)
    out = run_sh(tmp_path, "test", "tests/test_valle.py", "-k", "group_ungroup")
    assert out.returncode == 0 and "4 passed" in out.stdout, out.stdout + out.stderr
    (tmp_path / "tests" / "test_fails.py").write_text("def test_fails():\n    assert False\n")
    out = run_sh(tmp_path, "test", "tests/test_fails.py")
    assert out.returncode == 1 and "1 failed" in out.stdout
    out = run_sh(tmp_path, "test", "tests/test_valle.py", "-k", "no_such_test")
    assert out.returncode == 5  # pytest: no test ran, which fails CI too
