"""
Train or fine-tune the VALL-E 2 AR and NAR models on a prepared dataset (data/prepare.py).

    python train.py --data data/prepared/demo --preset tiny --out runs/demo
    python train.py --data data/prepared/mine --init-from runs/demo/best.pt --out runs/ft   # fine-tune
    python train.py --data ... --out runs/demo --resume                                     # continue
    torchrun --nproc_per_node 8 train.py --data ... --preset paper --out runs/paper          # 8 GPUs

Every --eval-every steps: validation loss and top-1 accuracy per codebook, then
<out>/last.pt (to resume) and, when validation improved, <out>/best.pt. Checkpoints are written
atomically and hold the full config; they load with torch.load(weights_only=True).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import valle


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", required=True, help="folder written by data/prepare.py")
p.add_argument("--out", required=True, help="folder for checkpoints and the log")
p.add_argument("--preset", default="tiny", choices=valle.PRESETS, help="model size (new runs)")
p.add_argument("--group-size", type=int, default=2, choices=[1, 2, 4, 8], help="G (new runs)")
p.add_argument("--dropout", type=float, help="override the preset's dropout (new runs)")
p.add_argument("--models", default="ar,nar", choices=["ar,nar", "ar", "nar"], help="which to train")
p.add_argument("--init-from", help="checkpoint to fine-tune from (weights only, new optimizer)")
p.add_argument("--resume", action="store_true", help="continue <out>/last.pt exactly")
p.add_argument("--max-steps", type=int, default=2000, help="optimizer steps in the whole run")
p.add_argument("--stop-at", type=int, help="save and stop at this step (resume later)")
p.add_argument("--batch-frames", type=int, default=6000, help="acoustic frames per batch (padded)")
p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (VALL-E: 5e-4)")
p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (VALL-E: 32k)")
p.add_argument("--weight-decay", type=float, default=0.01)
p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
p.add_argument("--concat-prob", type=float, default=0.5,
               help="chance that a training example is two utterances of one speaker joined")
p.add_argument("--val-fraction", type=float, default=0.05, help="utterances held out")
p.add_argument("--eval-every", type=int, default=200)
p.add_argument("--log-every", type=int, default=20)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
p.add_argument("--compile", action="store_true", help="torch.compile the models (CUDA)")
p.add_argument("--threads", type=int, help="CPU threads per process")
args = p.parse_args()

# -----------------------------------------------------------------------------
# Processes and devices: one per GPU under torchrun, else one

ddp = "RANK" in os.environ
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
if args.device == "auto":
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
device = torch.device(args.device)
if ddp:
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
if args.threads:
    torch.set_num_threads(args.threads)
main = rank == 0
log = print if main else (lambda *a, **k: None)

# -----------------------------------------------------------------------------
# Data: memory-mapped arrays from data/prepare.py


class Dataset:
    def __init__(self, path):
        try:
            with open(os.path.join(path, "meta.json")) as f:
                self.meta = json.load(f)
            self.index = np.load(os.path.join(path, "index.npy"))
            self.phones = np.memmap(os.path.join(path, "phones.bin"), dtype=np.uint8, mode="r")
            self.codes = np.memmap(os.path.join(path, "codes.bin"), dtype=np.int16,
                                   mode="r").reshape(-1, valle.N_CODEBOOKS)
        except (OSError, ValueError, KeyError) as e:
            die(f"no prepared dataset at {path} ({type(e).__name__}: {e}); "
                "run data/prepare.py first")
        if self.meta.get("phones") != valle.PHONES:
            die(f"{path} was prepared with another phone table: prepare it again")
        if self.index[-1, 0] + self.index[-1, 1] != len(self.phones) or \
                self.index[-1, 2] + self.index[-1, 3] != len(self.codes):
            die(f"{path} is truncated or corrupt: prepare it again")

    def __len__(self):
        return len(self.index)

    def item(self, i):
        po, pn, co, cn, _ = self.index[i]
        return self.phones[po: po + pn].astype(np.int64), self.codes[co: co + cn].T.astype(np.int64)


def make_examples(data, ids, concat_prob, rng, max_frames, max_text):
    """Each utterance alone or, with probability concat_prob, followed by another utterance of
    the same speaker. Inference reads prompt transcript + text and continues the prompt's
    codes, so it runs longer than one training utterance: joined pairs train the positions
    and the cross-utterance prompting that inference uses. Pairs must fit the model."""
    by_speaker = {}
    for i in ids:
        by_speaker.setdefault(data.index[i, 4], []).append(i)
    examples = []
    for i in ids:
        same = by_speaker[data.index[i, 4]]
        j = same[rng.integers(len(same))]
        fits = (data.index[i, 3] + data.index[j, 3] <= max_frames
                and data.index[i, 1] + data.index[j, 1] + 1 <= max_text)
        examples.append((i, j) if rng.random() < concat_prob and j != i and fits else (i,))
    return examples


def make_batches(data, examples, batch_frames, rng):
    """Bucket by duration: sort by length (random ties), fill batches up to batch_frames padded
    frames, shuffle the batches. Deterministic for a generator's state."""
    lengths = np.array([sum(data.index[i, 3] for i in ex) for ex in examples])
    order = rng.permutation(len(examples))
    order = order[np.argsort(lengths[order], kind="stable")]
    batches, current = [], []
    for k in order:
        if current and lengths[k] * (len(current) + 1) > batch_frames:
            batches.append(current)
            current = []
        current.append(examples[k])
    batches.append(current)
    return [batches[k] for k in rng.permutation(len(batches))]


def epoch_batches(ids, epoch, concat_prob):
    rng = np.random.default_rng(args.seed * 1000 + epoch)
    examples = make_examples(data, ids, concat_prob, rng, cfg.max_frames, cfg.max_text_tokens)
    return make_batches(data, examples, args.batch_frames, rng)


def collate(data, examples):
    """Examples (tuples of utterance ids) -> padded text (B, L), lengths, codes (B, 8, T), lengths."""
    items = []
    for ex in examples:
        parts = [data.item(i) for i in ex]
        text = sum(([valle.PHONE_ID[valle.WORD_BOUNDARY]] * (k > 0) + list(t)
                    for k, (t, _) in enumerate(parts)), [])
        items.append((text, np.concatenate([c for _, c in parts], axis=1)))
    text, _ = valle.pad_ids([t for t, _ in items])
    T = max(c.shape[1] for _, c in items)
    codes = torch.zeros(len(items), valle.N_CODEBOOKS, T, dtype=torch.long)
    for k, (_, c) in enumerate(items):
        codes[k, :, : c.shape[1]] = torch.from_numpy(c)
    text_lens = torch.tensor([len(t) for t, _ in items])
    code_lens = torch.tensor([c.shape[1] for _, c in items])
    return [x.to(device) for x in (text, text_lens, codes, code_lens)]


data = Dataset(args.data)

# -----------------------------------------------------------------------------
# Models, from scratch, a checkpoint to fine-tune, or our own last checkpoint


class Both(nn.Module):
    """The models being trained, so that one DDP wrapper and one forward cover both."""

    def __init__(self, ar, nar):
        super().__init__()
        self.ar, self.nar = ar, nar

    def forward(self, text, text_lens, codes, code_lens, generator):
        out = {}
        if self.ar is not None:
            out["ar"], out["ar_acc"] = self.ar.loss(text, text_lens, codes, code_lens)
        if self.nar is not None:
            out["nar"], out["nar_acc"], _ = self.nar.loss(text, text_lens, codes, code_lens, generator)
        return out


os.makedirs(args.out, exist_ok=True)
last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
source = last_path if args.resume else args.init_from
ckpt = None
if source:
    try:
        cfg, ar, nar, ckpt = valle.load_checkpoint(source, device)
    except (FileNotFoundError, ValueError) as e:
        die(str(e) + ("" if not args.resume else "; drop --resume to start a new run"))
    if ckpt.get("codec") != data.meta["codec"]:
        die(f"{source} was trained on codes of codec {ckpt.get('codec')}, {args.data} holds "
            f"codes of {data.meta['codec']}: prepare the data with the same codec")
    if args.group_size != cfg.group_size and "--group-size" in sys.argv:
        die(f"{source} has group size {cfg.group_size}; it cannot continue with {args.group_size}")
    wanted = args.models.split(",")
    ar = ar if "ar" in wanted else None
    nar = nar if "nar" in wanted else None
    if ("ar" in wanted and ar is None) or ("nar" in wanted and nar is None):
        die(f"{source} holds no {' or '.join(w for w in wanted if ckpt.get(w) is None)} model; "
            f"choose --models accordingly")
else:
    if os.path.exists(last_path):
        die(f"{args.out} already holds a run: pass --resume to continue it or choose another --out")
    overrides = {"group_size": args.group_size}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    cfg = valle.get_config(args.preset, **overrides)
    torch.manual_seed(args.seed)
    ar = valle.ARModel(cfg).to(device) if "ar" in args.models else None
    nar = valle.NARModel(cfg).to(device) if "nar" in args.models else None
model = Both(ar, nar).train()
raw = model  # the uncompiled, unwrapped module whose weights we save
if args.compile:
    model = torch.compile(model, dynamic=True)  # batch shapes vary: avoid a compile per shape
if ddp:
    model = nn.parallel.DistributedDataParallel(model)

# Hold out a seeded fraction for validation; drop utterances longer than the position tables.
fits = (data.index[:, 3] <= cfg.max_frames) & (data.index[:, 1] <= cfg.max_text_tokens)
if not fits.all():
    log(f"skipping {int((~fits).sum())} utterances longer than the model's {cfg.max_frames} frames "
        f"or {cfg.max_text_tokens} phones")
order = [int(i) for i in np.random.default_rng(args.seed).permutation(len(data)) if fits[i]]
n_val = max(1, round(args.val_fraction * len(order))) if len(order) > 1 else 0
val_ids, train_ids = sorted(order[:n_val]), sorted(order[n_val:])
if not train_ids:
    die(f"{args.data} has too few utterances to train on")
n_params = sum(p.numel() for p in raw.parameters())
log(f"config {cfg.to_dict()} | {n_params / 1e6:.1f}M parameters | {args.models} | "
    f"{len(train_ids)} train / {len(val_ids)} val utterances | {world} process(es) on {device}")

decay = [p for n, p in raw.named_parameters() if p.dim() >= 2]
no_decay = [p for n, p in raw.named_parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                              betas=(0.9, 0.95), fused=device.type == "cuda")
step, epoch, pos, best_val = 0, 0, 0, math.inf
if args.resume:
    optimizer.load_state_dict(ckpt["optimizer"])
    step, epoch, pos, best_val = ckpt["step"], ckpt["epoch"], ckpt["pos"], ckpt["best_val"]
    log(f"resumed {last_path} at step {step}")


def lr_at(step):
    """Linear warm-up to the peak, then linear decay to 0 at --max-steps (VALL-E §5)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * max(0.0, (args.max_steps - step) / max(1, args.max_steps - args.warmup))


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate():
    """Validation loss and top-1 accuracy: AR on codebook 0, NAR on each codebook 1..7."""
    raw.eval()
    g = torch.Generator().manual_seed(1234)  # the same prompt splits at every evaluation
    sums, count = {}, 0
    for examples in epoch_batches(val_ids, 0, concat_prob=0.0):  # single utterances
        text, text_lens, codes, code_lens = collate(data, examples)
        with autocast():
            if ar is not None:
                loss, acc = ar.loss(text, text_lens, codes, code_lens)
                sums["ar"] = sums.get("ar", 0) + loss.item()
                sums["acc0"] = sums.get("acc0", 0) + acc.item()
            if nar is not None:
                for j in range(1, valle.N_CODEBOOKS):
                    loss, acc, _ = nar.loss(text, text_lens, codes, code_lens, g, j=j)
                    sums["nar"] = sums.get("nar", 0) + loss.item() / (valle.N_CODEBOOKS - 1)
                    sums[f"acc{j}"] = sums.get(f"acc{j}", 0) + acc.item()
        count += 1
    raw.train()
    return {k: v / count for k, v in sums.items()}


def save(path, val):
    valle.save_checkpoint(
        path, config=cfg.to_dict(), phones=valle.PHONES, codec=data.meta["codec"],
        ar=ar.state_dict() if ar is not None else None,
        nar=nar.state_dict() if nar is not None else None,
        optimizer=optimizer.state_dict(), step=step, epoch=epoch, pos=pos, best_val=best_val,
        val=val, args={k: v for k, v in vars(args).items()})


# -----------------------------------------------------------------------------
# The loop. Random state is re-derived from (seed, rank, step) at every step, so a resumed run
# draws exactly what an uninterrupted one would have drawn.

end = min(args.max_steps, args.stop_at or args.max_steps)
t0, frames = time.time(), 0
while step < end:
    batches = epoch_batches(train_ids, epoch, args.concat_prob)
    batches = batches[: len(batches) // world * world][rank::world]  # equal share per process
    if pos + args.grad_accum > len(batches):
        epoch, pos = epoch + 1, 0
        continue
    torch.manual_seed(args.seed * 1_000_003 + rank * 10_007 + step)  # dropout
    generator = torch.Generator().manual_seed(args.seed + rank * 7919 + step * 104_729)  # NAR splits
    lr = lr_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    try:
        stats = {}
        for micro in range(args.grad_accum):
            batch = collate(data, batches[pos + micro])
            frames += int(batch[3].sum()) * world
            sync = micro == args.grad_accum - 1 or not ddp
            with autocast(), (model.no_sync() if not sync else torch.enable_grad()):
                out = model(*batch, generator)
                loss = sum(v for k, v in out.items() if not k.endswith("acc")) / args.grad_accum
                loss.backward()
            for k, v in out.items():
                stats[k] = stats.get(k, 0) + v.item() / args.grad_accum
        nn.utils.clip_grad_norm_(raw.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        die(f"out of memory with --batch-frames {args.batch_frames}: lower it "
            "(and raise --grad-accum to keep the effective batch)")
    step, pos = step + 1, pos + args.grad_accum
    if step % args.log_every == 0 or step == 1:
        dt = time.time() - t0
        n = args.log_every if step > 1 else 1
        losses = " ".join(f"{k} {v:.3f}" for k, v in stats.items() if not k.endswith("acc"))
        log(f"step {step:5d} | {losses} | lr {lr:.2e} | {frames / dt:7.0f} frames/s | "
            f"{1000 * dt / n:6.0f} ms/step", flush=True)
        t0, frames = time.time(), 0
    if step % args.eval_every == 0 or step == end:
        if main:
            val = evaluate()
            total = val.get("ar", 0) + val.get("nar", 0)
            acc = " ".join(f"{k[3:]}:{v:.3f}" for k, v in val.items() if k.startswith("acc"))
            log(f"val  {step:5d} | " + " ".join(f"{k} {val[k]:.3f}" for k in ("ar", "nar") if k in val)
                + f" | top-1 accuracy per codebook {acc}", flush=True)
            if total < best_val:
                best_val = total
                save(best_path, val)
            save(last_path, val)
        t0 = time.time()
if ddp:
    dist.barrier()
    dist.destroy_process_group()
log(f"done at step {step}: {best_path if os.path.exists(best_path) else last_path}")
