"""train.py: learning, exact resume, checkpoints, fine-tuning, DDP, bad input."""
import os
import re
import sys

import torch

import valle
from extras import cli
from conftest import ROOT, run_script

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
    # each model is clipped on its own, and both norms are logged
    norms = re.findall(r"grad norm ar ([\d.]+) nar ([\d.]+) \|", out.stdout)
    assert len(norms) == 4 and all(float(a) > 0 and float(n) > 0 and a != n for a, n in norms)
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)  # plain tensors and dicts only
    cfg, ar, nar, _ = cli.load_checkpoint(str(tmp_path / "best.pt"))
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
    # a 20-step fine-tune without --warmup: the warm-up shrinks to a tenth of the run (2 steps),
    # so it trains at --lr, not at most a tenth of it (200 warm-up steps); the log says what loaded
    no_warmup = [a for a in FAST if a not in ("--warmup", "5", "--lr", "1e-3")]
    tuned = run_script("train.py", "--data", prepared, "--out", str(tmp_path / "ft"), *no_warmup,
                       "--init-from", str(tmp_path / "base" / "last.pt"), "--lr", "2e-4",
                       "--max-steps", "20", "--eval-every", "20", "--log-every", "1")
    assert tuned.returncode == 0, tuned.stderr
    start = float(re.search(r"ar ([\d.]+)", losses(tuned.stdout)[1])[1])
    scratch = float(re.search(r"ar ([\d.]+)", losses(base.stdout)[1])[1])
    assert start < scratch - 1.0  # it starts from the trained weights, not from scratch
    lrs = [float(x) for x in re.findall(r"\| lr ([\d.e+-]+) \|", tuned.stdout)]
    assert len(lrs) == 20 and lrs[:2] == [1e-4, 2e-4] and max(lrs) == 2e-4
    assert "learning rate: linear warm-up over 2 steps to 2.00e-04, linear decay to 0 at step 20" in tuned.stdout
    assert (f"--init-from {tmp_path / 'base' / 'last.pt'}: ar and nar weights of step 40 "
            "(validation ar ") in tuned.stdout and "codec untrained-seed0; a new optimizer" in tuned.stdout
    assert "warning" not in tuned.stdout
    # a fine-tune into a folder that holds a run would overwrite its checkpoints: refused
    before = (tmp_path / "ft" / "best.pt").read_bytes()
    again = train(prepared, tmp_path / "ft", "--init-from", str(tmp_path / "base" / "last.pt"),
                  "--max-steps", "2", "--eval-every", "2")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert (tmp_path / "ft" / "best.pt").read_bytes() == before
    # a warm-up asked for that is longer than the run is warned about
    long_warmup = train(prepared, tmp_path / "ft3", "--init-from", str(tmp_path / "base" / "last.pt"),
                        "--max-steps", "2", "--warmup", "20", "--eval-every", "2")
    assert long_warmup.returncode == 0, long_warmup.stderr
    assert ("warning: --warmup 20 is longer than --max-steps 2: the learning rate peaks at "
            "1.00e-04, below --lr 0.001; lower --warmup") in long_warmup.stdout
    # a different group size cannot continue these weights
    bad = train(prepared, tmp_path / "ft2", "--init-from", str(tmp_path / "base" / "last.pt"),
                "--group-size", "4", "--max-steps", "1")
    assert bad.returncode == 2 and "group size 2" in bad.stderr
    # a checkpoint of another codec's codes: one line that says how to prepare the data (the
    # mel codec's codebooks come from the checkpoint itself)
    ckpt = torch.load(tmp_path / "base" / "last.pt", weights_only=True)
    cli.save_checkpoint(str(tmp_path / "mel.pt"), **{**ckpt, "codec": "mel-0123456789ab"})
    other = train(prepared, tmp_path / "ft4", "--init-from", str(tmp_path / "mel.pt"), "--max-steps", "1")
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert (f"was trained on codes of codec mel-0123456789ab, {prepared} holds codes of untrained-seed0: "
            f"prepare the data with data/prepare.py --codec mel --codebooks {tmp_path / 'mel.pt'}") in other.stderr


def test_ar_only_then_nar_only(prepared, tmp_path):
    help_text = run_script("train.py", "--help").stdout
    assert "--models ar,nar|ar|nar" in help_text and "{ar,nar,ar,nar}" not in help_text
    bad = train(prepared, tmp_path / "bad", "--models", "ar,ar")
    assert bad.returncode == 2 and "--models takes ar,nar, ar or nar, not 'ar,ar'" in bad.stderr
    out = train(prepared, tmp_path, "--models", "ar", "--max-steps", "2", "--eval-every", "2")
    assert out.returncode == 0, out.stderr
    assert "ar " in out.stdout and "nar " not in out.stdout
    cfg, ar, nar, _ = cli.load_checkpoint(str(tmp_path / "last.pt"))
    assert ar is not None and nar is None
    out = train(prepared, tmp_path / "nar", "--models", "nar", "--max-steps", "2", "--eval-every", "2")
    assert out.returncode == 0, out.stderr
    assert "| nar " in out.stdout and "| ar " not in out.stdout  # "nar" holds "ar": no AR built
    _, ar, nar, _ = cli.load_checkpoint(str(tmp_path / "nar" / "last.pt"))
    assert ar is None and nar is not None


def test_fine_tuning_one_model_carries_the_other_along_so_the_checkpoint_still_speaks(prepared, tmp_path):
    """--init-from X --models ar trains the AR only (the paper trains the two apart); X's NAR is
    in every checkpoint the run writes, unchanged, resumed runs included, so sample.py and
    eval.py load both."""
    both = train(prepared, tmp_path / "both", "--max-steps", "2", "--eval-every", "2")
    assert both.returncode == 0, both.stderr
    source = str(tmp_path / "both" / "last.pt")
    ar_only = train(prepared, tmp_path / "ar", "--init-from", source, "--models", "ar",
                    "--max-steps", "4", "--stop-at", "2", "--eval-every", "2")
    assert ar_only.returncode == 0, ar_only.stderr
    assert "a new optimizer; its nar carried along unchanged" in ar_only.stdout
    resumed = train(prepared, tmp_path / "ar", "--models", "ar", "--max-steps", "4", "--eval-every", "2",
                    "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _, ar0, nar0, _ = cli.load_checkpoint(source)
    for name in ("last.pt", "best.pt"):
        _, ar, nar, ckpt = cli.load_checkpoint(str(tmp_path / "ar" / name))
        assert ckpt["step"] == 4 or name == "best.pt"
        assert all(torch.equal(a, b) for a, b in zip(nar.state_dict().values(), nar0.state_dict().values()))
        assert not all(torch.equal(a, b) for a, b in zip(ar.state_dict().values(), ar0.state_dict().values()))
    ar, nar, _ = cli.load_for_inference(str(tmp_path / "ar" / "last.pt"), torch.device("cpu"))
    assert ar is not None and nar is not None


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
    """Two gloo processes train, and each evaluates its share of the held-out batches: the
    validation figures are the sums over both processes divided by the total count of batches,
    so they equal the figures of one process evaluating every batch on the same weights."""
    import contextlib
    held_out = ["--val-fraction", "0.5"]  # 6 held-out utterances: batches on both processes
    out = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                     "train.py", "--data", prepared, "--out", str(tmp_path), *FAST[:-2], *held_out,
                     "--threads", "1", "--max-steps", "4", "--eval-every", "4", "--log-every", "1",
                     env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 process(es) on cpu" in out.stdout and "6 train / 6 val utterances" in out.stdout
    assert sorted(losses(out.stdout)) == [1, 2, 3, 4]
    cfg, ar, nar, ckpt = cli.load_checkpoint(str(tmp_path / "last.pt"))  # evaluated, then saved
    assert ckpt["step"] == 4
    data = train_script.Dataset(prepared)
    args = train_script.parse_args(["--data", prepared, "--out", str(tmp_path), *FAST, *held_out])
    batches = train_script.validation_batches(data.index, train_script.split(data.index, args, cfg)[0], args)
    assert len(batches) == 2  # one a process: dividing by a process's own count would double the figures
    one = train_script.evaluate(train_script.Both(ar, nar), data, batches, contextlib.nullcontext())
    assert sorted(ckpt["val"]) == sorted(one) and len(one) == 10  # ar, nar, acc0..acc7
    for k, v in one.items():
        assert abs(ckpt["val"][k] - v) <= 1e-5 * abs(v) + 1e-7, (k, ckpt["val"][k], v)


# --- the data path at corpus size: planned epochs, workers, no hangs -------------------

import json  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402

import train as train_script  # noqa: E402  (importable: the script runs only under __main__)


def subset(prepared, n, dst):
    """The first n utterances of a prepared dataset, as a dataset of their own."""
    index = np.load(os.path.join(prepared, "index.npy"))[:n]
    os.makedirs(dst)
    np.save(os.path.join(dst, "index.npy"), index)
    for name, dtype, end in (("phones.bin", np.uint8, index[-1, 0] + index[-1, 1]),
                             ("codes.bin", np.int16, (index[-1, 2] + index[-1, 3]) * 8)):
        np.fromfile(os.path.join(prepared, name), dtype=dtype)[:end].tofile(os.path.join(dst, name))
    with open(os.path.join(prepared, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump({**meta, "ids": meta["ids"][:n], "utterances": n}, f)
    return str(dst)


def test_importing_train_runs_nothing():
    out = subprocess.run([sys.executable, "-c", "import train; print('imported')"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "imported\n" and "usage" not in out.stderr


def test_epoch_plan_covers_each_utterance_once_and_splits_ranks(prepared):
    data = train_script.Dataset(prepared)
    args = train_script.parse_args(["--data", prepared, "--out", "x", "--batch-frames", "300",
                                    "--concat-prob", "0.5"])
    cfg = valle.get_config("tiny")
    ids = list(range(len(data)))
    one = train_script.EpochPlan(data.index, ids, args, cfg).batches(3)
    firsts = sorted(int(u) for b in one for u in b[:, 0])
    assert firsts == ids  # every utterance starts exactly one example per epoch
    joined = [(int(a), int(b)) for batch in one for a, b in batch if b != train_script.NO_PARTNER]
    assert joined and all(data.index[a, 4] == data.index[b, 4] != -1 for a, b in joined)  # same speaker
    for batch in one:  # padded frames within the budget, unless one example alone exceeds it
        frames = train_script.example_frames(data.index, batch)
        assert len(batch) == 1 or len(batch) * frames.max() <= 300
    # the same (seed, epoch) gives the same plan; another epoch another one
    again = train_script.EpochPlan(data.index, ids, args, cfg).batches(3)
    assert all(np.array_equal(a, b) for a, b in zip(one, again)) and len(one) == len(again)
    other = train_script.EpochPlan(data.index, ids, args, cfg).batches(4)
    assert any(not np.array_equal(a, b) for a, b in zip(one, other))
    # two processes: equal shares, no batch twice, drawn from the one-process plan
    shares = [train_script.EpochPlan(data.index, ids, args, cfg, rank, 2).batches(3) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(one) // 2
    seen = [b.tobytes() for share in shares for b in share]
    assert len(set(seen)) == len(seen) and set(seen) <= {b.tobytes() for b in one}


def test_more_processes_than_batches_splits_the_data(prepared):
    data = train_script.Dataset(prepared)
    args = train_script.parse_args(["--data", prepared, "--out", "x", "--batch-frames", "100000"])
    cfg = valle.get_config("tiny")
    assert len(train_script.EpochPlan(data.index, [0, 1, 2], args, cfg).batches(0)) == 1
    shares = [train_script.EpochPlan(data.index, [0, 1, 2], args, cfg, r, 2).batches(0) for r in (0, 1)]
    assert [len(s) for s in shares] == [1, 1]


def test_spawned_workers_collate_what_the_main_process_does(prepared):
    data = train_script.Dataset(prepared)
    args = train_script.parse_args(["--data", prepared, "--out", "x", "--batch-frames", "400"])
    plan = train_script.EpochPlan(data.index, list(range(len(data))), args, valle.get_config("tiny"))
    keys = [(0, 0), (0, 1), (1, 0)]
    loader = torch.utils.data.DataLoader(train_script.TrainBatches(data, plan), batch_size=None,
                                         sampler=keys, num_workers=1, multiprocessing_context="spawn")
    for (key, batch), expected in zip(loader, keys):
        assert tuple(key) == expected
        direct = train_script.collate(data, plan.batches(key[0])[key[1]])
        assert all(torch.equal(a, b) for a, b in zip(batch, direct))
    text, text_lens, codes, code_lens = direct  # the stored values, padded
    first = plan.batches(1)[0][0]
    phones, frames = data.item(first[0])
    assert text[0, : len(phones)].tolist() == phones.tolist()
    assert torch.equal(codes[0, :, : len(frames)], torch.from_numpy(frames.T.astype(np.int64)))


def test_workers_give_the_same_run(prepared, tmp_path):
    args = ["--max-steps", "4", "--eval-every", "4", "--log-every", "1"]
    runs = [train(prepared, tmp_path / f"w{w}", *args, "--workers", str(w)) for w in (0, 1)]
    for out in runs:
        assert out.returncode == 0, out.stderr
    assert losses(runs[0].stdout) == losses(runs[1].stdout) and len(losses(runs[0].stdout)) == 4
    assert "1 data worker(s)" in runs[1].stdout and "data wait" in runs[1].stdout


def test_fewer_batches_than_grad_accum_does_not_hang(prepared, tmp_path):
    # 12 utterances: 11 train in one batch per epoch, 4 batches per step (this used to spin)
    out = train(prepared, tmp_path, "--batch-frames", "100000", "--grad-accum", "4",
                "--max-steps", "3", "--eval-every", "3", "--log-every", "1")
    assert out.returncode == 0, out.stderr
    assert "11 train / 1 val utterances" in out.stdout
    assert "fewer than --grad-accum 4: optimizer steps will span epochs" in out.stdout
    assert sorted(losses(out.stdout)) == [1, 2, 3]
    assert cli.load_checkpoint(str(tmp_path / "last.pt"))[3]["epoch"] == 11  # 12 batches read


def test_two_processes_on_three_utterances(prepared, tmp_path):
    tiny = subset(prepared, 3, tmp_path / "three")
    out = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
                     "train.py", "--data", tiny, "--out", str(tmp_path / "run"), *FAST[:-2],
                     "--threads", "1", "--batch-frames", "100000", "--max-steps", "2",
                     "--eval-every", "2", "--log-every", "1", env={"OMP_NUM_THREADS": "1"},
                     timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 train / 1 val utterances | 1 batches per epoch and process" in out.stdout
    assert sorted(losses(out.stdout)) == [1, 2] and "val      2 | ar" in out.stdout
    one = subset(prepared, 1, tmp_path / "one")  # nothing to split between two processes
    out = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535",
                     "train.py", "--data", one, "--out", str(tmp_path / "run1"), *FAST[:-2],
                     "--threads", "1", "--max-steps", "2", env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert out.returncode != 0 and "too few for 2 process(es)" in out.stderr


def test_validation_is_capped_and_fixed(prepared, tmp_path):
    out = train(prepared, tmp_path, "--val-fraction", "0.5", "--val-max", "2", "--lr", "1e-9",
                "--max-steps", "2", "--eval-every", "1", "--log-every", "1")
    assert out.returncode == 0, out.stderr
    assert "10 train / 2 val utterances" in out.stdout
    vals = re.findall(r"val\s+\d+ \| (ar [\d.]+ nar [\d.]+)", out.stdout)
    assert len(vals) == 2 and vals[0] == vals[1]  # same held-out set and splits, weights ~unchanged
    assert re.search(r"\| [\d.]+ s\n", out.stdout)  # the time each evaluation took


# --- across processes: the device of collectives, a failing process, resuming the same run ----

def test_evaluation_reduces_on_the_models_device(prepared, monkeypatch):
    """NCCL reduces CUDA tensors only: evaluate's sums must be made on the models' device (here
    meta, standing in for a GPU), and reduced whenever a process group exists, one process
    included."""
    import contextlib
    seen = []

    class Reduced(Exception):
        pass

    def all_reduce(tensor, *args, **kwargs):  # a spy on the collective
        seen.append(tensor.device.type)
        raise Reduced  # meta tensors hold no values to go on with

    monkeypatch.setattr(train_script.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train_script.dist, "all_reduce", all_reduce)
    data = train_script.Dataset(prepared)
    cfg = valle.get_config("tiny", dropout=0.0)
    raw = train_script.Both(valle.ARModel(cfg), valle.NARModel(cfg)).to("meta")
    examples = np.full((2, 2), train_script.NO_PARTNER)
    examples[:, 0] = [0, 1]
    try:
        train_script.evaluate(raw, data, [(0, examples)], contextlib.nullcontext())
    except Reduced:
        pass
    assert seen == ["meta"]


def test_resume_loads_the_checkpoint_to_the_cpu_and_keeps_none_of_it(prepared, tmp_path, monkeypatch):
    """--resume reads last.pt onto the CPU (onto a GPU it would stay there beside the models for
    the whole run: about 1.3 GB at the paper's size) and lets it go once the models and the
    optimizer hold their state: at the first step, none of the checkpoint's weights is alive."""
    import gc
    import weakref
    args = ["--data", prepared, "--out", str(tmp_path), *FAST, "--max-steps", "2",
            "--eval-every", "1", "--log-every", "1"]
    train_script.main(args + ["--stop-at", "1"])
    loads, load = [], cli.load_checkpoint

    def spy(path, device="cpu"):
        cfg, ar, nar, ckpt = load(path, device)
        loads.append((str(device), [weakref.ref(t) for name in ("ar", "nar") for t in ckpt[name].values()]))
        return cfg, ar, nar, ckpt
    alive, train_step = [], train_script.train_step

    def first_step(*a, **k):
        if not alive:
            gc.collect()
            alive.append(sum(ref() is not None for ref in loads[0][1]))
        return train_step(*a, **k)
    monkeypatch.setattr(cli, "load_checkpoint", spy)
    monkeypatch.setattr(train_script, "train_step", first_step)
    train_script.main(args + ["--resume"])
    assert [device for device, _ in loads] == ["cpu"] and len(loads[0][1]) > 20
    assert alive == [0]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2


def test_resume_refuses_another_run(prepared, tmp_path):
    args = ["--max-steps", "4", "--eval-every", "2", "--log-every", "1"]
    first = train(prepared, tmp_path, *args, "--stop-at", "2")
    assert first.returncode == 0, first.stderr
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["processes"] == 1
    other = train(prepared, tmp_path, *args[:-4], "--eval-every", "2", "--log-every", "1",
                  "--batch-frames", "800", "--seed", "1", "--resume")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "--seed 1 (the run has 0); --batch-frames 800 (the run has 400)" in other.stderr
    assert "--init-from" in other.stderr
    torch.save({**ckpt, "processes": 2}, tmp_path / "last.pt")  # as if two GPUs had trained it
    fewer = train(prepared, tmp_path, *args, "--resume")
    assert fewer.returncode == 2 and "1 process(es) (the run has 2)" in fewer.stderr
    torch.save(ckpt, tmp_path / "last.pt")
    # what may change does: the logging, the stop, and --max-steps with its schedule said
    longer = train(prepared, tmp_path, "--max-steps", "5", "--eval-every", "5", "--log-every", "3",
                   "--resume")
    assert longer.returncode == 0, longer.stderr
    assert "--max-steps 5 (the run had 4): the learning rate now decays to 0 at step 5" in longer.stdout
    assert cli.load_checkpoint(str(tmp_path / "last.pt"))[3]["step"] == 5


FAIL_AT_STEP_2 = """
import os, sys, torch, train
forward, calls = train.Both.forward, [0]
def failing(self, *args):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:
        raise RuntimeError("made up failure at step 2")
    return forward(self, *args)
train.Both.forward = failing
train.main(sys.argv[1:])
"""


def test_a_failing_process_stops_the_others(prepared, tmp_path):
    """Two gloo processes started by hand (no torchrun to stop the others): process 1 raises at
    step 2; both are gone within 30 s, and process 0 says why on one line."""
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", FAIL_AT_STEP_2, "--data", prepared, "--out", str(tmp_path),
             *FAST[:-2], "--threads", "1", "--max-steps", "50", "--eval-every", "50"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    start = time.time()
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    took = time.time() - start
    assert all(p.returncode != 0 for p in procs)
    assert "RuntimeError: made up failure at step 2" in outs[1][1]
    last = outs[0][1].strip().splitlines()[-1]
    assert last == ("error: stopping, because process 1: RuntimeError: made up failure at step 2 "
                    "(the traceback is above)"), outs[0][1][-2000:]
    assert took < 30 + 20, took  # 20 s: two Pythons importing torch on a busy 2-core machine


def test_the_training_forward_is_one_graph_for_torch_compile():
    """--compile: no graph break in the losses (no Python loop over the batch, no value read
    back from the device, no shape from a length's value)."""
    cfg = valle.get_config("tiny", dropout=0.0)
    both = train_script.Both(valle.ARModel(cfg), valle.NARModel(cfg))
    text, codes = torch.randint(3, 50, (2, 10)), torch.randint(0, 1024, (2, 8, 40))
    j, frac = valle.NARModel.draw(2, torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(both)(text, torch.tensor([10, 7]), codes,
                                             torch.tensor([40, 31]), j, frac)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
