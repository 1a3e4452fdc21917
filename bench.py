"""
Speed and memory of VALL-E 2 on this machine: prints a table, asserts nothing.

    python bench.py --preset paper --threads 2          # the CPU figures in the README
    python bench.py --preset paper --device cuda --bf16
    python bench.py --preset tiny --quick               # a smoke run in seconds
    python bench.py --preset paper --compile            # + the compiled decode step on a CPU

Random weights (speed does not depend on them). <eos> is masked so that every run decodes the
same number of steps. Warm-up before timing, the median of --repeats runs, CUDA synchronised.
"""
import argparse
import math
import resource
import statistics
import time

import torch

import valle

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--preset", default="paper", choices=valle.PRESETS)
p.add_argument("--device", default="cpu")
p.add_argument("--threads", type=int, default=2, help="CPU threads")
p.add_argument("--seconds", type=float, default=10.0, help="speech to generate")
p.add_argument("--prompt-seconds", type=float, default=3.0)
p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
p.add_argument("--bf16", action="store_true", help="bfloat16 weights for decoding")
p.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")
p.add_argument("--compile", action="store_true",
               help="also time the compiled fixed-shape decode step (always on CUDA)")
args = p.parse_args()
torch.set_num_threads(args.threads)
device = torch.device(args.device)
cuda = device.type == "cuda"
TEXT = ("VALL-E two speaks this sentence in the voice of a short prompt, "
        "and it takes about ten seconds to say all of it out loud.")
PROMPT_TEXT = "A three second voice prompt."


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(fn, repeats=args.repeats, warmup=1):
    """Median wall time of fn() in seconds, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
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
    """Read bandwidth (bytes/s) of y = W x for a 256 MB fp32 W, the AR step's shape, by kernel."""
    W = torch.randn(8192, 8192, device=device)
    x = torch.randn(1, 8192, device=device)
    kernels = {DEFAULT: lambda: x @ W.T}
    if not cuda:
        import numpy as np
        Wn, xn = W.numpy(), x.numpy()
        kernels["oneDNN (valle.linear)"] = lambda: valle.linear(x, W)
        kernels["numpy (OpenBLAS)"] = lambda: xn @ Wn.T
    with torch.inference_mode():
        return {k: W.numel() * 4 / timed(f, repeats=10, warmup=3) for k, f in kernels.items()}


def copy_bandwidth():
    a = torch.empty(2**28, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), repeats=10, warmup=3)
    return 2 * a.numel() / t  # read + write


def make_inputs(cfg, batch=1):
    text_ids = valle.text_to_ids(PROMPT_TEXT) + [valle.PHONE_ID[valle.WORD_BOUNDARY]] + valle.text_to_ids(TEXT)
    text, text_valid = valle.pad_ids([text_ids] * batch, device)
    Tp = int(args.prompt_seconds * valle.FRAME_RATE)
    prompt = torch.randint(0, valle.CODEBOOK_SIZE, (valle.N_CODEBOOKS, Tp), device=device)
    return text, text_valid, prompt


rows = []


def row(name, value, note=""):
    rows.append((name, value, note))
    print(f"{name:<52} {value:>14}  {note}", flush=True)


frames = int(args.seconds * valle.FRAME_RATE)
if args.quick:
    frames = min(frames, 60)
dtype = torch.bfloat16 if args.bf16 else torch.float32
print(f"# bench: preset {args.preset}, {device}, {args.threads} threads, {dtype}, "
      f"{frames / valle.FRAME_RATE:.1f} s of speech after a {args.prompt_seconds:.0f} s prompt, "
      f"torch {torch.__version__}")

# --- AR decoding: KV cache vs naive, for each group size ------------------------------------
bws = read_bandwidths()
for kernel, b in bws.items():
    row(f"matrix-vector read bandwidth, {kernel}", f"{b / 1e9:.1f} GB/s", "W x, 256 MB fp32 W")
bw = max(bws.values())  # the floor is set by the fastest kernel, not by the one we use
if cuda:  # the GPU floor: weight bytes at the copy bandwidth (bytes read + written per second)
    bw = max(bw, copy_bandwidth())
    row("device copy bandwidth", f"{bw / 1e9:.0f} GB/s", "read + write; the floor uses it")
ar_seconds = {}
for G in (1, 2, 4, 8):
    torch.manual_seed(0)
    cfg = valle.get_config(args.preset, group_size=G, dropout=0.0)
    ar = NoEOS(cfg).to(device, dtype).eval()
    text, text_valid, prompt = make_inputs(cfg)
    steps = frames // G
    run = lambda cache, n=steps, compile=False: valle.generate_ar(  # noqa: E731
        ar, text, text_valid, prompt[0], n, valle.Sampling(), torch.Generator(device).manual_seed(0),
        use_cache=cache, compile=compile)
    total = timed(lambda: run(True))
    prefill = timed(lambda: run(True, 1))  # prefill + one step
    ar_seconds[G] = total
    floor = ar_weight_bytes(ar) / bw
    per_step = (total - prefill) / (steps - 1)
    default = "" if cuda else f", {per_step * bws[DEFAULT] / ar_weight_bytes(ar):.2f}x at torch's default's"
    row(f"AR G={G}: cached decode, {steps} steps", f"{total:.2f} s",
        f"prefill {1000 * prefill:.0f} ms, then {1000 * per_step:.1f} ms/step; floor "
        f"{1000 * floor:.1f} ms/step (weights {ar_weight_bytes(ar) / 1e6:.0f} MB / best read "
        f"bandwidth): {per_step / floor:.2f}x{default}; weights read at "
        f"{ar_weight_bytes(ar) / per_step / 1e9:.1f} GB/s")
    if G == 2 and (args.compile or cuda):
        t = time.perf_counter()
        run(True, 2, compile=True)  # compiles on the first call
        first = time.perf_counter() - t
        total_c = timed(lambda: run(True, compile=True))
        prefill_c = timed(lambda: run(True, 1, compile=True))
        per_step_c = (total_c - prefill_c) / (steps - 1)
        row(f"AR G={G}: compiled fixed-shape decode step" + (", CUDA graphs" if cuda else ""),
            f"{total_c:.2f} s", f"{1000 * per_step_c:.1f} ms/step, {per_step_c / floor:.2f}x the "
            f"floor, weights read at {ar_weight_bytes(ar) / per_step_c / 1e9:.1f} GB/s; first "
            f"call {first:.0f} s (compiling)")
    if G == 2 or args.quick:
        # The naive path costs one full forward per step, growing with the sequence: time it at
        # a few lengths and integrate, rather than waiting for every step.
        prefix = text.shape[1] + 2 + prompt.shape[1] // G
        samples = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
        costs = []
        for s in samples:
            groups = torch.randint(0, valle.CODEBOOK_SIZE, (1, prompt.shape[1] // G + s, G), device=device)

            def naive_step():
                x, v = ar.embed(text, text_valid, groups, torch.ones(groups.shape[:2], dtype=torch.bool, device=device))
                ar.logits(ar(x, v)[:, -1:])
            with torch.inference_mode():
                costs.append(timed(naive_step, repeats=max(1, args.repeats - 1)))
        naive = sum((costs[i] + costs[i + 1]) / 2 * (samples[i + 1] - samples[i])
                    for i in range(len(samples) - 1)) + costs[-1]
        row(f"AR G={G}: naive decode (recompute all), {steps} steps", f"{naive:.1f} s",
            f"{1000 * costs[0]:.0f} -> {1000 * costs[-1]:.0f} ms/step as the sequence grows "
            f"(prefix {prefix} + up to {steps}); integrated from {len(samples)} timed steps")
        row(f"AR G={G}: KV cache speed-up over naive", f"{naive / total:.1f}x")
    del ar
if not cuda:  # what oneDNN buys over torch's default CPU kernel, on a shorter run
    cfg = valle.get_config(args.preset, group_size=2, dropout=0.0)
    ar = NoEOS(cfg).eval()
    text, text_valid, prompt = make_inputs(cfg)
    n = min(60, frames // 2)
    per_step = {}
    for fast in (False, True):
        valle.USE_ONEDNN = fast
        run = lambda k: valle.generate_ar(ar, text, text_valid, prompt[0], k)  # noqa: E731
        per_step[fast] = (timed(lambda: run(n)) - timed(lambda: run(1))) / (n - 1)
    row("AR G=2 step, torch's default kernel vs oneDNN", f"{per_step[False] / per_step[True]:.2f}x",
        f"{1000 * per_step[False]:.1f} vs {1000 * per_step[True]:.1f} ms/step "
        f"({n} steps, valle.USE_ONEDNN False vs True)")
    del ar
row("AR time, G=1 / G=2", f"{ar_seconds[1] / ar_seconds[2]:.2f}x", "grouping halves the steps")

# --- NAR, codec, end to end -------------------------------------------------------------------
torch.manual_seed(0)
cfg = valle.get_config(args.preset, group_size=2, dropout=0.0)
ar = NoEOS(cfg).to(device, dtype).eval()
nar = valle.NARModel(cfg).to(device, dtype).eval()
text, text_valid, prompt = make_inputs(cfg)
c0 = [torch.randint(0, valle.CODEBOOK_SIZE, (frames,), device=device)]
nar_s = timed(lambda: valle.generate_nar(nar, text, text_valid, prompt, c0))
row("NAR: 7 greedy passes", f"{nar_s:.2f} s", f"{1000 * nar_s / 7:.0f} ms/pass over "
    f"{text.shape[1] + 1 + prompt.shape[1] + frames + 2} positions")
codec = valle.Codec.untrained(0)  # the same network as the pretrained one: the same speed
codes = torch.randint(0, valle.CODEBOOK_SIZE, (valle.N_CODEBOOKS, frames))
codec_s = timed(lambda: codec.decode(codes))
row("EnCodec decode (CPU)", f"{codec_s:.2f} s", f"{frames} frames")
e2e = ar_seconds[2] + nar_s + codec_s
audio = frames / valle.FRAME_RATE
row("end to end, G=2 (AR + NAR + EnCodec)", f"{e2e:.1f} s",
    f"real-time factor {e2e / audio:.3f} (wall / audio), {audio / e2e:.2f}x real time")

# --- batched generation -------------------------------------------------------------------------
bframes = min(frames, 150)
for B in (1, 8):
    text_b, valid_b, _ = make_inputs(cfg, batch=B)
    t = timed(lambda: valle.generate_ar(ar, text_b, valid_b, prompt[0], bframes // 2, valle.Sampling(),
                                        torch.Generator(device).manual_seed(0)))
    if B == 1:
        one = t
    else:
        row(f"batch of {B} sentences vs 1 ({bframes // 2} AR steps)", f"{t / one:.2f}x",
            f"{t:.2f} s vs {one:.2f} s")

# --- training throughput and peak memory ----------------------------------------------------
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
    torch.cuda.reset_peak_memory_stats()


def train_step():
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss = ar.loss(text, text_lens, codes, lens)[0] + nar.loss(text, text_lens, codes, lens)[0]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


t = timed(train_step, repeats=max(1, args.repeats - 1))
peak = (torch.cuda.max_memory_allocated() if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
row(f"training AR + NAR, batch {B} x {T} frames", f"{B * T / t:.0f} frames/s",
    f"{t:.2f} s/step; peak {'GPU' if cuda else 'process'} memory {peak / 2**30:.1f} GiB")
if cuda:
    n_params = sum(p.numel() for p in ar.parameters()) + sum(p.numel() for p in nar.parameters())
    tokens = B * (T // 2 + T + 2 * text.shape[1])  # AR sees T/G groups, NAR T frames
    flops = 6 * n_params / 2 * tokens  # each model sees its own tokens
    peak_flops = 989e12  # H100 SXM dense bf16
    row("training MFU (approx., bf16 dense peak 989 TFLOP/s)", f"{100 * flops / t / peak_flops:.1f}%")
