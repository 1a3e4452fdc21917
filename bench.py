"""
Speed and memory of VALL-E 2 on this machine: prints a table, asserts nothing.

    python bench.py --preset paper --threads 2          # the CPU figures of docs/performance.md
    python bench.py --preset paper --device cuda --bf16
    python bench.py --preset tiny --quick               # a smoke run in seconds
    python bench.py --preset paper --compile            # + the compiled decode step on a CPU
    python bench.py --data-path                         # training data path at LibriTTS size
    python bench.py --memory                            # training memory vs frames; --batch-frames advice
    python bench.py --long                              # a minute of speech in chunks, G=2 and G=8
    python bench.py --int8                              # fp32 vs int8 weights, batch 1
    python bench.py --int8-accuracy runs/demo/best.pt data/prepared/demo  # int8 vs fp32 agreement

Random weights (speed does not depend on them). <eos> is masked so that every run decodes the
same number of steps. Warm-up before timing, the median of --repeats runs, CUDA synchronised.
Each row stands alone: one that fails prints its error in its place, the others still print,
and the exit status is 1; one that cannot run here (no compiler for --compile, no numpy, no
EnCodec) says why in its place.
"""
import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

import valle
from extras import batched, cli, codecs, long_text, speedups
from extras.cli import FRAME_COUNT, FRAME_OFFSET, PHONE_COUNT, PHONE_OFFSET, SPEAKER  # index.npy columns

try:
    import numpy as np
except ImportError:  # a bare GPU machine (tests/test_cuda.py): the rows that need it say so
    np = None

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--preset", default="paper", choices=valle.PRESETS, help="model size")
p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ... or auto")
p.add_argument("--threads", type=int, default=2, help="CPU threads")
p.add_argument("--seconds", type=float, default=10.0, help="speech to generate")
p.add_argument("--prompt-seconds", type=float, default=3.0, help="voice prompt length")
p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
p.add_argument("--bf16", action="store_true",
               help="bf16 matrix products for decoding, as sample.py --bf16")
p.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")
p.add_argument("--compile", action="store_true",
               help="also time the compiled fixed-shape decode step (always on CUDA)")
p.add_argument("--data-path", action="store_true",
               help="only the training data path on synthetic 350k- and 3.5k-utterance datasets")
p.add_argument("--memory", action="store_true",
               help="only training memory at several batch shapes, each preset, and the "
                    "--batch-frames that fit a CPU, a 24 GB and an 80 GB GPU (minutes)")
p.add_argument("--long", action="store_true",
               help="only long-form speech: 60 s in 15 s chunks, fixed mode, G=2 and G=8 (minutes)")
p.add_argument("--int8", action="store_true",
               help="only fp32 vs int8 weights (speedups.quantize_int8), batch 1, in one run")
p.add_argument("--int8-accuracy", nargs=2, metavar=("CHECKPOINT", "DATA"),
               help="int8 vs fp32 on a trained checkpoint: teacher-forced top-1 agreement and "
                    "validation loss on train.py's held-out split of a prepared dataset")
p.add_argument("--memory-point", nargs=3, metavar=("PRESET", "B", "T"), help=argparse.SUPPRESS)
args = p.parse_args()
torch.set_num_threads(args.threads)
try:
    device = cli.pick_device(args.device)
except ValueError as e:
    p.error(str(e))
cuda = device.type == "cuda"
if np is None and (args.data_path or args.memory or args.int8_accuracy):
    p.error("--data-path, --memory and --int8-accuracy need numpy: pip install numpy")


def machine():
    """What made the figures: the CPU's model and the instructions that change them (AVX-512,
    VNNI's int8 dot products, bf16), the kernels PyTorch chose, and the GPU if one is used."""
    import platform
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        name = " ".join(info.get("model name", name).split())
        if "cpu family" in info:  # a VM may name only the vendor: AMD family 23 is Zen 1-2, 25 Zen 3-4
            name += f" (family {info['cpu family']}, model {info.get('model', '?')})"
        flags = set(info.get("flags", "").split())
    except OSError:
        pass
    has = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
           if f in flags]
    line = (f"# machine: {name}, {os.cpu_count()} CPUs ({' '.join(has) or 'flags unknown'}); "
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"quantized engine {torch.backends.quantized.engine}, "
            f"oneDNN {'on' if torch.backends.mkldnn.enabled else 'off'}")
    if cuda:
        line += f"; GPU {torch.cuda.get_device_name(device)}"
    return line


if not args.memory_point:  # a child process whose stdout the parent reads
    print(machine(), flush=True)
TEXT = ("VALL-E two speaks this sentence in the voice of a short prompt, "
        "and it takes about ten seconds to say all of it out loud.")
PROMPT_TEXT = "A three second voice prompt."


def sync():
    if cuda:
        torch.cuda.synchronize()


def bf16():
    """--bf16: the models' matrix products in bf16 (speedups.bf16_linears, under autocast)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


def timed(fn, repeats=args.repeats, warmup=1, autocast=True):
    """Median wall time of fn() in seconds, after warm-up; under --bf16's autocast unless
    autocast=False (fp32 models, training's own autocast)."""
    precision = bf16() if autocast else contextlib.nullcontext()
    for _ in range(warmup):
        with precision:
            fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        with precision:
            fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class NoEOS(valle.ARModel):
    """Never ends early, so every run decodes exactly the requested number of groups."""

    def logits(self, h):
        out = super().logits(h)
        out[..., valle.EOS] = float("-inf")
        return out


def ar_weight_bytes(ar):
    """Bytes of weights one decode step reads: all but the unused embedding rows."""
    skip = {"text_emb.weight", "text_pos.weight", "audio_pos.weight"}
    n = sum(p.numel() * p.element_size() for k, p in ar.named_parameters() if k not in skip)
    return n


DEFAULT = "torch default" + ("" if cuda else " (MKL)")


def read_bandwidths():
    """Read bandwidth (bytes/s) of y = W x for a 256 MB fp32 W, the AR step's shape, by kernel:
    W's bytes over the median time of the product, in fp32 without autocast (under --bf16's
    autocast each call would first cast W to bf16, and the row would time the cast)."""
    W = torch.randn(8192, 8192, device=device)
    x = torch.randn(1, 8192, device=device)
    kernels = {DEFAULT: lambda: x @ W.T}
    if not cuda:
        kernels["oneDNN (speedups.linear)"] = lambda: speedups.linear(x, W)
        if np is not None:
            Wn, xn = W.numpy(), x.numpy()
            kernels["numpy (OpenBLAS)"] = lambda: xn @ Wn.T
    with torch.inference_mode():
        return {k: W.numel() * 4 / timed(f, repeats=10, warmup=3, autocast=False)
                for k, f in kernels.items()}


def copy_bandwidth():
    """Bytes read and written per second by a copy of 256 MiB on the device."""
    a = torch.empty(2**28, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), repeats=10, warmup=3, autocast=False)
    return 2 * a.numel() / t  # read + write


def make_inputs(cfg, batch=1):
    text_ids = valle.join_phones(valle.text_to_ids(PROMPT_TEXT), valle.text_to_ids(TEXT))
    text, text_valid = valle.pad_ids([text_ids] * batch, device)
    Tp = int(args.prompt_seconds * valle.FRAME_RATE)
    prompt = torch.randint(0, valle.CODEBOOK_SIZE, (valle.N_CODEBOOKS, Tp), device=device)
    return text, text_valid, prompt


rows = []


def row(name, value, note=""):
    rows.append((name, value, note))
    print(f"{name:<52} {value:>14}  {note}", flush=True)


failed = []  # the rows that failed: the exit status says so


@contextlib.contextmanager
def stands_alone(name):
    """The rows made inside stand alone: an error prints as the row `name`, in their place, and
    the table goes on."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure is this row's, not the table's
        failed.append(name)
        why = " ".join(str(e).split())
        row(name, "error", f"{type(e).__name__}: {why[:300]}")


# Dense bf16 peaks (tensor cores, no sparsity), TFLOP/s, by GPU name: the MFU row's denominator.
# The first pattern found in torch.cuda.get_device_name() wins: the specific before the general.
PEAK_BF16_TFLOPS = [
    (r"H100.*PCIe", 756), (r"H100 NVL", 835), (r"H200 NVL", 835), (r"GH200", 989),
    (r"H100|H200|H800", 989),  # SXM
    (r"B200", 2250), (r"B100", 1750), (r"A100|A800", 312), (r"L40S", 362), (r"L40\b", 181),
    (r"\bL4\b", 121), (r"\bA10\b", 125),
]


def peak_bf16_flops(name):
    """-> (FLOP/s, the table's pattern) of GPU `name`, or (None, None) where it is not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tflops * 1e12, pattern
    return None, None


def training_flops(cfg, B, L, T):
    """The matrix products of one AR + NAR training step, forward and backward (3 x the
    forward's), for B sequences of L phones and T frames: each block's linear layers and
    attention's two products over the whole S x S (masked and padded pairs counted, as a
    kernel computes them), the AR's group layers and both tied heads. Embedding lookups, norms,
    softmax and the loss are left out."""
    d, G, layers = cfg.d_model, cfg.group_size, cfg.n_layer
    S_ar, S_nar = lengths(cfg, L, T)
    blocks = lambda S: layers * (S * (8 * d * d + 4 * d * cfg.d_ff) + 4 * S * S * d)  # noqa: E731
    slots = T // G + 1  # <bos> and the groups: where the AR predicts a group
    ar = blocks(S_ar) + slots * (4 * G * d * d + 2 * G * d * (valle.CODEBOOK_SIZE + 1))
    nar = blocks(S_nar) + T * 2 * d * valle.CODEBOOK_SIZE
    return 3 * B * (ar + nar)


# --- the training data path at corpus size (--data-path) ----------------------------------------
LIBRITTS_UTTERANCES, LIBRITTS_HOURS, LIBRITTS_SPEAKERS = 354_780, 585.5, 2456
PHONES_PER_SECOND = 14  # phones + word boundaries of read English


def synthetic_dataset(path, n, seed=0):
    """A prepared dataset shaped like LibriTTS, n utterances: durations log-normal around
    LibriTTS's mean (5.9 s, 0.5-20 s), ~14 phones per second, 2456 speakers. phones.bin and
    codes.bin are sparse files (zeros that take no disk): the data path's cost does not depend
    on the values. Returns the path."""
    rng = np.random.default_rng(seed)
    mean_frames = LIBRITTS_HOURS * 3600 * valle.FRAME_RATE / LIBRITTS_UTTERANCES
    frames = np.clip(rng.lognormal(np.log(mean_frames) - 0.18, 0.6, n), 38, 1500).astype(np.int64)
    phones = np.maximum(2, frames * PHONES_PER_SECOND // valle.FRAME_RATE)
    index = np.zeros((n, 5), dtype=np.int64)
    index[:, PHONE_COUNT], index[:, FRAME_COUNT] = phones, frames
    index[1:, PHONE_OFFSET], index[1:, FRAME_OFFSET] = np.cumsum(phones)[:-1], np.cumsum(frames)[:-1]
    index[:, SPEAKER] = rng.integers(0, LIBRITTS_SPEAKERS, n)
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, "index.npy"), index)
    for name, size in (("phones.bin", int(phones.sum())), ("codes.bin", int(frames.sum()) * 16)):
        with open(os.path.join(path, name), "wb") as f:
            f.truncate(size)  # sparse
    meta = {"codec": "untrained-seed0", "phones": valle.PHONES, "utterances": n,
            "speakers": [str(k) for k in range(LIBRITTS_SPEAKERS)], "frames": int(frames.sum()),
            "hours": float(frames.sum()) / valle.FRAME_RATE / 3600}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return path


def data_path_rows():
    import train  # the script whose data path this measures
    batch_frames = 3000
    with tempfile.TemporaryDirectory() as tmp:
        big = synthetic_dataset(f"{tmp}/350k", LIBRITTS_UTTERANCES)
        small = synthetic_dataset(f"{tmp}/3.5k", LIBRITTS_UTTERANCES // 100, seed=1)
        data = train.Dataset(big)
        row("synthetic LibriTTS-size dataset", f"{len(data)} utt",
            f"{data.meta['hours']:.0f} h, {data.meta['frames'] / 1e6:.0f}M frames, sparse files")
        targs = train.parse_args(["--data", big, "--out", tmp, "--batch-frames", str(batch_frames)])
        plan = train.EpochPlan(data.index, list(range(len(data))), targs, valle.get_config("tiny"))
        t = time.perf_counter()
        batches = plan.batches(0)
        build = time.perf_counter() - t
        row("epoch plan (examples + batches), once per epoch", f"{1000 * build:.0f} ms",
            f"{len(batches)} batches of <= {batch_frames} frames; amortised "
            f"{1000 * build / len(batches):.3f} ms/step (the old train.py rebuilt it every step)")
        picks = np.random.default_rng(0).choice(len(batches), 200, replace=False)
        t = time.perf_counter()
        for k in picks:
            train.collate(data, batches[k])
        collate = (time.perf_counter() - t) / len(picks)
        row("collate one batch (in the loop, no workers)", f"{1000 * collate:.2f} ms",
            f"mean over {len(picks)} batches; with --workers it runs ahead in other processes")
        row("data overhead per step, amortised, no workers", f"{1000 * (build / len(batches) + collate):.2f} ms",
            "target <= 5 ms")
        steps = 8 if args.quick else 40
        per_step = {}
        for name, path in (("3.5k", small), ("350k", big)):
            out = subprocess.run(
                [sys.executable, "train.py", "--data", path, "--out", f"{tmp}/run-{name}", "--preset",
                 "tiny", "--batch-frames", str(batch_frames), "--max-steps", str(steps),
                 "--log-every", str(steps // 4), "--eval-every", str(10 * steps), "--val-max", "20",
                 "--threads", str(args.threads)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr)
            lines = re.findall(r"\| +(\d+) ms/step \| data wait +([\d.]+) ms/step", out.stdout)[1:]
            per_step[name] = [np.mean([float(a) for a, _ in lines]), np.mean([float(b) for _, b in lines])]
            row(f"train.py, tiny preset, {name} utterances", f"{per_step[name][0]:.0f} ms/step",
                f"data wait {per_step[name][1]:.2f} ms/step; steps {steps // 4 + 1}-{steps}, "
                f"batches of {batch_frames} frames")
        row("train.py step time, 350k vs 3.5k utterances", f"{per_step['350k'][0] / per_step['3.5k'][0]:.2f}x",
            "target within 10%")


# --- training memory and the --batch-frames that fit (--memory) ---------------------------------


def memory_point(preset, B, T):
    """Peak RSS of two training steps of a preset (AR + NAR, AdamW) on B x T frames, with ~14
    phones of text per second of speech. Runs in its own process: peak RSS is per process."""
    cfg = valle.get_config(preset)
    torch.manual_seed(0)
    ar, nar = valle.ARModel(cfg), valle.NARModel(cfg)
    opt = torch.optim.AdamW(list(ar.parameters()) + list(nar.parameters()), lr=1e-4)
    L = max(2, T * PHONES_PER_SECOND // valle.FRAME_RATE)  # text as long as read speech's
    first = valle.PHONE_ID[valle.ARPABET[0]]
    text = torch.randint(first, first + len(valle.ARPABET), (B, L))  # ARPAbet phones
    codes = torch.randint(0, valle.CODEBOOK_SIZE, (B, valle.N_CODEBOOKS, T))
    lens, text_lens = torch.full((B,), T), torch.full((B,), L)
    for _ in range(2):  # the second step holds AdamW's state as well
        loss = ar.loss(text, text_lens, codes, lens)[0] + nar.loss(text, text_lens, codes, lens)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in ar.parameters()) + sum(p.numel() for p in nar.parameters())
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, n_params, L)


# Batch shapes measured per preset: (B, T) in frames
MEMORY_POINTS = {"paper": [(1, 250), (2, 250), (4, 250), (1, 500), (2, 500), (1, 1000)],
                 "tiny": [(1, 500), (4, 500), (1, 1500), (4, 1500), (8, 750), (2, 2000)]}
LONGEST_FRAMES = 20 * valle.FRAME_RATE  # data/prepare.py's --max-seconds (20): the worst case
# What --batch-frames is advised for: (where, bytes it may use, on a GPU). A GPU keeps about
# 1 GiB for its CUDA context and the allocator's slack; a CPU machine's memory is shared with
# the system and the data loader, so the advice for it keeps a quarter free.
MEMORY_BUDGETS = [("a CPU with 24 GiB", 0.75 * 24 * 2**30, False),
                  ("a 24 GB GPU", 24e9 - 2**30, True), ("an 80 GB GPU", 80e9 - 2**30, True)]


def memory_rows():
    """Measured peaks per preset, a fit, and from it the advice: the largest --batch-frames,
    rounded down to two significant digits, that each budget holds."""
    advice = {}
    for preset, points in MEMORY_POINTS.items():
        cfg = valle.get_config(preset)
        points = points[:3] if args.quick else points
        X, y = [], []
        for B, T in points:
            out = subprocess.run([sys.executable, "bench.py", "--memory-point", preset, str(B),
                                  str(T), "--threads", str(args.threads)], capture_output=True,
                                 text=True)
            if out.returncode:
                raise SystemExit(out.stderr)
            peak, n_params, L = (int(v) for v in out.stdout.split())
            X.append([1.0, B * T, B * sum(s ** 2 for s in lengths(cfg, L, T))])  # text grows with T
            y.append(peak)
            row(f"training memory, {preset} preset, {B} x {T} frames", f"{peak / 2**30:.2f} GiB",
                "peak process RSS, fp32, two AdamW steps")
        fixed, per_frame, per_s2 = np.linalg.lstsq(np.array(X), np.array(y, dtype=float), rcond=None)[0]
        fit = np.array(X) @ [fixed, per_frame, per_s2]
        row(f"fit, {preset}: fixed part", f"{fixed / 2**30:.2f} GiB",
            f"theory: 16 bytes x {n_params / 1e6:.1f}M parameters (weights, gradients, AdamW) = "
            f"{16 * n_params / 2**30:.2f} GiB, plus the Python/torch runtime; largest fit error "
            f"{np.abs(fit - y).max() / 2**20:.0f} MiB")
        row(f"fit, {preset}: per frame (linear in B x T)", f"{per_frame / 2**20:.3f} MiB",
            f"per S^2 (attention weights, CPU math path): {per_s2:.0f} bytes "
            f"= {per_s2 / (cfg.n_layer * cfg.n_head):.1f} bytes per head and layer")
        # A CPU step: the fit, with every utterance as long as prepare.py keeps (the S^2 term
        # per frame is largest there). A GPU step in bf16 autocast: fp32 master weights,
        # gradients and AdamW (16 B/param) + autocast's bf16 weight copies (2 B/param) + the
        # per-frame activations at the fp32 slope (the bound: most are bf16, half of it); a
        # memory-efficient attention kernel keeps no S x S weights, so no S^2 term.
        T = min(LONGEST_FRAMES, cfg.max_frames)
        cpu_frame = per_frame + per_s2 * sum(s ** 2 for s in lengths(cfg, T * PHONES_PER_SECOND
                                                                      // valle.FRAME_RATE, T)) / T
        for where, budget, gpu in MEMORY_BUDGETS:
            base, slope = (18 * n_params, per_frame) if gpu else (fixed, cpu_frame)
            frames = max(int((budget - base) // slope), 0)
            step = 10 ** max(len(str(frames)) - 2, 0)  # two significant digits, rounded down
            advice.setdefault(preset, []).append(f"{where} {frames // step * step:,}")
        if preset == "paper":
            lo, hi = 18 * n_params + 6000 * per_frame / 2, 18 * n_params + 6000 * per_frame
            row("estimate: paper preset, 6000 frames, bf16 autocast on a GPU",
                f"{lo / 2**30:.0f}-{hi / 2**30:.0f} GiB", "extrapolated from the CPU fit, not "
                "measured: 18 B/param + 6000 x per-frame (bf16 half to fp32 whole)")
    for preset, line in advice.items():
        row(f"advice: largest --batch-frames, {preset} preset", "", "; ".join(line) +
            " (GPUs: estimated from the CPU fit, unmeasured)")


def lengths(cfg, L, T):
    """The AR's and the NAR's sequence lengths for L phones and T frames: AR text + e_eos +
    <bos> + T/G groups + <eos> group; NAR text + e_eos + prompt + target + e_eos + e_j. The
    CPU's attention with an explicit mask (and dropout) takes the math path, which keeps
    (S x S) weights per head and layer for the backward pass."""
    return L + 3 + T // cfg.group_size, L + 3 + T


# --- long-form speech (--long) ------------------------------------------------------------------
STORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "story.txt")  # ~1 min


def long_form_rows():
    """A minute of speech from one call: 4 chunks of 15 s, fixed mode (one batch), paper
    preset with random weights and <eos> banned, so that each chunk runs to its 15 s cap.
    G=8 runs the AR at a quarter of G=2's steps: the frame-rate lever beside chunking."""
    seconds, n_chunks = 15.0, 4
    codec = codecs.untrained(0)
    prompt_wav = torch.randn(int(args.prompt_seconds * valle.SAMPLE_RATE)) * 0.1
    for G in (2, 8):
        torch.manual_seed(0)
        cfg = valle.get_config("paper", group_size=G, dropout=0.0)
        ar, nar = NoEOS(cfg).to(device).eval(), valle.NARModel(cfg).to(device).eval()
        prompt = codec.encode(prompt_wav).to(device)
        frames, phones, _ = long_text.chunk_frames(cfg, prompt.shape[1],
                                               len(valle.text_to_ids(PROMPT_TEXT)), "fixed",
                                               max_seconds=seconds, chunk_seconds=seconds)
        with open(STORY, encoding="utf-8") as f:
            story = f.read()
        text = " ".join(long_text.chunk_text(story, phones)[:n_chunks])  # re-chunks the same way
        ar_time, generate_ar = [0.0], valle.generate_ar

        def timed_ar(*a, **k):  # the AR's share of the run
            t = time.perf_counter()
            out = generate_ar(*a, **k)
            sync()
            ar_time[0] += time.perf_counter() - t
            return out
        valle.generate_ar = timed_ar
        try:
            t = time.perf_counter()
            [(_, codes, _, _)] = long_text.generate_long(ar, nar, text, prompt, PROMPT_TEXT, "fixed",
                                               max_seconds=seconds, chunk_seconds=seconds)
            sync()
            wav = long_text.join_speech([codec.decode(c.cpu()) for c in codes])
            total = time.perf_counter() - t
        finally:
            valle.generate_ar = generate_ar
        audio = len(wav) / valle.SAMPLE_RATE
        row(f"long form, G={G}: {audio:.0f} s in {len(codes)} chunks, fixed mode",
            f"{total:.0f} s", f"AR {ar_time[0]:.0f} s ({frames // G} steps per chunk), NAR + "
            f"EnCodec + join {total - ar_time[0]:.0f} s; real-time factor {total / audio:.2f}")
        del ar, nar


if args.memory_point:
    memory_point(args.memory_point[0], *map(int, args.memory_point[1:]))
    raise SystemExit
def int8_rows():
    """fp32 vs int8 weights at batch 1 (G=2), one run: the AR step and its linear layers against
    their bandwidth floors, the NAR's 7 passes, EnCodec, end to end."""
    import copy
    import torch.ao.nn.quantized.dynamic as nnqd
    bw = max(read_bandwidths().values())
    frames = int(args.seconds * valle.FRAME_RATE)
    torch.manual_seed(0)
    cfg = valle.get_config(args.preset, group_size=2, dropout=0.0)
    models = {"fp32": (NoEOS(cfg).eval(), valle.NARModel(cfg).eval())}
    ar8, nar8 = copy.deepcopy(models["fp32"][0]), copy.deepcopy(models["fp32"][1])
    n = speedups.quantize_int8(ar8) + speedups.quantize_int8(nar8)
    models["int8"] = (ar8, nar8)
    print(f"# bench --int8: preset {args.preset}, {args.threads} threads, {frames / valle.FRAME_RATE:.1f} s "
          f"of speech, {n} linear layers in int8")
    text, text_valid, prompt = make_inputs(cfg)
    steps = frames // 2
    c0 = [torch.randint(0, valle.CODEBOOK_SIZE, (frames,))]
    codec = codecs.untrained(0)
    codes = torch.randint(0, valle.CODEBOOK_SIZE, (valle.N_CODEBOOKS, frames))
    codec_s = timed(lambda: codec.decode(codes))
    out = {}
    for name, (ar, nar) in models.items():
        linears = [m for m in ar.transformer.modules() if isinstance(m, (nn.Linear, nnqd.Linear))]
        linears += [m for m in (ar.group_in, ar.group_out) if isinstance(m, (nn.Linear, nnqd.Linear))]
        size = 1 if name == "int8" else 4
        linear_bytes = sum(m.in_features * m.out_features * size for m in linears)
        step_bytes = ar_weight_bytes(ar) + (linear_bytes if name == "int8" else 0)  # int8: not parameters
        xs = {k: torch.randn(1, 1, k) for k in {m.in_features for m in linears}}
        with torch.inference_mode():
            lin_s = timed(lambda: [m(xs[m.in_features]) for m in linears], repeats=20, warmup=3)
        run = lambda k: valle.generate_ar(ar, text, text_valid, prompt[0], k, valle.Sampling(),  # noqa: E731
                                          torch.Generator().manual_seed(0))
        total, prefill = timed(lambda: run(steps)), timed(lambda: run(1))
        per_step = (total - prefill) / (steps - 1)
        nar_s = timed(lambda: valle.generate_nar(nar, text, text_valid, prompt, c0))
        out[name] = dict(total=total, per_step=per_step, lin=lin_s, nar=nar_s, e2e=total + nar_s + codec_s)
        row(f"{name}: AR G=2 cached decode, {steps} steps", f"{total:.2f} s",
            f"{1000 * per_step:.1f} ms/step; floor {1000 * step_bytes / bw:.1f} ms/step ({step_bytes / 1e6:.0f} MB "
            f"/ {bw / 1e9:.1f} GB/s): {per_step * bw / step_bytes:.2f}x")
        row(f"{name}: AR linear layers alone, one step", f"{1000 * lin_s:.1f} ms",
            f"{len(linears)} layers, {linear_bytes / 1e6:.0f} MB: {lin_s * bw / linear_bytes:.2f}x their floor; "
            f"the rest of the step {1000 * (per_step - lin_s):.1f} ms")
        row(f"{name}: NAR 7 greedy passes", f"{nar_s:.2f} s")
        row(f"{name}: end to end (AR + NAR + EnCodec {codec_s:.2f} s)", f"{out[name]['e2e']:.1f} s")
    f, q = out["fp32"], out["int8"]
    row("int8 speed-up: AR step / NAR / end to end",
        f"{f['per_step'] / q['per_step']:.2f}x / {f['nar'] / q['nar']:.2f}x / {f['e2e'] / q['e2e']:.2f}x",
        "fp32 time over int8 time, this run")


def int8_accuracy(checkpoint, data_path):
    """How closely int8 follows fp32 on a trained model: top-1 agreement per position, teacher
    forced (free-running codes diverge for good after the first difference), and the
    validation loss of both, on the held-out split that train.py uses (its default seed)."""
    import copy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import train
    cfg, ar, nar, _ = cli.load_checkpoint(checkpoint)
    data = train.Dataset(data_path)
    targs = train.parse_args(["--data", data_path, "--out", tempfile.mkdtemp()])
    val_ids, _, _ = train.split(data.index, targs, cfg)
    batches = train.validation_batches(data.index, val_ids, targs)
    n_val = len(val_ids)
    results = {}
    for name in ("fp32", "int8"):
        a, n = copy.deepcopy(ar), copy.deepcopy(nar)
        if name == "int8":
            speedups.quantize_int8(a), speedups.quantize_int8(n)
        seen = {"ar": [], "nar": []}
        logits = a.logits
        a.logits = lambda h: seen["ar"].append(logits(h)) or seen["ar"][-1]
        frames = n.frames  # the target frames' predictions of codebook j: valid and not prompt

        def nar_frames(text, text_valid, audio, audio_valid, is_prompt, j, frames=frames, seen=seen):
            out = frames(text, text_valid, audio, audio_valid, is_prompt, j)
            seen["nar"].append((out.argmax(-1), audio_valid & ~is_prompt, j))
            return out
        n.frames = nar_frames
        with torch.inference_mode():
            loss = train.evaluate(train.Both(a, n), data, batches, contextlib.nullcontext())
        results[name] = loss, [x.argmax(-1) for x in seen["ar"]], seen["nar"]
    (loss32, ar32, nar32), (loss8, ar8, nar8) = results["fp32"], results["int8"]
    agree, total = 0, 0
    for (_, examples), x, y in zip(batches, ar32, ar8):
        lens = torch.tensor([data.index[e[0], FRAME_COUNT] for e in examples]) // cfg.group_size + 1
        mask = torch.arange(x.shape[1])[None] < lens[:, None]  # (B, N + 1): each row's targets
        agree += (x == y)[mask].sum().item()
        total += x[mask].numel()
    per_j = {}
    for (x, valid, j), (y, _, _) in zip(nar32, nar8):
        a_, t_ = per_j.get(j, (0, 0))
        per_j[j] = (a_ + (x == y)[valid].sum().item(), t_ + valid.sum().item())
    row("int8 vs fp32: AR top-1 agreement, codebook 0", f"{agree / total:.3f}",
        f"teacher forced, {total} positions of {n_val} held-out utterances")
    row("int8 vs fp32: NAR top-1 agreement, codebooks 1-7",
        " ".join(f"{per_j[j][0] / per_j[j][1]:.3f}" for j in sorted(per_j)), "teacher forced")
    row("validation loss AR / NAR, fp32", f"{loss32['ar']:.3f} / {loss32['nar']:.3f}")
    row("validation loss AR / NAR, int8", f"{loss8['ar']:.3f} / {loss8['nar']:.3f}")


if args.data_path or args.memory or args.long or args.int8 or args.int8_accuracy:
    print(f"# bench: {args.threads} threads")
    if args.data_path:
        data_path_rows()
    if args.memory:
        memory_rows()
    if args.long:
        long_form_rows()
    if args.int8_accuracy:
        int8_accuracy(*args.int8_accuracy)
    if args.int8:
        int8_rows()
    raise SystemExit

frames = int(args.seconds * valle.FRAME_RATE)
if args.quick:
    frames = min(frames, 60)
precision = "bf16 matrix products" if args.bf16 else "fp32"
print(f"# bench: preset {args.preset}, {device}, {args.threads} threads, {precision}, "
      f"{frames / valle.FRAME_RATE:.1f} s of speech after a {args.prompt_seconds:.0f} s prompt")

# --- AR decoding: KV cache vs naive, for each group size ------------------------------------
bws, bw = {}, None  # bw: the floors' bandwidth, the fastest kernel's (None: unmeasured)
with stands_alone("matrix-vector read bandwidth"):
    bws = read_bandwidths()
    for kernel, b in bws.items():
        row(f"matrix-vector read bandwidth, {kernel}", f"{b / 1e9:.1f} GB/s",
            "W's bytes / time of x @ W.T, 256 MB fp32 W, no autocast")
    if not cuda and np is None:
        row("matrix-vector read bandwidth, numpy (OpenBLAS)", "skipped", "numpy is not installed")
    bw = max(bws.values())  # the floor is set by the fastest kernel, not by the one we use
if cuda:  # the GPU floor: weight bytes at the copy bandwidth (bytes read + written per second)
    with stands_alone("device copy bandwidth"):
        copy = copy_bandwidth()
        bw = max(bw or 0, copy)
        row("device copy bandwidth", f"{copy / 1e9:.0f} GB/s",
            "(bytes read + written) / time of a 256 MiB copy; the floors use the larger of it "
            "and the read bandwidth")


def floor_note(per_step, weight_bytes):
    """The step against its floor: the weights' bytes at the best bandwidth measured."""
    if not bw:
        return "floor unknown (no bandwidth measured)"
    floor = weight_bytes / bw
    return (f"floor {1000 * floor:.1f} ms/step (weights {weight_bytes / 1e6:.0f} MB / best read "
            f"bandwidth): {per_step / floor:.2f}x")


ar_seconds = {}
for G in (1, 2, 4, 8):
    with stands_alone(f"AR G={G}: cached decode"):
        torch.manual_seed(0)
        cfg = valle.get_config(args.preset, group_size=G, dropout=0.0)
        ar = NoEOS(cfg).to(device).eval()
        if args.bf16:
            speedups.bf16_linears(ar)
        text, text_valid, prompt = make_inputs(cfg)
        steps = frames // G
        run = lambda cache, n=steps, compile=False: valle.generate_ar(  # noqa: E731
            ar, text, text_valid, prompt[0], n, valle.Sampling(), torch.Generator(device).manual_seed(0),
            use_cache=cache, cache_class=speedups.FixedShapeCache if compile else valle.KVCache)
        total = timed(lambda: run(True))
        prefill = timed(lambda: run(True, 1))  # prefill + one step
        ar_seconds[G] = total
        per_step = (total - prefill) / (steps - 1)
        default = "" if cuda or DEFAULT not in bws else \
            f", {per_step * bws[DEFAULT] / ar_weight_bytes(ar):.2f}x at torch's default's"
        row(f"AR G={G}: cached decode, {steps} steps", f"{total:.2f} s",
            f"prefill {1000 * prefill:.0f} ms, then {1000 * per_step:.1f} ms/step; "
            f"{floor_note(per_step, ar_weight_bytes(ar))}{default}; weights read at "
            f"{ar_weight_bytes(ar) / per_step / 1e9:.1f} GB/s")
    name = f"AR G={G}: compiled fixed-shape decode step" + (", CUDA graphs" if cuda else "")
    if G == 2 and (args.compile or cuda) and G in ar_seconds:
        why = speedups.compile_missing(device.type)
        if why:
            row(name, "skipped", why)
        else:
            with stands_alone(name):
                t = time.perf_counter()
                with bf16():
                    run(True, 2, compile=True)  # compiles on the first call
                first = time.perf_counter() - t
                total_c = timed(lambda: run(True, compile=True))
                prefill_c = timed(lambda: run(True, 1, compile=True))
                per_step_c = (total_c - prefill_c) / (steps - 1)
                row(name, f"{total_c:.2f} s", f"{1000 * per_step_c:.1f} ms/step, "
                    f"{floor_note(per_step_c, ar_weight_bytes(ar))}, weights read at "
                    f"{ar_weight_bytes(ar) / per_step_c / 1e9:.1f} GB/s; first call {first:.0f} s "
                    "(compiling)")
    if (G == 2 or args.quick) and G in ar_seconds:
        with stands_alone(f"AR G={G}: naive decode (recompute all)"):
            # The naive path costs one full forward per step, growing with the sequence: time it
            # at a few lengths and integrate, rather than waiting for every step.
            prefix = text.shape[1] + 2 + prompt.shape[1] // G
            samples = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
            costs = []
            for s in samples:
                groups = torch.randint(0, valle.CODEBOOK_SIZE, (1, prompt.shape[1] // G + s, G), device=device)
                with torch.inference_mode():  # the naive step: the whole sequence, no cache
                    costs.append(timed(lambda: ar(groups, None, None, text, text_valid)[:, -1],
                                       repeats=max(1, args.repeats - 1)))
            naive = sum((costs[i] + costs[i + 1]) / 2 * (samples[i + 1] - samples[i])
                        for i in range(len(samples) - 1)) + costs[-1]
            row(f"AR G={G}: naive decode (recompute all), {steps} steps", f"{naive:.1f} s",
                f"{1000 * costs[0]:.0f} -> {1000 * costs[-1]:.0f} ms/step as the sequence grows "
                f"(prefix {prefix} + up to {steps}); integrated from {len(samples)} timed steps")
            row(f"AR G={G}: KV cache speed-up over naive", f"{naive / ar_seconds[G]:.1f}x")
    ar = None
if not cuda:  # what oneDNN buys over torch's default CPU kernel, on a shorter run
    with stands_alone("AR G=2 step, torch's default kernel vs oneDNN"):
        cfg = valle.get_config(args.preset, group_size=2, dropout=0.0)
        ar = NoEOS(cfg).eval()
        text, text_valid, prompt = make_inputs(cfg)
        n = min(60, frames // 2)
        per_step = {}
        run = lambda k: valle.generate_ar(ar, text, text_valid, prompt[0], k)  # noqa: E731
        try:
            for fast in (False, True):
                torch.backends.mkldnn.enabled = fast  # PyTorch's own oneDNN switch, which speedups.linear reads
                per_step[fast] = (timed(lambda: run(n), autocast=False)
                                  - timed(lambda: run(1), autocast=False)) / (n - 1)
        finally:
            torch.backends.mkldnn.enabled = True
        row("AR G=2 step, torch's default kernel vs oneDNN", f"{per_step[False] / per_step[True]:.2f}x",
            f"{1000 * per_step[False]:.1f} vs {1000 * per_step[True]:.1f} ms/step "
            f"({n} steps, torch.backends.mkldnn.enabled False vs True)")
        ar = None
if 1 in ar_seconds and 2 in ar_seconds:
    row("AR time, G=1 / G=2", f"{ar_seconds[1] / ar_seconds[2]:.2f}x", "grouping halves the steps")

# --- NAR, codec, end to end -------------------------------------------------------------------
torch.manual_seed(0)
cfg = valle.get_config(args.preset, group_size=2, dropout=0.0)
ar = NoEOS(cfg).to(device).eval()
nar = valle.NARModel(cfg).to(device).eval()
if args.bf16:
    speedups.bf16_linears(ar), speedups.bf16_linears(nar)
text, text_valid, prompt = make_inputs(cfg)
nar_s = codec_s = None
with stands_alone("NAR: 7 greedy passes"):
    c0 = [torch.randint(0, valle.CODEBOOK_SIZE, (frames,), device=device)]
    nar_s = timed(lambda: valle.generate_nar(nar, text, text_valid, prompt, c0))
    row("NAR: 7 greedy passes", f"{nar_s:.2f} s", f"{1000 * nar_s / 7:.0f} ms/pass over "
        f"{text.shape[1] + 1 + prompt.shape[1] + frames + 2} positions")
with stands_alone("EnCodec decode (CPU)"):
    try:
        codec = codecs.untrained(0)  # the same network as the pretrained one: the same speed
    except ImportError:  # a bare GPU machine (tests/test_cuda.py): the rows without the codec
        row("EnCodec decode (CPU)", "skipped", "the encodec package is not installed")
    else:
        codes = torch.randint(0, valle.CODEBOOK_SIZE, (valle.N_CODEBOOKS, frames))
        codec_s = timed(lambda: codec.decode(codes))
        row("EnCodec decode (CPU)", f"{codec_s:.2f} s", f"{frames} frames")
if 2 in ar_seconds and nar_s is not None:
    e2e = ar_seconds[2] + nar_s + (codec_s or 0)
    audio = frames / valle.FRAME_RATE
    row(f"end to end, G=2 (AR + NAR{' + EnCodec' if codec_s else ''})", f"{e2e:.1f} s",
        f"real-time factor {e2e / audio:.3f} (wall / audio), {audio / e2e:.2f}x real time")

# --- batched generation -------------------------------------------------------------------------
with stands_alone("batch of 8 sentences vs 1"):
    bframes = min(frames, 150)
    for B in (1, 8):
        text_b, valid_b, _ = make_inputs(cfg, batch=B)
        streams = [torch.Generator(device).manual_seed(batched.SEED_STRIDE * c) for c in range(B)]  # one a row
        t = timed(lambda: valle.generate_ar(ar, text_b, valid_b, prompt[0], bframes // 2, valle.Sampling(),
                                            streams))
        if B == 1:
            one = t
        else:
            row(f"batch of {B} sentences vs 1 ({bframes // 2} AR steps)", f"{t / one:.2f}x",
                f"{t:.2f} s vs {one:.2f} s")

# --- training throughput and peak memory ----------------------------------------------------
with stands_alone("training AR + NAR"):
    ar.train(), nar.train()
    ar.float(), nar.float()
    train_frames = 300 if args.quick else 6000 if cuda else 500  # 6000: VALL-E's frames per GPU
    T = 100 if args.quick else 500
    B = train_frames // T
    codes = torch.randint(0, valle.CODEBOOK_SIZE, (B, valle.N_CODEBOOKS, T), device=device)
    text, _ = valle.pad_ids([valle.text_to_ids(TEXT)] * B, device)
    lens, text_lens = torch.full((B,), T, device=device), torch.full((B,), text.shape[1], device=device)
    opt = torch.optim.AdamW(list(ar.parameters()) + list(nar.parameters()), lr=1e-4)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = ar.loss(text, text_lens, codes, lens)[0] + nar.loss(text, text_lens, codes, lens)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timed(train_step, repeats=max(1, args.repeats - 1), autocast=False)
    if cuda:
        free, total_memory = torch.cuda.mem_get_info(device)
        memory = (f"peak GPU memory: tensors {torch.cuda.max_memory_allocated(device) / 2**30:.1f} "
                  f"GiB (max_memory_allocated), PyTorch's pool {torch.cuda.max_memory_reserved(device) / 2**30:.1f} "
                  f"GiB (max_memory_reserved); the device's whole use after the steps "
                  f"{(total_memory - free) / 2**30:.1f} GiB (CUDA context and every process included)")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        memory = f"peak process memory {peak / 2**30:.1f} GiB (ru_maxrss: the whole run so far)"
    row(f"training AR + NAR, batch {B} x {T} frames", f"{B * T / t:.0f} frames/s", f"{t:.2f} s/step; {memory}")
    if cuda:
        flops = training_flops(cfg, B, text.shape[1], T)
        name = torch.cuda.get_device_name(device)
        peak_flops, pattern = peak_bf16_flops(name)
        what = (f"{flops / t / 1e12:.0f} TFLOP/s of matrix products (bench.training_flops: "
                "forward and backward, attention over the whole S x S, no embeddings)")
        if peak_flops is None:
            row("training MFU, bf16", "unknown", f"{what}; {name} is not in bench.py's "
                "PEAK_BF16_TFLOPS: add its dense bf16 peak")
        else:
            row("training MFU, bf16", f"{100 * flops / t / peak_flops:.1f}%",
                f"{what} / {name}'s dense bf16 peak {peak_flops / 1e12:.0f} TFLOP/s "
                f"(PEAK_BF16_TFLOPS, {pattern!r})")
if failed:
    print(f"# {len(failed)} row(s) failed: {'; '.join(failed)}", flush=True)
    sys.exit(1)
