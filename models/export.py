"""Write a model to ship: a training checkpoint's inference weights and its codec's state, in
half precision, nothing of the optimizer. sample.py and eval.py load it like any checkpoint.

    python models/export.py runs/speak_ar/last.pt models/flite-small.pt --nar-from runs/speak_nar/last.pt

--nar-from takes the NAR from another checkpoint of the same config and codec: the recipe trains
the two models apart (train.py --models ar, then --models nar), as the paper does. The weights
are stored as fp16 (load_state_dict casts them back to the models' fp32); the mel codec's
codebooks stay as they are, since the training codes were made with them.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from extras import cli  # noqa: E402

KEEP = ("config", "phones", "codec", "codec_state")


def run_settings(ckpt):
    """A checkpoint's training step and settings, its folders by name only: no machine's paths
    in a shipped file."""
    args = {k: os.path.basename(str(v)) if k in ("data", "out", "init_from") and v else v
            for k, v in ckpt.get("args", {}).items()}
    return {"step": ckpt.get("step"), "args": args}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a train.py checkpoint with the AR (and the NAR)")
    p.add_argument("out", help="the file to write")
    p.add_argument("--nar-from", help="take the NAR from this checkpoint instead")
    p.add_argument("--fp32", action="store_true", help="keep the weights in fp32")
    args = p.parse_args(argv)
    try:
        cfg, ar, nar, ckpt = cli.load_checkpoint(args.checkpoint)
        nar_ckpt = ckpt
        if args.nar_from:
            nar_cfg, _, nar, nar_ckpt = cli.load_checkpoint(args.nar_from)
            if nar_cfg != cfg or nar_ckpt.get("codec") != ckpt.get("codec"):
                cli.fail(f"--nar-from {args.nar_from}: another config or codec than {args.checkpoint}'s")
    except (ValueError, FileNotFoundError) as e:
        cli.fail(str(e))
    if ar is None or nar is None:
        cli.fail(f"{args.nar_from if nar is None and args.nar_from else args.checkpoint} lacks "
                 f"the {'AR' if ar is None else 'NAR'} model")
    dtype = torch.float32 if args.fp32 else torch.float16
    state = {k: ckpt[k] for k in KEEP if k in ckpt}
    for name, model in (("ar", ar), ("nar", nar)):
        state[name] = {k: v.to(dtype) if v.is_floating_point() else v
                       for k, v in model.state_dict().items()}
    state["trained"] = {"ar": run_settings(ckpt), "nar": run_settings(nar_ckpt)}
    cli.save_checkpoint(args.out, **state)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, {str(dtype)[6:]}): AR of "
          f"step {ckpt.get('step')}, NAR of step {nar_ckpt.get('step')}")


if __name__ == "__main__":
    main()
