"""
Train or fine-tune the VALL-E 2 AR and NAR models on a prepared dataset (data/prepare.py).

    python train.py --data data/prepared/demo --preset tiny --out runs/demo
    python train.py --data data/prepared/mine --init-from runs/demo/best.pt --out runs/ft   # fine-tune
    python train.py --data ... --out runs/demo --resume                                     # continue
    torchrun --nproc_per_node 8 train.py --data ... --preset paper --out runs/paper          # 8 GPUs

Every --eval-every steps: validation loss and top-1 accuracy per codebook on a fixed held-out
set, then <out>/last.pt (to resume) and, when validation improved, <out>/best.pt. Checkpoints are
written atomically and hold the full config; they load with torch.load(weights_only=True).

The data path is built for corpus size (LibriTTS: 350k utterances): an epoch's batches are
planned once per epoch, and collated ahead of the training loop by DataLoader workers
(--workers; none by default on the CPU, where they would compete with training for cores).
Each progress line says how long the loop waited for its next batch.
"""
import argparse
import json
import math
import mmap
import os
import sys
import threading
import time
import traceback
from contextlib import nullcontext

try:
    import numpy as np
except ImportError:  # train_step and Both need only torch (tests/test_cuda.py on a bare GPU
    np = None  # machine); the data path needs numpy, and main says so
import torch
import torch.distributed as dist
import torch.nn as nn

import valle
from extras import cli
from extras.cli import (FRAME_COUNT, FRAME_OFFSET, LANGUAGE, PHONE_COUNT, PHONE_OFFSET,  # index.npy
                        SPEAKER)

NO_PARTNER = -1  # an example that is one utterance, not two joined
WARMUP = 200  # default warm-up steps (fewer for short runs: warmup_steps)


# A key in the process group's store: why a process stopped early. One per torchrun restart,
# whose store outlives an attempt.
STOPPED = f"valle2/stopped/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
WATCH_SECONDS = 1.0  # how often every process looks for it (watch_peers)
stopping = threading.Event()  # this process is on its way out: its own watcher stays quiet


def die(msg):
    """One line on stderr, status 2. Under torch.distributed the others are told first (see
    watch_peers): else they would wait for this process in a collective until its timeout."""
    stopping.set()
    print(f"error: {msg}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        try:
            dist.distributed_c10d._get_default_store().set(STOPPED, f"process {dist.get_rank()}: {msg}")
            if dist.get_rank() == 0:  # started by hand, process 0 holds the store: stay until
                time.sleep(WATCH_SECONDS + 0.5)  # every other process has read the reason
        except Exception:  # the store is gone with process 0: the others notice that instead
            pass
        stop_now()
    sys.exit(2)


def stop_now():
    """Leave at once, aborting the process group: a collective still in flight (NCCL's kernels
    wait for the peers) must not hold the exit, nor Python's clean-up run into it."""
    threading.Timer(5.0, os._exit, (2,)).start()  # should the abort itself hang
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # the log so far: os._exit skips Python's clean-up, flushes included
        except Exception:
            pass
    os._exit(2)


def watch_peers(finished):
    """A thread of every process under torch.distributed: when another process has died (its
    reason in the store), or process 0 with the store itself, say so on one line and stop.
    Without it a failure on one machine leaves the others waiting in the gradient all-reduce
    for the collective timeout (10 minutes), then ending in a wall of errors. `finished` is set
    once every process is past training (main), when exits are expected."""
    store = dist.distributed_c10d._get_default_store()
    while not finished.wait(WATCH_SECONDS):
        try:
            if not store.check([STOPPED]):
                continue
            why = store.get(STOPPED).decode()
        except Exception:  # process 0, which holds the store, is gone
            why = "process 0 stopped"
        if not (finished.is_set() or stopping.is_set()):
            stopping.set()
            print(f"error: stopping, because {why}", file=sys.stderr, flush=True)
            if dist.get_rank() == 0:  # holding the store (started by hand): let the others read
                time.sleep(WATCH_SECONDS + 0.5)
            stop_now()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, help="folder written by data/prepare.py")
    g.add_argument("--out", required=True, help="folder for checkpoints")
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of utterances held out for validation")
    g.add_argument("--val-max", type=int, default=300,
                   help="at most this many held-out utterances (the same ones at every evaluation)")
    g.add_argument("--workers", type=int,
                   help="DataLoader processes that collate batches ahead (default: 0 on CPU, 2 on CUDA)")
    g = p.add_argument_group("model (new runs; a checkpoint brings its own)")
    g.add_argument("--preset", default="tiny", choices=valle.PRESETS, help="model size")
    g.add_argument("--group-size", type=int, choices=[1, 2, 4, 8],
                   help="G, frames per AR step (default 2)")
    g.add_argument("--dropout", type=float, help="override the preset's dropout")
    g.add_argument("--models", default="ar,nar", metavar="ar,nar|ar|nar",
                   help="which to train (default both)")
    g.add_argument("--init-from", help="checkpoint to fine-tune from (weights only, new optimizer)")
    g.add_argument("--resume", action="store_true", help="continue <out>/last.pt exactly")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=2000, help="optimizer steps in the whole run")
    g.add_argument("--stop-at", type=int, help="save and stop at this step (resume later)")
    g.add_argument("--batch-frames", type=int, default=6000,
                   help="acoustic frames per batch, padding included (VALL-E: 6k per GPU). What "
                        "fits (bench.py --memory): paper preset about 1,600 on a CPU with 24 GiB, "
                        "10k on a 24 GB GPU, 46k on an 80 GB GPU (GPUs estimated); the tiny preset "
                        "fits anything: choose for speed (the demo's 3,000: 0.7-1.4 s a step on 2 cores)")
    g.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (VALL-E: 5e-4)")
    g.add_argument("--warmup", type=int,
                   help=f"linear warm-up steps (default {WARMUP}, or a tenth of --max-steps when "
                        "that is fewer, so that a short fine-tune reaches --lr; VALL-E: 32k)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices")
    g.add_argument("--clip", type=float, default=1.0,
                   help="gradient norm clipping, for each model on its own")
    g.add_argument("--concat-prob", type=float, default=0.5,
                   help="chance that a training example is two utterances of one speaker joined")
    g = p.add_argument_group("logging and running")
    g.add_argument("--eval-every", type=int, default=200, help="steps between evaluations")
    g.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    g.add_argument("--seed", type=int, default=0, help="the same seed gives the same run")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    g.add_argument("--compile", action="store_true", help="torch.compile the models (for GPUs)")
    g.add_argument("--threads", type=int, help="CPU threads per process")
    args = p.parse_args(argv)
    checks = [
        (args.val_fraction, 0 <= args.val_fraction < 1, "--val-fraction must be in [0, 1)"),
        (args.val_max, args.val_max >= 1, "--val-max must be at least 1"),
        (args.workers, args.workers is None or args.workers >= 0, "--workers must be 0 or more"),
        (args.dropout, args.dropout is None or 0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (args.max_steps, args.max_steps >= 1, "--max-steps must be at least 1"),
        (args.stop_at, args.stop_at is None or args.stop_at >= 1, "--stop-at must be at least 1"),
        (args.batch_frames, args.batch_frames >= 1, "--batch-frames must be at least 1"),
        (args.grad_accum, args.grad_accum >= 1, "--grad-accum must be at least 1"),
        (args.lr, args.lr > 0, "--lr must be positive"),
        (args.warmup, args.warmup is None or args.warmup >= 0, "--warmup must be 0 or more"),
        (args.weight_decay, args.weight_decay >= 0, "--weight-decay must be 0 or more"),
        (args.clip, args.clip > 0, "--clip must be positive"),
        (args.concat_prob, 0 <= args.concat_prob <= 1, "--concat-prob must be in [0, 1]"),
        (args.eval_every, args.eval_every >= 1, "--eval-every must be at least 1"),
        (args.log_every, args.log_every >= 1, "--log-every must be at least 1"),
        (args.threads, args.threads is None or args.threads >= 1, "--threads must be at least 1"),
    ]
    for value, ok, msg in checks:
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            die(f"{msg}, not {value}")
    models = args.models.replace(" ", "").split(",")
    if not models or set(models) - {"ar", "nar"} or len(set(models)) < len(models):
        die(f"--models takes ar,nar, ar or nar, not {args.models!r}")
    args.models = ",".join(m for m in ("ar", "nar") if m in models)  # one spelling: "nar,ar" too
    return args


# -----------------------------------------------------------------------------
# Data: memory-mapped arrays from data/prepare.py, batches planned once per epoch


class Dataset:
    """A prepared dataset. The arrays are memory-mapped on first use, in whichever process uses
    them, so that the object pickles small into DataLoader workers (a pickled np.memmap would
    copy the whole array)."""

    def __init__(self, path):
        self.path = path
        try:
            with open(os.path.join(path, "meta.json")) as f:
                self.meta = json.load(f)
            self.index = np.load(os.path.join(path, "index.npy"))
            n_phones = os.path.getsize(os.path.join(path, "phones.bin"))  # uint8
            n_frames = os.path.getsize(os.path.join(path, "codes.bin")) // (2 * valle.N_CODEBOOKS)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"no prepared dataset at {path} ({type(e).__name__}: {e}); "
                             "run data/prepare.py first") from None
        if not cli.known_phones(self.meta.get("phones")):
            raise ValueError(f"{path} was prepared with another phone table: prepare it again")
        self.codec_state = None  # what decodes the codes besides the codec's name: into checkpoints
        if os.path.exists(os.path.join(path, "codec_state.pt")):  # data/prepare.py's CODEC_STATE
            self.codec_state = torch.load(os.path.join(path, "codec_state.pt"), weights_only=True)
        if self.index.ndim != 2 or self.index.shape[1] not in (LANGUAGE, LANGUAGE + 1):
            raise ValueError(f"{path}/index.npy has an unknown layout: prepare it again")
        if self.index.shape[1] == LANGUAGE:  # prepared before languages were added: English
            self.index = np.concatenate([self.index, np.zeros_like(self.index[:, :1])], axis=1)
        last = self.index[-1]
        if (last[PHONE_OFFSET] + last[PHONE_COUNT] != n_phones
                or last[FRAME_OFFSET] + last[FRAME_COUNT] != n_frames):
            raise ValueError(f"{path} is truncated or corrupt: prepare it again")
        self._phones = self._codes = None

    def _map(self, name, dtype):
        array = np.memmap(os.path.join(self.path, name), dtype=dtype, mode="r")
        if hasattr(mmap, "MADV_RANDOM"):  # batches read utterances in random order: the
            array._mmap.madvise(mmap.MADV_RANDOM)  # kernel's readahead would read 32x too much
        return array

    def __getstate__(self):
        return {**self.__dict__, "_phones": None, "_codes": None}

    def __len__(self):
        return len(self.index)

    def item(self, i):
        """Utterance i -> text tokens (n,) int64 (phone ids with its language, valle.LANGUAGES)
        and codes (T, 8) int16, as stored."""
        if self._phones is None:
            self._phones = self._map("phones.bin", np.uint8)
            self._codes = self._map("codes.bin", np.int16).reshape(-1, valle.N_CODEBOOKS)
        po, pn, co, cn = self.index[i, :SPEAKER]
        language = self.index[i, LANGUAGE] * valle.PHONE_SLOTS
        return self._phones[po: po + pn].astype(np.int64) + language, self._codes[co: co + cn]


def make_examples(index, ids, concat_prob, rng, max_frames, max_text):
    """Each utterance alone or, with probability concat_prob, followed by another utterance of
    the same speaker: (n, 2) ids, the second NO_PARTNER when alone.

    Inference reads prompt transcript + text and continues the prompt's codes, so it runs
    longer than one training utterance: joined pairs train the positions and the
    cross-utterance prompting that inference uses. A pair must fit the model's tables, its
    texts joined by a word boundary (valle.join_phones).
    """
    ids = np.asarray(ids, dtype=np.int64)
    speaker = index[ids, SPEAKER]
    by_speaker = np.argsort(speaker, kind="stable")  # positions in ids, grouped by speaker
    first = np.searchsorted(speaker[by_speaker], speaker, side="left")  # each speaker's range
    count = np.searchsorted(speaker[by_speaker], speaker, side="right") - first
    partner = ids[by_speaker[first + (rng.random(len(ids)) * count).astype(np.int64)]]
    fits = ((index[ids, FRAME_COUNT] + index[partner, FRAME_COUNT] <= max_frames)
            & (index[ids, PHONE_COUNT] + index[partner, PHONE_COUNT] + 1 <= max_text))
    join = (rng.random(len(ids)) < concat_prob) & (partner != ids) & fits
    return np.stack([ids, np.where(join, partner, NO_PARTNER)], axis=1)  # (n, 2)


def example_frames(index, examples):
    """(n, 2) examples -> (n,) frames of each."""
    second = np.where(examples[:, 1] == NO_PARTNER, 0, index[examples[:, 1], FRAME_COUNT])
    return index[examples[:, 0], FRAME_COUNT] + second


def make_batches(lengths, batch_frames, rng, min_batches=1):
    """Bucket by duration: sort by length (random ties), fill batches up to batch_frames padded
    frames, shuffle the batches -> list of arrays of example positions. With fewer than
    min_batches batches (tiny data, many processes), the sorted examples are split evenly."""
    if len(lengths) == 0:
        return []
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    sorted_lengths = lengths[order].tolist()  # Python ints: this loop runs once per epoch
    batches, start = [], 0
    for k, n in enumerate(sorted_lengths):
        if k > start and n * (k - start + 1) > batch_frames:  # padded to the longest, the last
            batches.append(order[start:k])
            start = k
    batches.append(order[start:])
    if len(batches) < min_batches <= len(order):
        batches = np.array_split(order, min_batches)
    return [batches[k] for k in rng.permutation(len(batches))]


def collate(data, examples):
    """(B, 2) examples -> text (B, L), text lengths (B,), codes (B, 8, T), code lengths (B,)."""
    texts, codes = [], []
    for first, second in examples:
        text, code = data.item(first)
        if second != NO_PARTNER:  # two utterances read as one, like prompt + text at inference
            text2, code2 = data.item(second)
            text = valle.join_phones(text.tolist(), text2.tolist())  # a memmap unpacks 15x slower
            code = np.concatenate([code, code2])
        texts.append(text)
        codes.append(code)
    text_lens = torch.tensor([len(t) for t in texts])
    code_lens = torch.tensor([len(c) for c in codes])
    text = np.full((len(texts), int(text_lens.max())), valle.PAD_ID, dtype=np.int64)
    code = np.zeros((len(codes), int(code_lens.max()), valle.N_CODEBOOKS), dtype=np.int64)
    for k, (t, c) in enumerate(zip(texts, codes)):
        text[k, : len(t)] = t
        code[k, : len(c)] = c
    return torch.from_numpy(text), text_lens, torch.from_numpy(code).transpose(1, 2), code_lens


class EpochPlan:
    """This process's share of each epoch's batches, a function of (seed, epoch) only, so a
    resumed run and every DataLoader worker plan the same batches. Plans are built once per
    epoch (a 350k-utterance corpus takes about a second) and the last one is kept."""

    def __init__(self, index, ids, args, cfg, rank=0, world=1):
        self.index, self.ids, self.rank, self.world = index, ids, rank, world
        self.seed, self.concat_prob, self.batch_frames = args.seed, args.concat_prob, args.batch_frames
        self.max_frames, self.max_text = cfg.max_frames, cfg.max_text_tokens
        self._epoch, self._batches = None, None

    def batches(self, epoch):
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            examples = make_examples(self.index, self.ids, self.concat_prob, rng,
                                     self.max_frames, self.max_text)
            batches = make_batches(example_frames(self.index, examples), self.batch_frames, rng,
                                   min_batches=self.world)
            batches = batches[: len(batches) // self.world * self.world][self.rank::self.world]
            self._epoch, self._batches = epoch, [examples[b] for b in batches]
        return self._batches


class TrainBatches(torch.utils.data.Dataset):
    """Key (epoch, k) -> batch k of this process's share of that epoch, collated. A DataLoader
    over these keys collates in its workers, ahead of the training loop."""

    def __init__(self, data, plan):
        self.data, self.plan = data, plan

    def __getitem__(self, key):
        epoch, k = key
        return key, collate(self.data, self.plan.batches(epoch)[k])


def batch_keys(plan, epoch, k):
    """(epoch, k) keys from the given position on, epoch after epoch, without end."""
    while True:
        n = len(plan.batches(epoch))
        if n == 0:  # make_batches never gives an empty share; guard against a silent spin
            raise RuntimeError(f"epoch {epoch} has no batches for this process")
        yield from ((epoch, i) for i in range(k, n))
        epoch, k = epoch + 1, 0


# -----------------------------------------------------------------------------
# Models


class Both(nn.Module):
    """The models being trained, so that one DDP wrapper and one forward cover both."""

    def __init__(self, ar, nar):
        super().__init__()
        self.ar, self.nar = ar, nar

    def forward(self, text, text_lens, codes, code_lens, j, frac):
        """A batch (lengths on the CPU) and the NAR's draws (NARModel.draw) -> losses and
        accuracies, as tensors on the device: nothing here waits for the GPU."""
        out = {}
        if self.ar is not None:
            out["ar"], out["ar_acc"] = self.ar.loss(text, text_lens, codes, code_lens)
        if self.nar is not None:
            out["nar"], out["nar_acc"], _ = self.nar.loss(text, text_lens, codes, code_lens, j=j,
                                                          frac=frac)
        return out


def seed_for(args, rank, step):
    """Dropout and the NAR's prompt splits of one step: a function of (seed, rank, step), so a
    resumed run draws exactly what an uninterrupted one would have drawn."""
    torch.manual_seed(args.seed * 1_000_003 + rank * 10_007 + step)
    return torch.Generator().manual_seed(args.seed + rank * 7919 + step * 104_729)


def train_step(model, raw, optimizer, batches, generator, autocast, args, ddp):
    """One optimizer step over args.grad_accum batches (text and codes on the device, lengths
    on the CPU) -> (losses and accuracies, each model's gradient norm), all tensors on the
    device. Nothing here reads a value back from the GPU, so the CPU can queue the next step
    while this one runs; the log reads them at its steps only."""
    stats = {}
    for micro in range(args.grad_accum):
        text, text_lens, codes, code_lens = next(batches)
        j, frac = valle.NARModel.draw(len(codes), generator)
        last = micro == args.grad_accum - 1  # DDP all-reduces the gradients on the last only
        with autocast, (model.no_sync() if ddp and not last else nullcontext()):
            out = model(text, text_lens, codes, code_lens, j, frac)
            loss = sum(v for k, v in out.items() if not k.endswith("acc")) / args.grad_accum
            loss.backward()
        for name, v in out.items():
            stats[name] = stats.get(name, 0) + v.detach() / args.grad_accum
    # Each model is clipped on its own: the paper trains them as separate models, and one norm
    # over both would let a spike in one shrink the other's update.
    norms = {name: nn.utils.clip_grad_norm_(m.parameters(), args.clip)
             for name, m in (("ar", raw.ar), ("nar", raw.nar)) if m is not None}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, norms


def split(index, args, cfg):
    """The held-out split -> (validation ids, training ids, how many utterances neither holds):
    a seeded share (--val-fraction, at most --val-max) of the utterances the model's tables
    can hold. bench.py measures on the same split."""
    fits = (index[:, FRAME_COUNT] <= cfg.max_frames) & (index[:, PHONE_COUNT] <= cfg.max_text_tokens)
    order = [int(i) for i in np.random.default_rng(args.seed).permutation(len(index)) if fits[i]]
    n_val = min(args.val_max, max(1, round(args.val_fraction * len(order)))) if len(order) > 1 else 0
    return sorted(order[:n_val]), sorted(order[n_val:]), int((~fits).sum())


def validation_batches(index, val_ids, args):
    """The fixed held-out batches, single utterances, the same at every evaluation:
    [(batch number, (B, 2) examples)]."""
    examples = np.full((len(val_ids), 2), NO_PARTNER, dtype=np.int64)
    examples[:, 0] = val_ids
    plan = make_batches(example_frames(index, examples), args.batch_frames, np.random.default_rng(0))
    return [(n, examples[b]) for n, b in enumerate(plan)]


# What a resumed run must share with the run it continues: what plans the batches (which
# utterances are held out, which are joined, how batches are cut and shared among the
# processes) and the optimisation. With any of it changed, "continue" would skip or repeat
# data. The rest may change between sessions (--stop-at, --log-every, --eval-every, --threads,
# --workers, --device, --compile; --max-steps moves where the learning rate reaches 0).
SAME_RUN = ("seed", "batch_frames", "concat_prob", "val_fraction", "val_max", "grad_accum", "lr",
            "warmup", "weight_decay", "clip", "models")


def differences(ckpt, args, world, utterances):
    """What this command changes of the run in ckpt that it would resume -> list of phrases."""
    before = ckpt.get("args") or {}
    out = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {before[k]})"
           for k in SAME_RUN if k in before and before[k] != getattr(args, k)]
    if ckpt.get("processes", world) != world:  # checkpoints before this check have no count
        out.append(f"{world} process(es) (the run has {ckpt['processes']})")
    if ckpt.get("utterances", utterances) != utterances:
        out.append(f"a dataset of {utterances} utterances (the run's has {ckpt['utterances']})")
    return out


def warmup_steps(args, ckpt=None):
    """--warmup, else the run's own when resuming, else WARMUP or a tenth of --max-steps,
    whichever is fewer: 200 warm-up steps would leave a 20-step fine-tune at a tenth of --lr."""
    if args.warmup is not None:
        return args.warmup
    if ckpt is not None and args.resume and "warmup" in (ckpt.get("args") or {}):
        return ckpt["args"]["warmup"]
    return min(WARMUP, args.max_steps // 10)


def lr_at(args, step):
    """Linear warm-up to the peak, then linear decay to 0 at --max-steps (VALL-E §5)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * max(0.0, (args.max_steps - step) / max(1, args.max_steps - args.warmup))


@torch.no_grad()
def evaluate(raw, data, val_batches, autocast):
    """Validation loss and top-1 accuracy on this process's share of the fixed held-out batches
    (AR on codebook 0, NAR on each codebook 1..7), summed over processes: every process takes
    part, so none waits in a collective while another evaluates alone. The sums stay on the
    models' device, which is where NCCL's all-reduce needs them."""
    device = next(raw.parameters()).device
    raw.eval()
    sums = torch.zeros(2 + valle.N_CODEBOOKS, dtype=torch.float64, device=device)  # ar, nar, acc0..7
    for number, examples in val_batches:
        text, text_lens, codes, code_lens = collate(data, examples)
        text, codes = text.to(device), codes.to(device)
        g = torch.Generator().manual_seed(1234 + number)  # the same prompt split every time
        with autocast:
            if raw.ar is not None:
                loss, acc = raw.ar.loss(text, text_lens, codes, code_lens)
                sums[0] += loss
                sums[2] += acc
            if raw.nar is not None:
                for j in range(1, valle.N_CODEBOOKS):
                    loss, acc, _ = raw.nar.loss(text, text_lens, codes, code_lens, g, j=j)
                    sums[1] += loss / (valle.N_CODEBOOKS - 1)
                    sums[2 + j] += acc
    batches = torch.tensor([len(val_batches)], dtype=torch.float64, device=device)
    totals = torch.cat([sums, batches])
    if dist.is_initialized():  # also with one process under torchrun: the same code path
        dist.all_reduce(totals)
    totals = totals.tolist()
    raw.train()
    if totals[-1] == 0:  # no held-out utterances
        return {}
    names = ["ar", "nar"] + [f"acc{k}" for k in range(valle.N_CODEBOOKS)]
    val = dict(zip(names, (t / totals[-1] for t in totals[:-1])))
    drop = (["ar", "acc0"] if raw.ar is None else []) + (
        ["nar"] + [f"acc{k}" for k in range(1, valle.N_CODEBOOKS)] if raw.nar is None else [])
    return {k: v for k, v in val.items() if k not in drop}


# -----------------------------------------------------------------------------
# The run


def main(argv=None):
    args = parse_args(argv)
    if np is None:
        die("train.py reads its data with numpy: pip install numpy")

    # Processes and devices: one per GPU under torchrun, else one.
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    try:
        device = cli.pick_device(args.device)
    except ValueError as e:
        die(str(e))
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        finished = threading.Event()
        threading.Thread(target=watch_peers, args=(finished,), daemon=True).start()
        previous_hook = sys.excepthook

        def tell_peers(*exc):  # any error that ends this process ends the others too
            previous_hook(*exc)
            why = "".join(traceback.format_exception_only(*exc[:2])).strip().splitlines()[-1]
            die(f"{why} (the traceback is above)")
        sys.excepthook = tell_peers
    if args.threads:
        torch.set_num_threads(args.threads)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    workers = args.workers if args.workers is not None else 2 if device.type == "cuda" else 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    try:
        data = Dataset(args.data)
    except ValueError as e:
        die(str(e))

    # Models: from scratch, a checkpoint to fine-tune, or our own last checkpoint.
    os.makedirs(args.out, exist_ok=True)
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    source = last_path if args.resume else args.init_from
    ckpt = None
    if not args.resume and os.path.exists(last_path):  # a new run, --init-from too, never overwrites
        die(f"{args.out} already holds a run: pass --resume to continue it or choose another --out")
    if source:
        try:  # to the CPU: on a GPU the checkpoint would stay there beside the models it loads
            cfg, ar, nar, ckpt = cli.load_checkpoint(source, "cpu")
        except (FileNotFoundError, ValueError) as e:
            die(str(e) + ("" if not args.resume else "; drop --resume to start a new run"))
        if ckpt.get("codec") != data.meta["codec"]:
            same = (f"data/prepare.py --codec mel --codebooks {source}" if str(ckpt.get("codec")).startswith("mel-")
                    else "the same codec")
            die(f"{source} was trained on codes of codec {ckpt.get('codec')}, {args.data} holds "
                f"codes of {data.meta['codec']}: prepare the data with {same}")
        if args.group_size is not None and args.group_size != cfg.group_size:
            die(f"{source} has group size {cfg.group_size}; it cannot continue with {args.group_size}")
        wanted = args.models.split(",")
        missing = [w for w in wanted if ckpt.get(w) is None]
        if missing:
            die(f"{source} holds no {' or '.join(missing)} model; choose --models accordingly")
        ar = ar.to(device) if "ar" in wanted else None
        nar = nar.to(device) if "nar" in wanted else None
        # The model this run does not train rides along unchanged in every checkpoint it writes,
        # so that `--init-from X --models ar` (the paper trains the two apart) still speaks.
        carried = {name: ckpt[name] for name in ("ar", "nar")
                   if name not in wanted and ckpt.get(name) is not None}
        args.warmup = warmup_steps(args, ckpt)
        changed = differences(ckpt, args, world, len(data)) if args.resume else []
        if changed:
            die(f"{source} is another run: {'; '.join(changed)}. Resume "
                f"with its values, or start a new run from its weights with --init-from {source} "
                "--out NEW_FOLDER")
        if args.init_from:  # what a fine-tune starts from
            val = ckpt.get("val") or {}
            log(f"--init-from {source}: {args.models.replace(',', ' and ')} weights of step "
                f"{ckpt.get('step', '?')} (validation "
                f"{', '.join(f'{k} {val[k]:.3f}' for k in ('ar', 'nar') if k in val) or 'none'}), "
                f"codec {ckpt.get('codec')}; a new optimizer"
                + "".join(f"; its {name} carried along unchanged" for name in carried))
    else:
        carried = {}
        args.warmup = warmup_steps(args)
        overrides = {"group_size": args.group_size or 2}
        if args.dropout is not None:
            overrides["dropout"] = args.dropout
        cfg = valle.get_config(args.preset, **overrides)
        torch.manual_seed(args.seed)
        wanted = args.models.split(",")  # not `"ar" in args.models`: "nar" holds "ar"
        ar = valle.ARModel(cfg).to(device) if "ar" in wanted else None
        nar = valle.NARModel(cfg).to(device) if "nar" in wanted else None
    raw = Both(ar, nar).train()  # the uncompiled, unwrapped module whose weights we save
    model = nn.parallel.DistributedDataParallel(raw) if ddp else raw
    if args.compile:  # after DDP, as PyTorch advises: the compiled graph is then split at DDP's
        # gradient buckets, and each bucket is all-reduced while the backward pass goes on
        model = torch.compile(model, dynamic=True)  # batch shapes vary; each NAR j compiles once

    index = data.index
    val_ids, train_ids, too_long = split(index, args, cfg)
    if too_long:
        log(f"skipping {too_long} utterances longer than the model's {cfg.max_frames} "
            f"frames or {cfg.max_text_tokens} phones")
    if len(train_ids) < world:
        die(f"{args.data} has {len(train_ids)} training utterances, too few for {world} "
            "process(es): prepare more data or run fewer processes")
    plan = EpochPlan(index, train_ids, args, cfg, rank, world)
    per_epoch = len(plan.batches(0))
    if per_epoch < args.grad_accum:
        log(f"note: an epoch has {per_epoch} batch(es) per process, fewer than --grad-accum "
            f"{args.grad_accum}: optimizer steps will span epochs")
    val_batches = validation_batches(index, val_ids, args)[rank::world]
    n_params = sum(p.numel() for p in raw.parameters())
    log(f"config {cfg.to_dict()} | {n_params / 1e6:.1f}M parameters | {args.models} | "
        f"{len(train_ids)} train / {len(val_ids)} val utterances | {per_epoch} batches per epoch "
        f"and process | {world} process(es) on {device} | {workers} data worker(s)")

    decay = [p for p in raw.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                                  betas=(0.9, 0.95), fused=device.type == "cuda")
    step, epoch, pos, best_val = 0, 0, 0, math.inf
    if args.resume:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError:  # its parameters differ: saved before the language embedding came
            die(f"{last_path}'s optimizer state does not fit today's models (it was saved before "
                f"languages were added): go on with --init-from {last_path} --out NEW_FOLDER, "
                "which keeps the weights and starts the optimizer anew")
        step, epoch, pos, best_val = ckpt["step"], ckpt["epoch"], ckpt["pos"], ckpt["best_val"]
        log(f"resumed {last_path} at step {step}")
        if ckpt.get("args", {}).get("max_steps", args.max_steps) != args.max_steps:
            log(f"--max-steps {args.max_steps} (the run had {ckpt['args']['max_steps']}): the "
                f"learning rate now decays to 0 at step {args.max_steps}")
    ckpt = None  # models and optimizer hold what they need (`carried` the model not trained)

    peak = lr_at(args, min(max(args.warmup - 1, 0), args.max_steps - 1))  # the warm-up's last step
    log(f"learning rate: linear warm-up over {args.warmup} steps to {peak:.2e}, linear decay to 0 "
        f"at step {args.max_steps}")
    if args.warmup > args.max_steps:
        log(f"warning: --warmup {args.warmup} is longer than --max-steps {args.max_steps}: the "
            f"learning rate peaks at {peak:.2e}, below --lr {args.lr:g}; lower --warmup")

    def save(path, val):
        cli.save_checkpoint(
            path, config=cfg.to_dict(), phones=valle.PHONES, codec=data.meta["codec"],
            codec_state=data.codec_state,
            ar=ar.state_dict() if ar is not None else carried.get("ar"),
            nar=nar.state_dict() if nar is not None else carried.get("nar"),
            optimizer=optimizer.state_dict(), step=step, epoch=epoch, pos=pos, best_val=best_val,
            val=val, args=vars(args), processes=world, utterances=len(data))

    loader = torch.utils.data.DataLoader(
        TrainBatches(data, plan), batch_size=None, sampler=batch_keys(plan, epoch, pos),
        num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=workers > 0)
    loader_batches = iter(loader)
    t0, frames, waited, run_waited, run_steps = time.time(), 0, 0.0, 0.0, 0

    def batches():  # the loader's batches: text and codes to the device, lengths stay on the CPU
        nonlocal epoch, pos, frames, waited
        while True:
            t = time.perf_counter()
            (epoch, k), (text, text_lens, codes, code_lens) = next(loader_batches)
            waited += time.perf_counter() - t
            pos = k + 1  # the next batch of this epoch to read
            frames += int(code_lens.sum()) * world
            yield text.to(device, non_blocking=True), text_lens, codes.to(device, non_blocking=True), code_lens
    feed = batches()

    # The loop: an optimizer step (train_step), logging and, every eval_every steps,
    # evaluation and checkpoints.
    end = min(args.max_steps, args.stop_at or args.max_steps)
    try:  # every collective of the run: the gradients', the log's, evaluation's, the barriers
        while step < end:
            generator = seed_for(args, rank, step)
            lr = lr_at(args, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                stats, norms = train_step(model, raw, optimizer, feed, generator, autocast, args, ddp)
            except torch.OutOfMemoryError:
                die(f"out of memory with --batch-frames {args.batch_frames}: lower it "
                    "(and raise --grad-accum to keep the effective batch)")
            step += 1
            if step % args.log_every == 0 or step == 1:
                # The one read of the step's figures: averaged over the processes
                figures = torch.stack([v.float() for v in [*stats.values(), *norms.values()]])
                if ddp:
                    dist.all_reduce(figures)
                figures = (figures / world).tolist()
                stats = dict(zip(stats, figures))
                norms = dict(zip(norms, figures[len(stats):]))
                dt = time.time() - t0
                n = args.log_every if step > 1 else 1
                losses = " ".join(f"{k} {v:.3f}" for k, v in stats.items() if not k.endswith("acc"))
                grads = " ".join(f"{k} {v:.2f}" for k, v in norms.items())
                log(f"step {step:5d} | {losses} | grad norm {grads} | lr {lr:.2e} | "
                    f"{frames / dt:7.0f} frames/s | {1000 * dt / n:6.0f} ms/step | "
                    f"data wait {1000 * waited / n:5.1f} ms/step", flush=True)
                run_waited, run_steps = run_waited + waited, run_steps + n
                t0, frames, waited = time.time(), 0, 0.0
            if step % args.eval_every == 0 or step == end:
                t = time.time()
                val = evaluate(raw, data, val_batches, autocast)
                acc = " ".join(f"{k[3:]}:{v:.3f}" for k, v in val.items() if k.startswith("acc"))
                log(f"val  {step:5d} | " + " ".join(f"{k} {val[k]:.3f}" for k in ("ar", "nar") if k in val)
                    + f" | top-1 accuracy per codebook {acc} | {time.time() - t:.1f} s", flush=True)
                if is_main:
                    total = val.get("ar", 0) + val.get("nar", 0)
                    if total < best_val:
                        best_val = total
                        save(best_path, val)
                    save(last_path, val)
                t0 = time.time()
        if ddp:
            dist.barrier()  # every process is past training: exits from here on are expected
            finished.set()
            dist.barrier()
            dist.destroy_process_group()
    except RuntimeError:
        if ddp:  # a collective failed, most likely because another process stopped: give
            time.sleep(5)  # watch_peers the time to say why, in one line, and stop this one
        raise
    if run_steps:
        log(f"data wait: {1000 * run_waited / run_steps:.2f} ms per step on average "
            f"over {run_steps} logged steps")
    log(f"done at step {step}: {best_path if os.path.exists(best_path) else last_path}")


if __name__ == "__main__":
    main()
