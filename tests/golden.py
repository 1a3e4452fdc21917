"""
The golden regression: stored weights give stored codes, on any CPU (tests/golden.json).

    python tests/golden.py          # what this code base gives now, beside what is stored
    python tests/golden.py --write-codes  # decode the stored weights again and store the codes:
                                          # when a change to decoding is meant to change them
    python tests/golden.py --write  # train again, store the weights, losses and codes: when a
                                    # change is meant to change training (say why in its commit)

Two halves, because training is not bit-reproducible across instruction sets (AVX2, AVX-512,
oneDNN on or off round the last bits differently, and a few dozen optimizer steps grow that
into other weights), while a forward pass with fixed weights is:

1. Decoding (exact). A small model (d_model 16, 2 layers, G=2), trained on made-up codes until
   its choices win by a margin, is stored in tests/data/golden.pt. From those weights, AR
   decoding greedy with RAS, sampled (cached and naive) and the NAR's greedy passes must give
   exactly the codes in golden.json. `--write` refuses weights whose greedy choices win by
   less than MIN_MARGIN logits, far above any CPU's rounding (about 1e-6 here).
2. Training (close). The first LOSS_STEPS steps from the same seed must give the stored losses
   within LOSS_RTOL: a broken loss, optimizer or initialisation moves them by far more.

The threads are fixed at one: a matrix product split over threads adds in another order.
"""
import functools
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import valle  # noqa: E402
from extras import batched, cli  # noqa: E402

PATH = os.path.join(ROOT, "tests", "golden.json")
WEIGHTS = os.path.join(ROOT, "tests", "data", "golden.pt")
CONFIG = dict(d_model=16, n_head=2, n_layer=2, d_ff=64, dropout=0.0, group_size=2,
              max_text_tokens=64, max_frames=400)  # 0.75 MB of weights in git
TEXTS = [[20, 21, 22, 23, 24, 25], [30, 31, 32, 33]]  # phone ids: no text frontend involved
FRAMES = 64  # per made-up utterance
PROMPT_FRAMES = 16  # the voice prompt: the start of utterance 0
STEPS = 400  # training steps for the stored weights
LOSS_STEPS = 30  # training steps whose losses are compared (13.9 falls to 11.3 over them)
LOSS_RTOL = 1e-3  # relative; AVX-512, AVX2, no SIMD and oneDNN off differ by < 1e-6 here
MIN_MARGIN = 0.05  # logits: the least a stored greedy choice may win by


def one_thread(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng():
                return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapped


def made_up_batch():
    """Two utterances whose codes walk in steps a model can learn: code t+1 follows code t.
    -> text, text_valid, codes (2, 8, FRAMES), code_lens."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, valle.CODEBOOK_SIZE, (2, valle.N_CODEBOOKS, 1), generator=g)
    stride = torch.tensor([[[7]], [[13]]]) * torch.arange(1, valle.N_CODEBOOKS + 1)[:, None]
    codes = (start + stride * torch.arange(FRAMES)) % valle.CODEBOOK_SIZE
    text, text_valid = valle.pad_ids(TEXTS)
    return text, text_valid, codes, torch.tensor([FRAMES, FRAMES - 10])


@one_thread
def train(steps):
    """-> (ar, nar, the summed loss of every step), from seed 0."""
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", **CONFIG)
    ar, nar = valle.ARModel(cfg), valle.NARModel(cfg)
    text, text_valid, codes, code_lens = made_up_batch()
    text_lens = text_valid.sum(1)
    opt = torch.optim.AdamW(list(ar.parameters()) + list(nar.parameters()), lr=3e-3)
    losses = []
    for step in range(steps):
        ar_loss, _ = ar.loss(text, text_lens, codes, code_lens)
        nar_loss, _, _ = nar.loss(text, text_lens, codes, code_lens,
                                  torch.Generator().manual_seed(step))
        opt.zero_grad()
        (ar_loss + nar_loss).backward()
        opt.step()
        losses.append(ar_loss.item() + nar_loss.item())
    return ar.eval(), nar.eval(), losses


def load_weights():
    cfg, ar, nar, _ = cli.load_checkpoint(WEIGHTS)
    return ar, nar


@one_thread
def decode(ar, nar):
    """-> dict of code lists: AR decoding (greedy with RAS; sampled at temperature 2 with top-p
    and RAS, cached and naive) and the NAR's codebooks 1-7 for the greedy codes."""
    text, text_valid, codes, _ = made_up_batch()
    prompt = codes[0, :, :PROMPT_FRAMES]  # (8, Tp)
    out = {}
    hot = valle.Sampling(temperature=2.0)  # at 1.0 the trained model's draws are its argmax
    for name, sampling, cache in [("greedy_ras", valle.Sampling(top_p=0.0), True),
                                  ("sampled", hot, True), ("sampled_naive", hot, False)]:
        streams = [torch.Generator().manual_seed(5 + batched.SEED_STRIDE * c) for c in (0, 1)]
        c0 = valle.generate_ar(ar, text, text_valid, prompt[0], 12, sampling, streams, use_cache=cache)
        out[name] = [c.tolist() for c in c0]
    full = valle.generate_nar(nar, text, text_valid, prompt, [torch.tensor(c) for c in out["greedy_ras"]])
    out["nar_codebooks_1_to_7"] = [f[1:].tolist() for f in full]
    return out


@one_thread
def greedy_margins(ar, nar, out):
    """The least margin (top-1 minus top-2 logit) of the decoded codes that were argmax choices:
    the AR's greedy codes that RAS let stand, and every NAR code (out: what decode returned).
    -> (ar margin, nar margin)."""
    text, text_valid, codes, _ = made_up_batch()
    prompt = codes[0, :, :PROMPT_FRAMES]
    prompt_valid = torch.ones(1, PROMPT_FRAMES, dtype=torch.bool)
    ar_margin = nar_margin = float("inf")
    with torch.inference_mode():
        for i, c0 in enumerate(out["greedy_ras"]):
            whole = torch.cat([prompt[0], torch.tensor(c0, dtype=torch.long)])
            groups = valle.group_codes(whole, ar.cfg.group_size)[None, :-1]  # (1, N, G)
            # the logits that chose each code: those of <bos> .. the last group but one
            new = ar(groups, None, None, text[i:i + 1], text_valid[i:i + 1])[0, :-1]
            new = new.flatten(0, 1)[-len(c0):]  # (len(c0), 1025)
            top2 = new.topk(2, dim=-1).values
            argmax = new.argmax(-1) == torch.tensor(c0)
            if argmax.any():
                ar_margin = min(ar_margin, float((top2[:, 0] - top2[:, 1])[argmax].min()))
        for i, (c0, rest) in enumerate(zip(out["greedy_ras"], out["nar_codebooks_1_to_7"])):
            target = torch.tensor([c0] + rest)[None]  # (1, 8, T): pass j reads codebooks < j
            valid = torch.ones(1, len(c0), dtype=torch.bool)
            for j in range(1, valle.N_CODEBOOKS):
                top2 = nar(text[i:i + 1], text_valid[i:i + 1], prompt[None], prompt_valid,
                           target, valid, j).topk(2, dim=-1).values
                nar_margin = min(nar_margin, float((top2[..., 0] - top2[..., 1]).min()))
    return ar_margin, nar_margin


def expected():
    with open(PATH) as f:
        return json.load(f)


def store(entries):
    with open(PATH, "w") as f:  # one line per entry, to read and to diff
        f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in entries.items())
                + "\n}\n")


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        ar, nar, losses = train(STEPS)
        codes = decode(ar, nar)
        margins = greedy_margins(ar, nar, codes)
        print(f"after {STEPS} steps: loss {losses[-1]:.3f}; least greedy margin AR {margins[0]:.3f},"
              f" NAR {margins[1]:.3f} logits")
        if not MIN_MARGIN <= min(margins) < float("inf"):  # inf: no argmax choice to measure
            sys.exit(f"error: a greedy choice wins by less than {MIN_MARGIN}: train longer")
        cfg = valle.get_config("tiny", **CONFIG)
        cli.save_checkpoint(WEIGHTS, config=cfg.to_dict(), phones=valle.PHONES,
                            codec="untrained-seed0", ar=ar.state_dict(), nar=nar.state_dict(),
                            step=STEPS)
        store({f"loss_first_{LOSS_STEPS}_steps": [round(x, 6) for x in losses[:LOSS_STEPS]], **codes})
        print(f"wrote {WEIGHTS} and {PATH}")
    elif "--write-codes" in sys.argv[1:]:
        ar, nar = load_weights()
        codes = decode(ar, nar)
        margins = greedy_margins(ar, nar, codes)
        if not MIN_MARGIN <= min(margins) < float("inf"):
            sys.exit(f"error: a greedy choice wins by less than {MIN_MARGIN}: use --write")
        old = expected()
        store({**old, **codes})
        print(f"wrote {PATH}: " + ", ".join(f"{k} {'same' if old[k] == v else 'changed'}"
                                            for k, v in codes.items()))
    else:
        want = expected()
        ar, nar = load_weights()
        got = decode(ar, nar)
        for k, v in got.items():
            print(k, "same" if v == want[k] else "DIFFERS")
        print("margins", greedy_margins(ar, nar, got))
        losses = train(LOSS_STEPS)[2]
        print("losses", [round(x, 6) for x in losses])
        print("stored", want[f"loss_first_{LOSS_STEPS}_steps"])
