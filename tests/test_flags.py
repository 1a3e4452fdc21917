"""Nonsense numeric flag values: one `error:` line and status 2 from every script, before any
work is done. Each script's main(argv) runs in this process (a subprocess costs seconds)."""
import importlib.util
import os

import pytest

from conftest import ROOT


def script(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE = ["--text", "Hi.", "--prompt", "p.wav", "--prompt-text", "Hi.", "--checkpoint", "none.pt"]
TRAIN = ["--data", "nowhere", "--out", "nowhere"]
PREPARE = ["--layout", "folder", "--src", "nowhere", "--out", "nowhere"]

CASES = [
    ("sample.py", SAMPLE, ["--ras-window", "0"], "--ras-window must be at least 1"),
    ("sample.py", SAMPLE, ["--ras-window", "-3"], "--ras-window must be at least 1"),
    ("sample.py", SAMPLE, ["--ras-threshold", "0"], "--ras-threshold must be in (0, 1]"),
    ("sample.py", SAMPLE, ["--max-new-seconds", "-1"], "--max-new-seconds must be positive"),
    ("sample.py", SAMPLE, ["--max-new-seconds", "0"], "--max-new-seconds must be positive"),
    ("sample.py", SAMPLE, ["--temperature", "0"], "--temperature must be positive"),
    ("sample.py", SAMPLE, ["--temperature", "inf"], "--temperature must be positive"),
    ("sample.py", SAMPLE, ["--top-p", "1.5"], "--top-p must be in [0, 1]"),
    ("sample.py", SAMPLE, ["--top-p", "nan"], "--top-p must be in [0, 1]"),
    ("sample.py", SAMPLE, ["--top-k", "-1"], "--top-k must be 0 (off) or more"),
    ("sample.py", SAMPLE, ["--candidates", "0"], "--candidates must be at least 1"),
    ("sample.py", SAMPLE, ["--max-batch", "0"], "--max-batch must be at least 1"),
    ("train.py", TRAIN, ["--grad-accum", "0"], "--grad-accum must be at least 1"),
    ("train.py", TRAIN, ["--batch-frames", "-5"], "--batch-frames must be at least 1"),
    ("train.py", TRAIN, ["--lr", "nan"], "--lr must be positive"),
    ("train.py", TRAIN, ["--concat-prob", "1.5"], "--concat-prob must be in [0, 1]"),
    ("train.py", TRAIN, ["--val-fraction", "1"], "--val-fraction must be in [0, 1)"),
    ("train.py", TRAIN, ["--val-max", "0"], "--val-max must be at least 1"),
    ("train.py", TRAIN, ["--workers", "-1"], "--workers must be 0 or more"),
    ("train.py", TRAIN, ["--clip", "0"], "--clip must be positive"),
    ("train.py", TRAIN, ["--eval-every", "0"], "--eval-every must be at least 1"),
    ("train.py", TRAIN, ["--max-steps", "0"], "--max-steps must be at least 1"),
    ("train.py", TRAIN, ["--warmup", "-1"], "--warmup must be 0 or more"),
    ("train.py", TRAIN, ["--dropout", "1"], "--dropout must be in [0, 1)"),
    ("train.py", TRAIN, ["--threads", "0"], "--threads must be at least 1"),
    ("data/prepare.py", PREPARE, ["--workers", "-1"], "--workers"),
    ("data/prepare.py", PREPARE, ["--batch-size", "0"], "--batch-size"),
    ("data/prepare.py", PREPARE, ["--shard", "2/2"], "--shard"),
    ("data/prepare.py", PREPARE, ["--shard", "x"], "--shard"),
    ("data/prepare.py", PREPARE, ["--min-seconds", "-1"], "--min-seconds"),
    ("data/prepare.py", PREPARE, ["--min-seconds", "5", "--max-seconds", "2"], "--min-seconds"),
] + [(path, base, ["--device", "gpu0"], "--device 'gpu0' is not a device")  # cli.pick_device
     for path, base in (("sample.py", SAMPLE), ("train.py", TRAIN), ("data/prepare.py", PREPARE))]


@pytest.mark.parametrize("path,base,flags,match", CASES, ids=[f"{c[0]} {' '.join(c[2])}" for c in CASES])
def test_nonsense_flag_values_get_one_line_and_status_2(path, base, flags, match, capsys):
    with pytest.raises(SystemExit) as e:
        script(path).main(base + flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
