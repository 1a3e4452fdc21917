"""train.py: learning, exact resume, checkpoints, fine-tuning, DDP, bad input."""
import os
import re
import sys

import torch

import valle
from conftest import run_script

FAST = ["--preset", "tiny", "--batch-frames", "400", "--lr", "1e-3", "--warmup", "5",
        "--threads", "2"]


def train(prepared, out, *args):
    return run_script("train.py", "--data", prepared, "--out", str(out), *FAST, *args)


def losses(stdout):
    """{step: 'ar x nar y'} from the progress lines."""
    return {int(m[1]): m[2] for m in re.finditer(r"step\s+(\d+) \| ([^|]+) \|", stdout)}


def test_training_lowers_validation_loss_and_saves_a_loadable_checkpoint(prepared, tmp_path):
    out = train(prepared, tmp_path, "--max-steps", "60", "--eval-every", "5", "--log-every", "20")
    assert out.returncode == 0, out.stderr
    vals = [(float(a), float(n)) for a, n in re.findall(r"val\s+\d+ \| ar ([\d.]+) nar ([\d.]+)", out.stdout)]
    assert len(vals) == 12
    # seen: AR 6.78 -> 4.97, NAR 6.83 -> 5.45 from step 5 to step 60
    assert vals[-1][0] < vals[0][0] - 1.0 and vals[-1][1] < vals[0][1] - 1.0, vals
    assert "top-1 accuracy per codebook 0:" in out.stdout
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)  # plain tensors and dicts only
    cfg, ar, nar, _ = valle.load_checkpoint(str(tmp_path / "best.pt"))
    assert cfg.to_dict() == ckpt["config"] and cfg.group_size == 2
    assert all(torch.equal(v, ckpt["ar"][k]) for k, v in ar.state_dict().items())
    assert all(torch.equal(v, ckpt["nar"][k]) for k, v in nar.state_dict().items())


def test_resume_continues_exactly(prepared, tmp_path):
    args = ["--max-steps", "12", "--eval-every", "100", "--log-every", "1"]
    straight = train(prepared, tmp_path / "a", *args)
    first = train(prepared, tmp_path / "b", *args, "--stop-at", "6")
    second = train(prepared, tmp_path / "b", *args, "--resume")
    for out in (straight, first, second):
        assert out.returncode == 0, out.stderr
    a, b = losses(straight.stdout), {**losses(first.stdout), **losses(second.stdout)}
    assert sorted(a) == list(range(1, 13)) and a == b
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert wa["step"] == wb["step"] == 12
    for name in ("ar", "nar"):
        assert all(torch.equal(wa[name][k], wb[name][k]) for k in wa[name])


def test_fine_tune_from_a_checkpoint(prepared, tmp_path):
    base = train(prepared, tmp_path / "base", "--max-steps", "40", "--eval-every", "40", "--log-every", "1")
    assert base.returncode == 0, base.stderr
    tuned = train(prepared, tmp_path / "ft", "--init-from", str(tmp_path / "base" / "last.pt"),
                  "--max-steps", "3", "--eval-every", "3", "--log-every", "1")
    assert tuned.returncode == 0, tuned.stderr
    start = float(re.search(r"ar ([\d.]+)", losses(tuned.stdout)[1])[1])
    scratch = float(re.search(r"ar ([\d.]+)", losses(base.stdout)[1])[1])
    assert start < scratch - 1.0  # it starts from the trained weights, not from scratch
    # a different group size cannot continue these weights
    bad = train(prepared, tmp_path / "ft2", "--init-from", str(tmp_path / "base" / "last.pt"),
                "--group-size", "4", "--max-steps", "1")
    assert bad.returncode == 2 and "group size 2" in bad.stderr


def test_ar_only_then_nar_only(prepared, tmp_path):
    out = train(prepared, tmp_path, "--models", "ar", "--max-steps", "2", "--eval-every", "2")
    assert out.returncode == 0, out.stderr
    assert "ar " in out.stdout and "nar " not in out.stdout
    cfg, ar, nar, _ = valle.load_checkpoint(str(tmp_path / "last.pt"))
    assert ar is not None and nar is None


def test_bad_input_gets_one_line_and_status_2(prepared, tmp_path):
    missing = train(str(tmp_path / "nowhere"), tmp_path / "o1", "--max-steps", "1")
    assert missing.returncode == 2 and "run data/prepare.py first" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    no_ckpt = train(prepared, tmp_path / "o2", "--init-from", str(tmp_path / "none.pt"))
    assert no_ckpt.returncode == 2 and "no checkpoint" in no_ckpt.stderr
    no_run = train(prepared, tmp_path / "o3", "--resume")
    assert no_run.returncode == 2 and "drop --resume" in no_run.stderr
    (tmp_path / "junk.pt").write_bytes(b"junk")
    junk = train(prepared, tmp_path / "o4", "--init-from", str(tmp_path / "junk.pt"))
    assert junk.returncode == 2 and "not a valle2 checkpoint" in junk.stderr


def test_two_process_ddp_on_cpu(prepared, tmp_path):
    out = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                     "train.py", "--data", prepared, "--out", str(tmp_path), *FAST[:-2],
                     "--threads", "1", "--max-steps", "4", "--eval-every", "4", "--log-every", "1",
                     env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 process(es) on cpu" in out.stdout
    assert sorted(losses(out.stdout)) == [1, 2, 3, 4]
    assert valle.load_checkpoint(str(tmp_path / "last.pt"))[3]["step"] == 4
