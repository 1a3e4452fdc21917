import getpass
import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import valle  # noqa: E402
from extras import cli, codecs

torch.set_num_threads(min(2, torch.get_num_threads()))

# VALLE_ONEDNN=0 bash run.sh test: the suite with PyTorch's oneDNN kernels off, in this process
# and in every Python the tests start (a sitecustomize.py on their PYTHONPATH), to check that no
# test depends on which CPU kernels ran. With the math libraries held to AVX2, the same check
# for instruction sets: ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
# ONEDNN_MAX_CPU_ISA=AVX2 (ATen's switch alone leaves MKL and oneDNN as they are).
if os.environ.get("VALLE_ONEDNN") == "0":
    torch.backends.mkldnn.enabled = False
    _site = tempfile.mkdtemp(prefix="valle-no-onednn-")
    with open(os.path.join(_site, "sitecustomize.py"), "w") as f:
        f.write("try:\n    import torch\n    torch.backends.mkldnn.enabled = False\n"
                "except ImportError:\n    pass\n")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_site, os.environ.get("PYTHONPATH")]))

# torch.compile keeps its kernels on disk (Inductor's cache), and with PyTorch 2.11 a cache filled
# by a run under AVX-512 crashes a later run held to AVX2 (SIGSEGV or SIGBUS in the compiled
# decode step; a fresh cache does not). So each of these settings gets a cache of its own, which
# the Pythons that the tests start inherit.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _setting = "-".join([torch.backends.cpu.get_cpu_capability(),
                         os.environ.get("MKL_ENABLE_INSTRUCTIONS", "mkl"),
                         os.environ.get("ONEDNN_MAX_CPU_ISA", "onednn"),
                         "onednn-on" if torch.backends.mkldnn.enabled else "onednn-off"]).lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}", f"valle-tests-{_setting}")


@pytest.fixture(scope="session")
def codec():
    return codecs.untrained(seed=0)


@pytest.fixture
def models():
    """A random tiny AR + NAR pair in eval mode (no dropout)."""
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.0)
    return valle.ARModel(cfg).eval(), valle.NARModel(cfg).eval()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args, env=None, cwd=ROOT, timeout=600):
    """Run one of our scripts with this interpreter; returns the CompletedProcess."""
    import subprocess
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=timeout)


def random_checkpoint(path):
    """A tiny random AR + NAR checkpoint at path (seed 0, untrained test codec)."""
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.0)
    cli.save_checkpoint(str(path), config=cfg.to_dict(), phones=valle.PHONES,
                        codec="untrained-seed0", ar=valle.ARModel(cfg).state_dict(),
                        nar=valle.NARModel(cfg).state_dict())


def write_prompt(path, seconds=2):
    """A voice prompt: a 180 Hz tone at 16 kHz."""
    import numpy as np
    import soundfile as sf
    t = np.arange(seconds * 16000) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)


def write_corpus(root, n_speakers=3, per_speaker=4, sr=16000):
    """A tiny corpus in the folder layout: tones that change with the text, 0.8-1.6 s each."""
    import numpy as np
    import soundfile as sf
    words = ["red", "green", "blue", "yellow", "quiet", "loud", "early", "late"]
    rng = np.random.default_rng(0)
    for s in range(n_speakers):
        os.makedirs(os.path.join(root, f"spk{s}"), exist_ok=True)
        for u in range(per_speaker):
            text = " ".join(rng.choice(words, size=3)) + "."
            seconds = 0.8 + 0.8 * rng.random()
            t = np.arange(int(seconds * sr)) / sr
            f0 = 120 + 60 * s + 40 * u
            wav = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.3 * t)) + 0.02 * rng.standard_normal(len(t))
            sf.write(os.path.join(root, f"spk{s}", f"u{u}.wav"), wav.astype(np.float32), sr)
            with open(os.path.join(root, f"spk{s}", f"u{u}.txt"), "w") as f:
                f.write(text)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A prepared tiny dataset (12 utterances, 3 speakers, untrained test codec)."""
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(str(root / "src"))
    out = run_script("data/prepare.py", "--layout", "folder", "--src", str(root / "src"),
                     "--out", str(root / "prepared"), "--codec", "untrained")
    assert out.returncode == 0, out.stderr
    return str(root / "prepared")
