"""Draw docs/model.md's pictures from a training run: the learning curve (validation loss and
Whisper's WER against steps) and the AR's attention from audio to text at a few checkpoints.

    python docs/figures.py --run runs/speak --data data/speak/test --out docs/img

Reads what `bash run.sh speak` writes into the run's folder: speak_ar/train.log and
speak_nar/train.log (train.py's output), eval_<step>.txt (eval.py's tables at each of the AR's
stops) and speak_ar/step_<step>.pt (the AR's checkpoints). Needs matplotlib (`pip install
matplotlib`), which nothing else here uses.
"""
import argparse
import glob
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import valle  # noqa: E402
from extras import audio, cli, codecs  # noqa: E402


def validation_losses(log_path, model):
    """train.log -> {step: the model's validation loss}, from its lines "val <step> | ar X nar Y | ..."."""
    losses = {}
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"val\s+(\d+) \|([^|]*)\|", line)
            loss = re.search(rf"\b{model} ([\d.]+)", m.group(2)) if m else None
            if loss:
                losses[int(m.group(1))] = float(loss.group(1))
    return losses


def eval_wers(run):
    """<run>/eval_<step>.txt -> {step: {mode: WER %}}: the "this model" rows of eval.py's table."""
    wers = {}
    for path in glob.glob(os.path.join(run, "eval_*.txt")):
        m = re.search(r"eval_(\d+)\.txt$", path)
        if not m:
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = re.match(r"(continuation|cross)\s+this model, G=\d\s+([\d.-]+)\s+([\d.-]+)", line)
                if row:
                    wers.setdefault(int(m.group(1)), {})[row.group(1)] = float(row.group(3))
    return wers


@torch.inference_mode()
def attention(ar, text, groups):
    """The AR's attention probabilities, teacher-forced on one utterance: text (1, L), groups
    (1, N, G) -> (layers, heads, S, S) over the whole sequence (S = L + 2 + N), recomputed from
    each block's queries and keys (scaled_dot_product_attention returns no weights)."""
    qkv = []
    hooks = [b.qkv.register_forward_hook(lambda m, i, out: qkv.append(out)) for b in ar.transformer.blocks]
    try:
        ar(groups, None, None, text, torch.ones_like(text, dtype=torch.bool))
    finally:
        for h in hooks:
            h.remove()
    cfg, maps = ar.cfg, []
    for out in qkv:  # (1, S, 3d)
        q, k, _ = out.split(cfg.d_model, dim=2)
        q, k = (t.view(1, -1, cfg.n_head, cfg.head_dim).transpose(1, 2) for t in (q, k))  # (1, nh, S, hs)
        scores = q @ k.transpose(-1, -2) / cfg.head_dim ** 0.5  # (1, nh, S, S)
        S = scores.shape[-1]
        maps.append(scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)[0])
    return torch.stack(maps)


def text_attention(ar, text, groups):
    """From each audio position (<bos>, then each group) to each phone: (layers, N + 1, L), the
    mean over heads."""
    L = text.shape[1]
    return attention(ar, text, groups).mean(1)[:, L + 1:, :L]


def diagonality(attention):
    """How much of each audio position's attention to the text falls near the diagonal of a
    monotonic alignment (within 10% of the text's length of it): (N, L) -> float in [0, 1]."""
    N, L = attention.shape
    where = torch.arange(L)[None, :] / L - torch.arange(N)[:, None] / N  # (N, L)
    near = where.abs() <= 0.1
    return float((attention * near).sum() / attention.sum().clamp(min=1e-9))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run folder of bash run.sh speak")
    p.add_argument("--data", required=True, help="held-out recordings (folder layout): the "
                                                 "utterance whose attention is drawn")
    p.add_argument("--utterance", help="its id (default: the first of --data)")
    p.add_argument("--out", default="docs/img", help="folder for the PNG files")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        cli.fail("docs/figures.py needs matplotlib: pip install matplotlib")
    os.makedirs(args.out, exist_ok=True)

    # 1. The learning curve
    losses = {m: validation_losses(os.path.join(args.run, f"speak_{m}", "train.log"), m)
              for m in ("ar", "nar") if os.path.exists(os.path.join(args.run, f"speak_{m}", "train.log"))}
    if not any(losses.values()):
        cli.fail(f"no validation lines in {args.run}/speak_ar/train.log or speak_nar/train.log")
    wers = eval_wers(args.run)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for model, label in (("ar", "AR (codebook 0)"), ("nar", "NAR (codebooks 1-7)")):
        steps = sorted(losses.get(model, {}))
        top.plot(steps, [losses[model][s] for s in steps], label=label)
    top.set_ylabel("validation loss (nats)")
    top.legend()
    for mode in ("continuation", "cross"):
        points = sorted((s, w[mode]) for s, w in wers.items() if mode in w)
        if points:
            bottom.plot(*zip(*points), marker="o", label=mode)
    bottom.set_ylabel("WER % (Whisper tiny.en)\nthe AR of the step, the last NAR")
    bottom.set_xlabel("training step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "learning_curve.png"), dpi=100)
    plt.close(fig)

    # 2. Attention from audio to text at each kept checkpoint
    found = sorted((int(re.search(r"step_(\d+)\.pt$", c).group(1)), c)
                   for c in glob.glob(os.path.join(args.run, "speak_ar", "step_*.pt")))
    if not found:
        cli.fail(f"no step_<N>.pt checkpoints in {args.run}/speak_ar")
    found = [found[i] for i in sorted({round(i * (len(found) - 1) / 3) for i in range(4)})]
    from data import prepare
    items = prepare.list_items(args.data, "folder", "en")
    item = next((x for x in items if args.utterance in (None, x[0])), None)
    if item is None:
        cli.fail(f"no utterance {args.utterance} in {args.data}")
    _, path, text, _, _ = item
    ckpt_cfg, ar, _, ckpt = cli.load_checkpoint(found[-1][1])
    codec = codecs.load(ckpt["codec"], state=ckpt.get("codec_state"))
    c0 = codec.encode(audio.load_audio(path))[0]
    ids = torch.tensor([valle.text_to_ids(text)])
    groups = valle.group_codes(c0, ckpt_cfg.group_size)[None, :-1]
    fig, axes = plt.subplots(len(found), ckpt_cfg.n_layer, figsize=(2 * ckpt_cfg.n_layer, 2.2 * len(found)),
                             squeeze=False)
    for row, (step, checkpoint) in zip(axes, found):
        _, ar, _, _ = cli.load_checkpoint(checkpoint)
        maps = text_attention(ar, ids, groups)
        for layer, (ax, m) in enumerate(zip(row, maps)):
            ax.imshow(m.T, aspect="auto", origin="lower", cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"step {step}, layer {layer + 1}\n{diagonality(m):.2f} near the diagonal",
                         fontsize=7)
    fig.supxlabel("audio (groups of 2 frames) ->")
    fig.supylabel("<- phones of the text")
    fig.suptitle(f"AR attention from audio to text, mean of heads: {text!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "attention.png"), dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}/learning_curve.png and {args.out}/attention.png "
          f"(steps {', '.join(str(s) for s, _ in found)})")


if __name__ == "__main__":
    main()
