"""
What the scripts (train.py, sample.py, eval.py, bench.py, data/*.py) share: one error
convention, one atomic write (checkpoints, tables, and WAV files through extras/audio.py), devices,
and loading a checkpoint, older ones included, into models ready for inference.
"""
import contextlib
import os
import sys
import warnings

import torch
import torch.nn.functional as F

import valle
from extras import speedups

# Columns of a prepared dataset's index.npy, one row per utterance (data/prepare.py writes it,
# train.py reads it): where its phones and frames start in phones.bin and codes.bin, how many,
# its speaker, and its language (an index into valle.LANGUAGES; a dataset prepared before
# languages were added has no such column: train.py reads it as English).
PHONE_OFFSET, PHONE_COUNT, FRAME_OFFSET, FRAME_COUNT, SPEAKER, LANGUAGE = range(6)


def fail(message):
    """The one error convention: one line `error: ...` on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def entry(run):
    """A script's main(argv=None) from its run(argv): bad input (ValueError, FileNotFoundError)
    is one line and exit status 2, before anything is written."""
    def main(argv=None):
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            return run(argv)
        except (ValueError, FileNotFoundError) as e:
            fail(e)
    return main


@contextlib.contextmanager
def atomic(path, mode="w"):
    """Open `path` for writing, whole or not at all, and durably: the file is written as path.tmp,
    flushed to the disk and renamed over path only when the block ends without an error, so
    neither a crash nor a power loss leaves anything but the previous file or the whole new one."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the rename makes it the file
        os.replace(tmp, path)
        sync_folder(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sync_folder(path):
    """Make a rename in path's folder durable (Windows opens no folders: its rename is as durable
    as it gets)."""
    try:
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_checkpoint(path, **state):
    """Write a checkpoint (what load_checkpoint reads) atomically and durably."""
    with atomic(path, "wb") as f:
        torch.save(state, f)


def pick_device(name="auto"):
    """'auto' -> CUDA when there is a GPU, else the CPU; any other name as torch.device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here")
    return device


# -----------------------------------------------------------------------------
# Checkpoints, older ones included


def known_phones(phones):
    """Whether a checkpoint's or dataset's phone table is ours or an older one: a prefix that
    holds at least the English symbols (the first table there was, before the IPA ones)."""
    return (isinstance(phones, list) and len(valle.PHONES) - len(valle.IPA) <= len(phones)
            and phones == valle.PHONES[: len(phones)])


def upgrade(ckpt):
    """A checkpoint saved before the phone table grew or languages were added -> today's: the
    new phones' embedding rows and the language embedding start at zero (so the models compute
    exactly what they did). Today's pass through unchanged."""
    if not known_phones(ckpt.get("phones")):
        return ckpt  # load_checkpoint names the problem
    ckpt = {**ckpt, "phones": valle.PHONES}
    for name in ("ar", "nar"):
        state = dict(ckpt.get(name) or {})
        rows = state.get("text_emb.weight")
        if rows is None:
            continue
        if len(rows) < len(valle.PHONES):
            state["text_emb.weight"] = F.pad(rows, (0, 0, 0, len(valle.PHONES) - len(rows)))
        if "language_emb" not in state:
            state["language_emb"] = rows.new_zeros(len(valle.LANGUAGES) - 1, rows.shape[1])
        ckpt[name] = state
    return ckpt


def load_checkpoint(path, device="cpu"):
    """-> (config, ar or None, nar or None, checkpoint dict), older checkpoints brought up to
    date (upgrade); errors say what to do. Tensors load onto `device`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with train.py")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        cfg = valle.Config(**ckpt["config"])
    except Exception as e:
        raise ValueError(f"{path} is not a valle2 checkpoint ({type(e).__name__}: {e})") from None
    ckpt = upgrade(ckpt)
    if ckpt.get("phones") != valle.PHONES:  # the text embedding's rows are this table's symbols
        raise ValueError(f"{path} was trained with another phone table: retrain it")
    models = {"ar": None, "nar": None}
    for name, cls in (("ar", valle.ARModel), ("nar", valle.NARModel)):
        if ckpt.get(name) is not None:
            models[name] = cls(cfg).to(device).eval()
            try:
                models[name].load_state_dict(ckpt[name])
            except RuntimeError as e:
                raise ValueError(f"{path}: {name} weights do not fit its config ({e})") from None
    return cfg, models["ar"], models["nar"], ckpt


def load_for_inference(path, device, bf16=False, int8=False):
    """A checkpoint -> (ar, nar, checkpoint dict), both models present, ready to generate:
    bf16 matrix products (run them under bf16 autocast), or on the CPU int8 weights (int8) or
    oneDNN kernels (extras/speedups.py, the default there)."""
    _, ar, nar, ckpt = load_checkpoint(path, device)
    if ar is None or nar is None:
        raise ValueError(f"{path} lacks the {'AR' if ar is None else 'NAR'} model: "
                         "train both (train.py --models ar,nar)")
    for model in (ar, nar):
        if bf16:  # bf16 matrix products; norms, residual stream and logits in fp32
            speedups.bf16_linears(model)
        elif device.type == "cpu":
            if int8:
                speedups.quantize_int8(model)
            speedups.onednn(model)
    return ar, nar, ckpt
