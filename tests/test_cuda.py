"""
The GPU check: what only a CUDA GPU can show. pytest skips its checks where there is no CUDA.

    bash run.sh gpu-check            # = python tests/test_cuda.py --out gpu_check.txt
    bash run.sh gpu-check --dry-run  # any machine: each check's code on the CPU, small

It runs on a bare CUDA machine: PyTorch and maybe nothing else (no numpy, no C compiler, no
network, none of our other packages). Text becomes phone ids through a stand-in frontend (its
letters as phones: g2p-en may be missing), the models are random or the golden model
(tests/data/golden.pt), and no codec runs. Each check appends its figures to one file as it
finishes, so a run cut short keeps what it measured; a part that cannot run here says why on one
line, and the rest runs:

1. a bf16 training step of the paper preset under torch.cuda.set_sync_debug_mode("error"):
   nothing in train.train_step waits for the GPU;
2. train.py under torchrun --nproc_per_node 1 with NCCL, eager and --compile (which needs a
   compiler), through an evaluation and a checkpoint, in a folder of its own under
   runs/gpu-check/ (needs numpy: train.py's data path);
3. AR decoding compiled (CUDA graphs, their replays counted) against eager: greedy fp32 codes
   equal, bf16 agreement (needs a compiler);
4. long text through the batch cap (--max-batch), against one batch;
5. the peak memory of one paper-preset training step at 6,000 frames in bf16 (tensors, PyTorch's
   pool, the device's whole use), against docs/training.md's estimate ("Memory");
6. the bench.py --device cuda --bf16 rows (its compiled row needs a compiler).

The dry run (--dry-run) runs the same checks on the CPU at the tiny preset, with gloo for NCCL;
what only a GPU can do (sync debug mode, CUDA graphs, CUDA's memory statistics) is said and left
out, and so is train.py --compile, which on a CPU compiles for many minutes. It shows, before a GPU's minutes are spent, that a machine's Python runs the check to the
end: `VALLE_VENV=/path/to/a/torch-only/venv bash run.sh gpu-check --dry-run`.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import valle  # noqa: E402
from extras import cli, long_text, speedups  # noqa: E402

try:
    import pytest
except ImportError:  # the bare GPU machine: run as a script
    pytest = None

OUT = os.environ.get("VALLE_GPU_CHECK_OUT", os.path.join(ROOT, "gpu_check.txt"))
DEVICE = "cuda"  # the dry run: "cpu"
NEEDS_NUMPY = ("needs numpy (train.py's data path, the dataset writer): pip install numpy, or run "
               "bash run.sh gpu-wheels on a machine with a network and copy wheels/ along")


def needs_cuda(check):
    """pytest skips the check without CUDA; main() runs it on the CPU in the dry run."""
    if pytest is None:
        return check
    return pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="needs a CUDA GPU: bash run.sh gpu-check")(check)


class Skipped(Exception):
    """A check that cannot run here; the message says why."""


def skip(why):
    if pytest is not None and os.environ.get("PYTEST_CURRENT_TEST"):
        pytest.skip(why)
    raise Skipped(why)


def on_gpu():
    return DEVICE == "cuda"


def record(check, what, value):
    line = f"{check} | {what} | {value}"
    print(line, flush=True)
    with open(OUT, "a") as f:
        f.write(line + "\n")


def memory_estimate():
    """docs/training.md's estimate of one paper-preset step at 6,000 frames in bf16 autocast on
    a GPU -> (low, high) GiB: the one place where the band is written."""
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
        text = f.read()
    phrase = r"\s+".join("6,000 frames in bf16 autocast on a GPU needs about".split())
    found = re.search(phrase + r"\s+(\d+)-(\d+)\s+GiB", text)
    if not found:
        raise ValueError("docs/training.md no longer says 'needs about LOW-HIGH GiB' for the "
                         "paper preset at 6,000 frames: update memory_estimate")
    return int(found[1]), int(found[2])


def test_the_memory_estimate_comes_from_docs_training_md():  # runs on the CPU too
    low, high = memory_estimate()
    assert 0 < low < high


def letters_as_phones(text, language="en"):
    """A stand-in for valle.phonemize where g2p-en is missing: each letter one ARPAbet symbol,
    words parted by the word boundary, the punctuation valle keeps kept."""
    phones = []
    for word in text.split():
        phones += [valle.ARPABET[ord(c.lower()) % len(valle.ARPABET)] if c.isalnum() else c
                   for c in word if c.isalnum() or c in valle.PUNCTUATION] + [valle.WORD_BOUNDARY]
    return phones


def paper_batch(B, T, lens=None):
    """A batch of made-up codes: text and codes on the device, lengths on the CPU (as collate)."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 80, (B, 100), generator=g).to(DEVICE)
    codes = torch.randint(0, valle.CODEBOOK_SIZE, (B, valle.N_CODEBOOKS, T), generator=g).to(DEVICE)
    lens = torch.tensor(lens) if lens is not None else torch.full((B,), T)
    return text, torch.full((B,), 100), codes, lens


def paper_step(batch, preset="paper"):
    """train.train_step's objects for a preset: -> a function running one step (bf16 on a GPU)."""
    import train
    torch.manual_seed(0)
    cfg = valle.get_config(preset)
    raw = train.Both(valle.ARModel(cfg), valle.NARModel(cfg)).to(DEVICE).train()
    optimizer = torch.optim.AdamW(raw.parameters(), lr=1e-4, fused=on_gpu())
    args = argparse.Namespace(grad_accum=1, clip=1.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu() else contextlib.nullcontext()
    return lambda: train.train_step(raw, raw, optimizer, iter([batch]),
                                    torch.Generator().manual_seed(0), autocast, args, ddp=False)


@needs_cuda
def test_a_bf16_training_step_never_waits_for_the_gpu():
    if not on_gpu():  # the dry run: the step itself
        stats, norms = paper_step(paper_batch(2, 100, [100, 80]), "tiny")()
        figures = {k: round(float(v), 3) for k, v in {**stats, **norms}.items()}
        record(1, "dry run: tiny preset, 2 x 100 frames, fp32 on the CPU: one train.train_step",
               f"{figures}; sync debug mode needs CUDA: not checked")
        assert all(torch.isfinite(torch.tensor(list(figures.values()))))
        return
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


def run_all_or_nothing(command, timeout):
    """subprocess.run in a session of its own: past the timeout every process it started goes
    too (torchrun's workers would outlive torchrun and hold the GPU for the next checks)."""
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def fresh_folder():
    """A folder of this run's own under runs/gpu-check/ (train.py never trains into one that
    holds a run): the check runs again in the same clone."""
    parent = os.path.join(ROOT, "runs", "gpu-check")
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=parent)


@needs_cuda
def test_torchrun_with_nccl_evaluates_and_saves(tmp_path=None):
    if importlib.util.find_spec("numpy") is None:
        skip(NEEDS_NUMPY)
    tmp = str(tmp_path) if tmp_path else fresh_folder()
    data = os.path.join(tmp, "data")
    write_dataset(data)
    backend, where = ("NCCL", "cuda:0") if on_gpu() else ("gloo", "cpu")
    for compile in (False, True):
        what = f"torchrun --nproc_per_node 1, {backend}, tiny preset{', --compile' if compile else ''}"
        why = compile and (speedups.compile_missing("cpu", DEVICE)  # the NAR's split is CPU arithmetic
                           or not on_gpu() and "left to the GPU: on a CPU, compiling the training "
                           "step (a graph per NAR codebook, forward and backward) takes many minutes")
        if why:
            record(2, what, f"skipped: {why}")
            continue
        out = os.path.join(tmp, "compiled" if compile else "eager")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t = time.time()
        run = run_all_or_nothing(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
             "--master_port", str(port), "train.py", "--data", data, "--out", out, "--preset",
             "tiny", "--max-steps", "6", "--eval-every", "3", "--log-every", "3",
             "--batch-frames", "1500"] + (["--compile"] if compile else [])
            + ([] if on_gpu() else ["--threads", str(torch.get_num_threads())]), timeout=400)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"1 process(es) on {where}" in run.stdout and "val      3 |" in run.stdout
        ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True, map_location="cpu")
        assert ckpt["step"] == 6 and ckpt["processes"] == 1
        speed = [line.split("|")[5].strip() for line in run.stdout.splitlines()
                 if line.startswith("step")]
        record(2, what, f"2 evaluations and checkpoints in {time.time() - t:.0f} s, into "
                        f"{os.path.relpath(out, ROOT)}; ms/step at steps 1, 3, 6: {speed}")


def golden_on_device():
    import golden
    ar, nar = golden.load_weights()
    text, valid, codes, _ = golden.made_up_batch()
    return ar.to(DEVICE), nar.to(DEVICE), text.to(DEVICE), valid.to(DEVICE), codes.to(DEVICE)


@contextlib.contextmanager
def counting_graph_replays():
    """-> [n]: how many CUDA graphs replayed inside (torch.cuda.CUDAGraph.replay, which
    torch.compile's CUDA graph trees call)."""
    count = [0]
    if not on_gpu():
        yield count
        return
    replay = torch.cuda.CUDAGraph.replay

    def counted(self, *args, **kwargs):
        count[0] += 1
        return replay(self, *args, **kwargs)
    torch.cuda.CUDAGraph.replay = counted
    try:
        yield count
    finally:
        torch.cuda.CUDAGraph.replay = replay


@needs_cuda
def test_compiled_decoding_matches_eager():
    what = ("golden model, greedy AR: compiled (CUDA graphs) vs eager" if on_gpu() else
            "dry run: golden model, greedy AR on the CPU: compiled (Inductor) vs eager")
    why = speedups.compile_missing(DEVICE)
    if why:
        skip(why)
    ar, _, text, valid, codes = golden_on_device()
    prompt = codes[0, 0, :16]
    steps = [0]

    class Counted(speedups.FixedShapeCache):  # the compiled steps
        def step(self, model, new, pos):
            steps[0] += 1
            return super().step(model, new, pos)

    def run(compile, bf16=False):
        model = speedups.bf16_linears(valle.ARModel(ar.cfg).to(text.device)) if bf16 else ar
        if bf16:
            model.load_state_dict(ar.state_dict())
            model.eval()
        with torch.autocast(text.device.type, dtype=torch.bfloat16, enabled=bf16):
            return valle.generate_ar(model.eval(), text, valid, prompt, 100, valle.Sampling(top_p=0.0),
                                     torch.Generator(text.device).manual_seed(0),
                                     cache_class=Counted if compile else valle.KVCache)

    def agree(a, b):
        same = sum(int((x[:n] == y[:n]).sum()) for x, y in zip(a, b) for n in [min(len(x), len(y))])
        return same / max(1, max(sum(len(x) for x in a), sum(len(y) for y in b)))

    counters = torch._dynamo.utils.counters
    graphs, skips = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
    eager = run(False)
    with counting_graph_replays() as replays:
        compiled = run(True)
    fp32_steps, graphs = steps[0], counters["stats"]["unique_graphs"] - graphs
    skips = counters["inductor"]["cudagraph_skips"] - skips
    equal = all(torch.equal(a, b) for a, b in zip(eager, compiled))
    bf16_eager, bf16_compiled = run(False, True), run(True, True)
    graphs_note = (f"{replays[0]} CUDA graph replays in {fp32_steps} compiled steps "
                   f"({skips} CUDA graph skips)" if on_gpu() else
                   f"{fp32_steps} compiled steps, {graphs} graph(s) compiled (no CUDA graphs on a CPU)")
    record(3, what, f"fp32 {'equal' if equal else 'DIFFERENT'} ({sum(len(c) for c in eager)} codes); "
                    f"{graphs_note}; bf16 compiled vs eager {agree(bf16_eager, bf16_compiled):.3f}, "
                    f"bf16 vs fp32 {agree(bf16_eager, eager):.3f}")
    assert equal, (eager, compiled)
    assert not on_gpu() or replays[0] >= fp32_steps // 2, \
        f"{replays[0]} CUDA graph replays in {fp32_steps} compiled steps: the step ran without its graph"


@needs_cuda
def test_long_text_through_the_batch_cap(monkeypatch=None):
    ar, nar, _, _, codes = golden_on_device()
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
    record(4, f"{'' if on_gpu() else 'dry run, CPU: '}long text, {len(whole)} chunks (2 candidates): "
              "batches of at most 3 vs one",
           f"AR batches {capped_calls} vs {whole_calls}; {same} of {len(whole)} chunks' codes equal")


@needs_cuda
def test_peak_memory_of_a_paper_step_at_6000_frames():
    low, high = memory_estimate()
    if not on_gpu():
        skip(f"CUDA's memory statistics need a GPU (the estimate it compares with: "
             f"docs/training.md's {low}-{high} GiB)")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step = paper_step(paper_batch(12, 500))  # VALL-E's 6,000 frames per GPU
    step()
    step()
    torch.cuda.synchronize()
    allocated = torch.cuda.max_memory_allocated() / 2**30
    reserved = torch.cuda.max_memory_reserved() / 2**30
    free, total = torch.cuda.mem_get_info()
    record(5, "peak memory, paper preset, 12 x 500 frames, bf16 autocast, fused AdamW",
           f"tensors {allocated:.1f} GiB (max_memory_allocated: what docs/training.md's estimate "
           f"of {low}-{high} GiB counts); PyTorch's pool {reserved:.1f} GiB (max_memory_reserved: "
           f"tensors and the allocator's reserve); the device in use {(total - free) / 2**30:.1f} "
           f"of {total / 2**30:.0f} GiB after the steps (mem_get_info: the pool, the CUDA context, "
           "any other process)")
    assert allocated < 80


@needs_cuda
def test_bench_rows():
    patch = ("import sys, runpy, valle; sys.path.insert(0, 'tests'); import test_cuda; "
             "valle.phonemize = test_cuda.letters_as_phones; "
             "sys.argv = ['bench.py'] + sys.argv[1:]; runpy.run_path('bench.py', run_name='__main__')")
    flags = (["--device", "cuda", "--bf16", "--seconds", "5", "--repeats", "1"] if on_gpu() else
             ["--device", "cpu", "--preset", "tiny", "--quick", "--repeats", "1", "--compile",
              "--threads", str(torch.get_num_threads())])
    run = run_all_or_nothing([sys.executable, "-c", patch, *flags], timeout=400)
    for line in run.stdout.splitlines():
        record(6, f"bench.py {' '.join(flags)}", line)
    assert run.returncode == 0, (run.stdout.strip().splitlines() or [""])[-1] + " " + run.stderr[-3000:]


CHECKS = (test_a_bf16_training_step_never_waits_for_the_gpu, test_torchrun_with_nccl_evaluates_and_saves,
          test_compiled_decoding_matches_eager, test_long_text_through_the_batch_cap,
          test_peak_memory_of_a_paper_step_at_6000_frames, test_bench_rows)


def main():
    global OUT, DEVICE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="the file the figures go to, appended (default gpu_check.txt; "
                                 "with --dry-run runs/gpu-check/dry-run.txt)")
    p.add_argument("--dry-run", action="store_true",
                   help="run each check's code on the CPU at a small size, without a GPU")
    args = p.parse_args()
    if args.dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("error: no CUDA GPU here: the GPU check needs one (--dry-run runs its code on the "
              "CPU)", file=sys.stderr)
        sys.exit(2)
    out = args.out or os.path.join(ROOT, *(("runs", "gpu-check", "dry-run.txt") if args.dry_run
                                           else ("gpu_check.txt",)))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    OUT = os.environ["VALLE_GPU_CHECK_OUT"] = os.path.abspath(out)  # bench's Python too
    when = time.strftime("%Y-%m-%d %H:%M")
    if on_gpu():
        record(0, "GPU", f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA "
                         f"{torch.version.cuda}, Python {sys.version.split()[0]}, {when}")
    else:
        record(0, "dry run", f"CPU, torch {torch.__version__}, Python {sys.version.split()[0]}, "
                             f"{when}: each check's code at a small size, no GPU figures")
    numpy = "found" if importlib.util.find_spec("numpy") else "missing"
    record(0, "what the checks need", f"numpy {numpy}; "
           f"{speedups.compile_missing('cpu', DEVICE) or 'torch.compile finds its compilers'}")
    failed = 0
    for check in CHECKS:
        t = time.time()
        try:
            check()
            verdict = "passed"
        except Skipped as e:
            verdict = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 - every check runs, each says how it ended
            failed += 1
            verdict = f"FAILED: {type(e).__name__}: {str(e).strip()[:1500]}"
        record("-", check.__name__, f"{verdict} in {time.time() - t:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
