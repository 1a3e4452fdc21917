"""
The golden regression: a fixed seed and a tiny model give fixed codes (tests/golden.json).

    python tests/golden.py          # print the codes this code base gives now
    python tests/golden.py --write  # store them, when a change is meant to change the outputs

The models are first trained for a few steps on made-up data, so that their choices have
margins: random weights give near-flat logits whose argmax can flip with the CPU's
instruction set or the thread count. The threads are fixed at one for the same reason.
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import valle  # noqa: E402

PATH = os.path.join(ROOT, "tests", "golden.json")
TEXTS = [[20, 21, 22, 23, 24, 25], [30, 31, 32, 33]]  # phone ids: no text frontend involved
FRAMES = 64  # per made-up utterance
STEPS = 80  # training steps: greedy choices then win by 0.2 logits or more


def golden_codes():
    """-> dict of short code lists from training, AR decoding (greedy with RAS, and sampled,
    cached and naive) and the NAR."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            return _golden_codes()
    finally:
        torch.set_num_threads(threads)


def _golden_codes():
    torch.manual_seed(0)
    cfg = valle.get_config("tiny", dropout=0.0, group_size=2)
    ar, nar = valle.ARModel(cfg), valle.NARModel(cfg)
    # Two utterances whose codes walk in steps a model can learn: code t+1 follows code t.
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, valle.CODEBOOK_SIZE, (2, valle.N_CODEBOOKS, 1), generator=g)
    stride = torch.tensor([[[7]], [[13]]]) * torch.arange(1, valle.N_CODEBOOKS + 1)[:, None]
    codes = (start + stride * torch.arange(FRAMES)) % valle.CODEBOOK_SIZE  # (2, 8, 64)
    code_lens = torch.tensor([FRAMES, FRAMES - 10])
    text, text_valid = valle.pad_ids(TEXTS)
    text_lens = text_valid.sum(1)
    opt = torch.optim.AdamW(list(ar.parameters()) + list(nar.parameters()), lr=3e-3)
    losses = []
    for step in range(STEPS):
        ar_loss, _ = ar.loss(text, text_lens, codes, code_lens)
        nar_loss, _, _ = nar.loss(text, text_lens, codes, code_lens, torch.Generator().manual_seed(step))
        opt.zero_grad()
        (ar_loss + nar_loss).backward()
        opt.step()
        losses.append(round(ar_loss.item() + nar_loss.item(), 2))
    ar.eval(), nar.eval()

    prompt = codes[0, :, :16]  # (8, 16): the start of utterance 0
    out = {"loss_every_10_steps": losses[::10]}
    for name, sampling, cache in [("greedy_ras", valle.Sampling(top_p=0.0), True),
                                  ("sampled", valle.Sampling(), True),
                                  ("sampled_naive", valle.Sampling(), False)]:
        c0 = valle.generate_ar(ar, text, text_valid, prompt[0], 12, sampling,
                               valle.item_generators(5, 2, "cpu"), use_cache=cache)
        out[name] = [c.tolist() for c in c0]
    full = valle.generate_nar(nar, text, text_valid, prompt, [torch.tensor(c) for c in out["greedy_ras"]])
    out["nar_codebooks_1_to_7_first_4_frames"] = [f[1:, :4].tolist() for f in full]
    return out


if __name__ == "__main__":
    codes = golden_codes()
    print(json.dumps(codes))
    if "--write" in sys.argv[1:]:
        with open(PATH, "w") as f:  # one line per entry, to read and to diff
            f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in codes.items())
                    + "\n}\n")
        print(f"wrote {PATH}")
