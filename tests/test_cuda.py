"""
The GPU check: what only a CUDA GPU can show. pytest skips it where there is no CUDA.

    bash run.sh gpu-check                     # = python tests/test_cuda.py --out gpu_check.txt

It runs on a bare CUDA machine: PyTorch and numpy, none of our other packages, no network. Text
becomes phone ids through a stand-in frontend (its letters as phones: g2p-en may be missing),
the models are random or the golden model (tests/data/golden.pt), and no codec runs. Each check
appends its figures to one file as it finishes, so a run cut short keeps what it measured:

1. a bf16 training step of the paper preset under torch.cuda.set_sync_debug_mode("error"):
   nothing in train.train_step waits for the GPU;
2. train.py under torchrun --nproc_per_node 1 with NCCL, eager and --compile, through an
   evaluation and a checkpoint;
3. AR decoding compiled (CUDA graphs) against eager: greedy fp32 codes equal, bf16 agreement;
4. long text through the batch cap (--max-batch), against one batch;
5. the peak memory of one paper-preset training step at 6,000 frames in bf16, against the
   estimate of docs/training.md (10-14 GiB);
6. the bench.py --device cuda --bf16 rows.
"""
import argparse
import contextlib
import json
import os
import runpy
import socket
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import valle  # noqa: E402
from extras import cli, long_text, speedups  # noqa: E402

try:
    import pytest
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                    reason="needs a CUDA GPU: bash run.sh gpu-check")
except ImportError:  # the bare GPU machine: run as a script
    pytest = None

OUT = os.environ.get("VALLE_GPU_CHECK_OUT", os.path.join(ROOT, "gpu_check.txt"))
ESTIMATE_GIB = (10, 14)  # docs/training.md, "Memory": one paper-preset step at 6,000 frames, bf16


def record(check, what, value):
    line = f"{check} | {what} | {value}"
    print(line, flush=True)
    with open(OUT, "a") as f:
        f.write(line + "\n")


def letters_as_phones(text, language="en"):
    """A stand-in for valle.phonemize where g2p-en is missing: each letter one ARPAbet symbol,
    words parted by the word boundary, the punctuation valle keeps kept."""
    phones = []
    for word in text.split():
        phones += [valle.ARPABET[ord(c.lower()) % len(valle.ARPABET)] if c.isalnum() else c
                   for c in word if c.isalnum() or c in valle.PUNCTUATION] + [valle.WORD_BOUNDARY]
    return phones


def paper_batch(B, T, lens=None):
    """A batch of made-up codes: text and codes on the GPU, lengths on the CPU (as collate)."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 80, (B, 100), generator=g).cuda()
    codes = torch.randint(0, valle.CODEBOOK_SIZE, (B, valle.N_CODEBOOKS, T), generator=g).cuda()
    lens = torch.tensor(lens) if lens is not None else torch.full((B,), T)
    return text, torch.full((B,), 100), codes, lens


def paper_step(batch):
    """train.train_step's objects for the paper preset: -> a function running one bf16 step."""
    import train
    torch.manual_seed(0)
    cfg = valle.get_config("paper")
    raw = train.Both(valle.ARModel(cfg), valle.NARModel(cfg)).cuda().train()
    optimizer = torch.optim.AdamW(raw.parameters(), lr=1e-4, fused=True)
    args = argparse.Namespace(grad_accum=1, clip=1.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: train.train_step(raw, raw, optimizer, iter([batch]),
                                    torch.Generator().manual_seed(0), autocast, args, ddp=False)


def test_a_bf16_training_step_never_waits_for_the_gpu():
    step = paper_step(paper_batch(4, 500, [500, 450, 400, 300]))
    step()  # the first step allocates (cuBLAS workspaces, the optimizer's state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        stats, norms = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    figures = {k: round(float(v), 3) for k, v in {**stats, **norms}.items()}
    record(1, "paper preset, 4 x 500 frames, bf16: one step under sync debug mode 'error'",
           f"no synchronisation; {figures}")
    assert all(torch.isfinite(torch.tensor(list(figures.values()))))


def write_dataset(path, n=40, frames=150, phones=40):
    """A prepared dataset (data/prepare.py's files) of made-up codes, without a codec."""
    import numpy as np
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    index = np.zeros((n, 6), dtype=np.int64)  # cli.PHONE_OFFSET ... cli.LANGUAGE
    index[:, cli.PHONE_COUNT], index[:, cli.FRAME_COUNT] = phones, frames
    index[:, cli.PHONE_OFFSET] = np.arange(n) * phones
    index[:, cli.FRAME_OFFSET] = np.arange(n) * frames
    index[:, cli.SPEAKER] = np.arange(n) % 4
    np.save(os.path.join(path, "index.npy"), index)
    rng.integers(10, 80, n * phones, dtype=np.uint8).tofile(os.path.join(path, "phones.bin"))
    rng.integers(0, 1024, n * frames * 8, dtype=np.int16).tofile(os.path.join(path, "codes.bin"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"phones": valle.PHONES, "codec": "untrained-seed0", "utterances": n,
                   "ids": [f"u{i}" for i in range(n)]}, f)


def test_torchrun_with_nccl_evaluates_and_saves(tmp_path=None):
    tmp = str(tmp_path) if tmp_path else os.path.join(ROOT, "runs", "gpu-check")
    data = os.path.join(tmp, "data")
    write_dataset(data)
    for compile in (False, True):
        out = os.path.join(tmp, "compiled" if compile else "eager")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t = time.time()
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
             "--master_port", str(port), "train.py", "--data", data, "--out", out, "--preset",
             "tiny", "--max-steps", "6", "--eval-every", "3", "--log-every", "3",
             "--batch-frames", "1500"] + (["--compile"] if compile else []),
            cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "1 process(es) on cuda:0" in run.stdout and "val      3 |" in run.stdout
        ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True, map_location="cpu")
        assert ckpt["step"] == 6 and ckpt["processes"] == 1
        speed = [line.split("|")[5].strip() for line in run.stdout.splitlines()
                 if line.startswith("step")]
        record(2, f"torchrun --nproc_per_node 1, NCCL, tiny preset{', --compile' if compile else ''}",
               f"2 evaluations and checkpoints in {time.time() - t:.0f} s; ms/step at steps "
               f"1, 3, 6: {speed}")


def golden_on_gpu():
    import golden
    ar, nar = golden.load_weights()
    text, valid, codes, _ = golden.made_up_batch()
    return ar.cuda(), nar.cuda(), text.cuda(), valid.cuda(), codes.cuda()


def test_compiled_decoding_matches_eager():
    ar, _, text, valid, codes = golden_on_gpu()
    prompt = codes[0, 0, :16]

    def run(compile, bf16=False):
        model = speedups.bf16_linears(valle.ARModel(ar.cfg).to(text.device)) if bf16 else ar
        if bf16:
            model.load_state_dict(ar.state_dict())
            model.eval()
        with torch.autocast(text.device.type, dtype=torch.bfloat16, enabled=bf16):
            return valle.generate_ar(model.eval(), text, valid, prompt, 100, valle.Sampling(top_p=0.0),
                                     torch.Generator(text.device).manual_seed(0),
                                     cache_class=speedups.FixedShapeCache if compile else valle.KVCache)

    def agree(a, b):
        same = sum(int((x[:n] == y[:n]).sum()) for x, y in zip(a, b) for n in [min(len(x), len(y))])
        return same / max(1, max(sum(len(x) for x in a), sum(len(y) for y in b)))

    eager, compiled = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled)), (eager, compiled)
    bf16_eager, bf16_compiled = run(False, True), run(True, True)
    record(3, "golden model, greedy AR: compiled (CUDA graphs) vs eager",
           f"fp32 equal ({sum(len(c) for c in eager)} codes); bf16 compiled vs eager "
           f"{agree(bf16_eager, bf16_compiled):.3f}, bf16 vs fp32 {agree(bf16_eager, eager):.3f}")


def test_long_text_through_the_batch_cap(monkeypatch=None):
    ar, nar, _, _, codes = golden_on_gpu()
    with contextlib.ExitStack() as stack:
        if monkeypatch is not None:
            monkeypatch.setattr(valle, "phonemize", letters_as_phones)
        else:
            real = valle.phonemize
            valle.phonemize = letters_as_phones
            stack.callback(setattr, valle, "phonemize", real)
        real_ar = valle.generate_ar
        stack.callback(setattr, valle, "generate_ar", real_ar)
        story = " ".join(f"Sentence number {w} is here." for w in "one two three four five six".split())

        def run(cap):  # -> the chunks' codes, and the rows of each AR batch
            calls = []
            valle.generate_ar = lambda m, text, *a, **k: calls.append(len(text)) or real_ar(m, text, *a, **k)
            out = long_text.generate_long(ar, nar, story, codes[0, :, :16], "A voice.", seed=1,
                                      candidates=2, max_batch=cap)
            return [c for candidate in out for c in candidate[1]], calls
        (whole, whole_calls), (capped, capped_calls) = run(None), run(3)
    # on a GPU a batch's shape picks the kernels: a near-tie may go another way, and a chunk
    # that then ends elsewhere is split differently, so the codes are compared, not asserted
    same = sum(torch.equal(a, b) for a, b in zip(whole, capped))
    assert max(capped_calls) <= 3 < max(whole_calls)
    record(4, f"long text, {len(whole)} chunks (2 candidates): batches of at most 3 vs one",
           f"AR batches {capped_calls} vs {whole_calls}; {same} of {len(whole)} chunks' codes equal")


def test_peak_memory_of_a_paper_step_at_6000_frames():
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step = paper_step(paper_batch(12, 500))  # VALL-E's 6,000 frames per GPU
    step()
    step()
    peak = torch.cuda.max_memory_allocated() / 2**30
    low, high = ESTIMATE_GIB
    record(5, "peak memory, paper preset, 12 x 500 frames, bf16 autocast, fused AdamW",
           f"{peak:.1f} GiB (docs/training.md's estimate {low}-{high} GiB)")
    assert peak < 80


def test_bench_rows():
    patch = ("import sys, runpy, valle; sys.path.insert(0, 'tests'); import test_cuda; "
             "valle.phonemize = test_cuda.letters_as_phones; "
             "sys.argv = ['bench.py'] + sys.argv[1:]; runpy.run_path('bench.py', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", patch, "--device", "cuda", "--bf16",
                          "--seconds", "5", "--repeats", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    for line in run.stdout.splitlines():
        record(6, "bench.py --device cuda --bf16 --seconds 5 --repeats 1", line)
    assert run.returncode == 0, run.stderr[-3000:]


def main():
    global OUT
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=OUT, help="the file the figures go to (appended)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA GPU here: the GPU check needs one", file=sys.stderr)
        sys.exit(2)
    OUT = os.environ["VALLE_GPU_CHECK_OUT"] = os.path.abspath(args.out)  # bench's Python too
    name = torch.cuda.get_device_name()
    record(0, "GPU", f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                     f"{time.strftime('%Y-%m-%d %H:%M')}")
    failed = 0
    for check in (test_a_bf16_training_step_never_waits_for_the_gpu,
                  test_torchrun_with_nccl_evaluates_and_saves, test_compiled_decoding_matches_eager,
                  test_long_text_through_the_batch_cap, test_peak_memory_of_a_paper_step_at_6000_frames,
                  test_bench_rows):
        t = time.time()
        try:
            check()
            verdict = "passed"
        except Exception as e:  # noqa: BLE001 - every check runs, each says how it ended
            failed += 1
            verdict = f"FAILED: {type(e).__name__}: {str(e).strip()[:1500]}"
        record("-", check.__name__, f"{verdict} in {time.time() - t:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
