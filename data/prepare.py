"""
Turn a speech corpus into training files, once: phone ids and EnCodec codes in flat
memory-mapped arrays, an index and a meta file.

    python data/prepare.py --layout folder --src data/demo --out data/prepared/demo
    python data/prepare.py --layout ljspeech --src LJSpeech-1.1 --out data/prepared/ljspeech
    python data/prepare.py --layout libritts --src LibriTTS/train-clean-100 --out data/prepared/libritts
    python data/prepare.py --layout librispeech --src LibriSpeech/train-clean-100 --out data/prepared/librispeech
    python data/prepare.py --layout vctk --src VCTK-Corpus --out data/prepared/vctk
    python data/prepare.py --layout manifest --src my_list.txt --out data/prepared/mine

At corpus size: EnCodec runs on --device (auto: CUDA when present), --batch-size utterances per
call (16 on CUDA; 1 on the CPU, where batching is no faster), while --workers processes read,
resample and phonemize the audio:

    python data/prepare.py --layout libritts --src LibriTTS --out DIR --device cuda --workers 8

Several GPUs or machines: each runs one shard of the chunks into its own DIR/parts-<i>of<n>/;
copy those folders into one DIR, then merge them into the dataset:

    python data/prepare.py --layout libritts --src LibriTTS --out DIR --shard 0/2   # GPU 0
    CUDA_VISIBLE_DEVICES=1 python data/prepare.py ... --out DIR --shard 1/2        # GPU 1
    python data/prepare.py --merge --out DIR

Layouts:
  ljspeech  metadata.csv (id|text|normalized text) + wavs/<id>.wav, one speaker
  libritts  <speaker>/<chapter>/<id>.wav + <id>.normalized.txt (LibriTTS and LibriTTS-R)
  librispeech
            <speaker>/<chapter>/<id>.flac + <speaker>-<chapter>.trans.txt of "<id> <TEXT>" lines
            (LibriSpeech; eval.py reads it with the same function)
  vctk      wav48*/<speaker>/<id>[_mic1].wav|flac + txt/<speaker>/<id>.txt
  folder    any audio file with a same-name .txt transcript; the speaker is its folder's name
  manifest  a text file of lines path|text|speaker|language (paths relative to the manifest;
            speaker and language may be left out)

Languages: --language (default en) is every utterance's language, unless a manifest line
gives its own. English is phonemized by g2p-en to ARPAbet, the others (de, es, fr) by the
espeak-ng program to IPA (valle.phonemize); each utterance's language goes into the index.

    python data/prepare.py --layout folder --src my_german_corpus --out DIR --language de

Output (in --out):
  phones.bin  uint8 phone ids of every utterance, back to back
  codes.bin   int16 (frames, 8) EnCodec codes of every utterance, back to back
  index.npy   int64 (utterances, 6): phone offset, phone count, frame offset, frame count, speaker,
              language (an index into valle.LANGUAGES; a dataset prepared before languages were
              added has 5 columns and reads as English)
  meta.json   codec, rates, phone and language tables, speakers, utterance ids, counts, phones
              outside the table (read as <unk>), skipped files and why
Work is saved in chunks of 256 utterances under --out/parts/ (--out/parts-<i>of<n>/ for a
shard), so an interrupted run picks up where it stopped. A finished dataset (meta.json
present) is never overwritten unless --overwrite is given.
"""
import argparse
import csv
import glob
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import valle  # noqa: E402
from extras import audio, cli, codecs  # noqa: E402
from extras.cli import (FRAME_COUNT, FRAME_OFFSET, LANGUAGE, PHONE_COUNT,  # noqa: E402
                        PHONE_OFFSET, SPEAKER)  # index.npy columns

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
CHUNK = 256  # utterances per saved part
NAMED_SKIPS = 5  # skipped utterances named on the console; meta.json lists them all
GPU_BATCH_SIZE = 16  # default utterances per EnCodec call on a GPU; 1 on the CPU (--batch-size)
# Paths that may differ between the machines of a sharded run: --merge does not compare them.
MACHINE_PATHS = ("src", "encodec_checkpoint")


die = cli.fail  # one line `error: ...`, exit status 2


# -----------------------------------------------------------------------------
# Layouts: each returns a sorted list of (utterance id, audio path, text, speaker[, language])


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def ljspeech(src):
    items = []
    with open(os.path.join(src, "metadata.csv"), encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE):
            if row:
                text = row[2] if len(row) > 2 and row[2] else row[1] if len(row) > 1 else ""
                items.append((row[0], os.path.join(src, "wavs", row[0] + ".wav"), text, "ljspeech"))
    return items


def libritts(src):
    items = []
    for wav in glob.glob(os.path.join(src, "**", "*.wav"), recursive=True):
        stem = wav[: -len(".wav")]
        txt = stem + ".normalized.txt"
        speaker = os.path.relpath(wav, src).split(os.sep)[-3] if wav.count(os.sep) >= 2 else "?"
        items.append((os.path.basename(stem), wav, _read(txt) if os.path.exists(txt) else "", speaker))
    return items


def librispeech(src):
    """LibriSpeech's own layout: <speaker>/<chapter>/<id>.flac, each chapter's transcripts in
    <speaker>-<chapter>.trans.txt, one "<id> <TEXT>" per line (a line without its .flac is kept:
    it is skipped later as a missing audio file, and counted)."""
    items = []
    for trans in glob.glob(os.path.join(src, "*", "*", "*.trans.txt")):
        chapter = os.path.dirname(trans)
        speaker = os.path.basename(os.path.dirname(chapter))
        with open(trans, encoding="utf-8") as f:
            for line in f:
                utt, _, text = line.strip().partition(" ")
                if utt:
                    items.append((utt, os.path.join(chapter, utt + ".flac"), text.strip(), speaker))
    return sorted(items)


def vctk(src):
    items, seen = [], set()
    for path in sorted(glob.glob(os.path.join(src, "wav48*", "*", "*"))):
        if not path.endswith(AUDIO_EXTENSIONS):
            continue
        speaker = os.path.basename(os.path.dirname(path))
        utt = os.path.splitext(os.path.basename(path))[0]
        utt = utt.replace("_mic1", "").replace("_mic2", "")  # VCTK 0.92 has two microphones
        if utt in seen:
            continue  # keep one microphone (mic1 sorts first)
        seen.add(utt)
        txt = os.path.join(src, "txt", speaker, utt + ".txt")
        items.append((utt, path, _read(txt) if os.path.exists(txt) else "", speaker))
    return items


def folder(src):
    items = []
    for path in glob.glob(os.path.join(src, "**", "*"), recursive=True):
        if path.lower().endswith(AUDIO_EXTENSIONS):
            txt = os.path.splitext(path)[0] + ".txt"
            text = _read(txt) if os.path.exists(txt) else ""
            utt = os.path.splitext(os.path.relpath(path, src))[0].replace(os.sep, "/")
            items.append((utt, path, text, os.path.basename(os.path.dirname(path))))
    return items


def manifest(src):
    items, base = [], os.path.dirname(os.path.abspath(src))
    with open(src, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if line.strip():
                parts = line.rstrip("\n").split("|")
                path = os.path.join(base, parts[0])
                text = parts[1] if len(parts) > 1 else ""
                speaker = parts[2] if len(parts) > 2 and parts[2] else "speaker"
                language = parts[3].strip() if len(parts) > 3 and parts[3].strip() else None
                items.append((f"{n:06d}", path, text, speaker, language))
    return items


def with_language(items, default):
    """Layout items -> (id, path, text, speaker, language): a manifest line's own language, else
    `default` (--language)."""
    return [(*item[:4], item[4] if len(item) > 4 and item[4] else default) for item in items]


LAYOUTS = {"ljspeech": ljspeech, "libritts": libritts, "librispeech": librispeech, "vctk": vctk,
           "folder": folder, "manifest": manifest}


# -----------------------------------------------------------------------------
# Loading: reading, resampling and phonemizing, in --workers processes


def load_one(path, text, language, min_s, max_s):
    """-> (text tokens, waveform (n,) float32 at 24 kHz) or a reason to skip."""
    if not text.strip():
        return "empty transcript"
    try:
        ids = valle.text_to_ids(text, language)
    except ValueError:
        return "nothing to pronounce"
    try:
        wav = audio.load_audio(path)
    except FileNotFoundError:
        return "missing audio file"
    except ValueError:  # there, but not audio soundfile reads: corrupt, truncated, another format
        return "unreadable audio"
    seconds = len(wav) / valle.SAMPLE_RATE
    if seconds < min_s:
        return f"shorter than {min_s} s"
    if seconds > max_s:
        return f"longer than {max_s} s"
    if wav.abs().max() < audio.SILENCE_PEAK:
        return "silent"
    return ids, wav.numpy()  # a tensor would cross processes as a file descriptor, each


class Utterances(torch.utils.data.Dataset):
    """(utterance id, speaker, load_one's result) of each item; runs in the DataLoader's workers."""

    def __init__(self, items, min_s, max_s):
        self.items, self.min_s, self.max_s = items, min_s, max_s

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        utt, path, text, speaker, language = self.items[i]
        return utt, speaker, load_one(path, text, language, self.min_s, self.max_s)


def load_in_order(items, min_s, max_s, workers):
    """Iterate over the loaded items, in order; `workers` processes load ahead of the encoder."""
    return iter(torch.utils.data.DataLoader(
        Utterances(items, min_s, max_s), batch_size=None, num_workers=workers,
        collate_fn=tuple,  # hand each item over as it is (the default makes arrays tensors)
        # spawn, not fork: a forked child would inherit the codec's CUDA context and OpenMP
        # threads, which do not survive a fork; and spawn is what macOS and Windows do anyway.
        multiprocessing_context="spawn" if workers else None))


# -----------------------------------------------------------------------------
# Encoding


def make_codec(name, checkpoint, device):
    """--codec on `device`; auto: the pretrained EnCodec, else the untrained test codec."""
    if name in ("untrained", "spectral"):  # the test codecs (valle.Codec)
        codec = codecs.load(f"{name}-seed0")
    else:
        try:
            codec = codecs.load("pretrained", checkpoint)
        except ValueError as e:  # no network, or a bad file
            if name == "pretrained":
                die(str(e))
            print(f"WARNING: {e}; using the untrained test codec: training works, but decoded "
                  "audio will be noise, not speech.")
            codec = codecs.untrained(seed=0)
    codec.model.to(device)
    return codec


CODEC_STATE = "codec_state.pt"  # in --out: the mel codec's codebooks, which train.py puts in checkpoints


def mel_codec(items, args):
    """--codec mel: its codebooks from --codebooks (a dataset's codec_state.pt or a checkpoint),
    else from an earlier run into --out, else fitted now on up to codecs.MEL_FIT_FRAMES frames
    of utterances in a seeded random order; written to --out/codec_state.pt before any part is
    encoded, so that a resumed run or another shard on this machine reuses them."""
    path = os.path.join(args.out, CODEC_STATE)
    source = args.codebooks or (path if os.path.exists(path) and not args.overwrite else None)
    if source:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
            codec = codecs.mel(state.get("codec_state", state)["codebooks"])
        except Exception as e:
            die(f"--codebooks {source}: no mel codebooks there ({type(e).__name__}: {e})")
        print(f"codec {codec.kind}: codebooks from {source}")
    else:
        start, analysis, frames, n = time.time(), codecs.MelAnalysis(), [], 0
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
        for i in order:
            _, path_i, text, _, language = items[i]
            loaded = load_one(path_i, text, language, args.min_seconds, args.max_seconds)
            if isinstance(loaded, str):  # skipped, as the encoding will skip it
                continue
            with torch.no_grad():
                frames.append(analysis(torch.from_numpy(loaded[1]).view(1, 1, -1))[0].T)  # (T, 80)
            n += len(frames[-1])
            if n >= codecs.MEL_FIT_FRAMES:
                break
        if n < valle.CODEBOOK_SIZE:
            die(f"{n} frames of speech are too few to fit the mel codec's codebooks "
                f"({valle.CODEBOOK_SIZE} entries each): give a larger corpus")
        codec = codecs.mel(codecs.fit_codebooks(torch.cat(frames)[: codecs.MEL_FIT_FRAMES]))
        print(f"codec {codec.kind}: codebooks fitted on {min(n, codecs.MEL_FIT_FRAMES)} frames "
              f"({min(n, codecs.MEL_FIT_FRAMES) / valle.FRAME_RATE / 60:.1f} min) in "
              f"{time.time() - start:.0f} s")
    if source != path:
        os.makedirs(args.out, exist_ok=True)
        cli.save_checkpoint(path, **codec.state)
    codec.model.to(args.device)
    return codec


def times(speed):
    """A multiple of real time, two significant digits below 10x: 0.042x, 1.4x, 37x."""
    return f"{speed:.2g}x" if speed < 10 else f"{speed:.0f}x"


class Progress:
    """A tqdm bar of utterances that also shows the audio encoded and the throughput."""

    def __init__(self, total, done):
        from tqdm import tqdm  # installed with nltk
        self.bar = tqdm(total=total, initial=done, unit="utt", desc="encoding", mininterval=1.0)
        self.seconds, self.start = 0.0, time.perf_counter()

    def update(self, utterances, seconds=0.0):
        self.seconds += seconds
        speed = self.seconds / (time.perf_counter() - self.start)  # audio seconds per second
        self.bar.set_postfix_str(f"{self.seconds / 3600:.3f} h audio, {speed / 3600:.4f} h/s "
                                 f"= {times(speed)} real time", refresh=False)
        self.bar.update(utterances)  # redraws at most once per mininterval


def encode_sorted(codec, wavs, batch_size, progress):
    """(T_i, 8) int16 codes of each waveform, `batch_size` waveforms per EnCodec call.

    The batches are cut from the waveforms sorted by length, so that each pads little; the
    codes come back in the order of `wavs`."""
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    codes = [None] * len(wavs)
    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        for i, c in zip(batch, codec.encode_batch([torch.from_numpy(wavs[i]) for i in batch])):
            codes[i] = c.T.numpy().astype(np.int16)  # (T_i, 8)
        progress.update(len(batch), sum(len(wavs[i]) for i in batch) / valle.SAMPLE_RATE)
    return codes


def save_part(path, chunk, codec, batch_size, progress):
    """Encode one chunk of loaded items and save its arrays as one .npz part."""
    kept = [(utt, speaker, out) for utt, speaker, out in chunk if not isinstance(out, str)]
    skipped = [(utt, out) for utt, _, out in chunk if isinstance(out, str)]
    progress.update(len(skipped))
    tokens = [ids for _, _, (ids, _) in kept]  # phone id + language * PHONE_SLOTS (valle.LANGUAGES)
    codes = encode_sorted(codec, [wav for _, _, (_, wav) in kept], batch_size, progress)
    tmp = path + ".tmp.npz"
    np.savez(tmp, ids=np.array([utt for utt, _, _ in kept], dtype=str),
             speakers=np.array([speaker for _, speaker, _ in kept], dtype=str),
             languages=np.array([x[0] // valle.PHONE_SLOTS for x in tokens], np.int64),
             phones=np.array([i % valle.PHONE_SLOTS for x in tokens for i in x], np.uint8),
             phone_lens=np.array([len(x) for x in tokens], np.int64),
             codes=np.concatenate(codes) if codes else np.zeros((0, 8), np.int16),
             code_lens=np.array([len(x) for x in codes], np.int64),
             skipped=np.array(skipped, dtype=str).reshape(-1, 2), codec=codec.kind)
    os.replace(tmp, path)


def part_path(parts_dir, c):
    return os.path.join(parts_dir, f"{c:05d}.npz")


def encode_chunks(items, todo, parts_dir, codec, args, progress):
    """Encode the chunks numbered `todo` of `items` into parts_dir, one part at a time."""
    batch_size = args.batch_size or (1 if args.device.type == "cpu" else GPU_BATCH_SIZE)
    chunks = [items[c * CHUNK: (c + 1) * CHUNK] for c in todo]
    loaded = load_in_order([item for chunk in chunks for item in chunk], args.min_seconds,
                           args.max_seconds, args.workers)
    for c, chunk in zip(todo, chunks):
        save_part(part_path(parts_dir, c), [next(loaded) for _ in chunk], codec, batch_size,
                  progress)


# -----------------------------------------------------------------------------
# Settings of a run, recorded in each parts folder: resuming and merging check them


def corpus_settings(args, items):
    """What decides the encoded arrays (not --device, --batch-size, --workers or --shard,
    which change nothing but near-tie codes); the corpus's fingerprint catches added files,
    which would move the chunk boundaries under the saved parts."""
    listing = json.dumps([(utt, text, speaker) + ((lang,) if lang != "en" else ())  # English:
                          for utt, _, text, speaker, lang in items])  # as before languages came
    checkpoint = args.encodec_checkpoint and os.path.abspath(args.encodec_checkpoint)
    return {"layout": args.layout, "src": os.path.abspath(args.src), "codec": args.codec,
            "encodec_checkpoint": checkpoint, "min_seconds": args.min_seconds,
            "max_seconds": args.max_seconds, "chunk": CHUNK, "utterances": len(items),
            "chunks": (len(items) + CHUNK - 1) // CHUNK,
            "corpus": hashlib.sha1(listing.encode()).hexdigest()}


def differing(a, b, ignore=()):
    return sorted(k for k in a.keys() | b.keys() if k not in ignore and a.get(k) != b.get(k))


def write_json(path, obj, indent=None):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def claim(parts_dir, settings, out):
    """Start parts_dir with these settings, or check that the run it holds used the same."""
    path = os.path.join(parts_dir, "settings.json")
    if os.path.exists(path):
        changed = differing(read_json(path), settings)
        if changed:
            die(f"{out} holds an unfinished run with other settings ({', '.join(changed)}); "
                "delete the folder or use the same arguments")
    else:
        os.makedirs(parts_dir, exist_ok=True)
        write_json(path, settings)


def find_parts(out, folders):
    """Check that `folders` hold every chunk of one corpus exactly once, encoded with the same
    settings; -> (settings, path of each chunk's part in chunk order)."""
    if not folders:
        die(f"no parts folders in {out}: run the shards (--shard i/n) with this --out first")
    settings = {}
    for d in folders:
        if not os.path.exists(os.path.join(d, "settings.json")):
            die(f"{d} has no settings.json: not a parts folder of data/prepare.py")
        settings[d] = read_json(os.path.join(d, "settings.json"))
        changed = differing(settings[d], settings[folders[0]], ignore=MACHINE_PATHS)
        if changed:
            die(f"{d} and {folders[0]} hold runs with other settings ({', '.join(changed)})")
    where = {}
    for d in folders:
        for name in os.listdir(d):
            if re.fullmatch(r"\d+\.npz", name):
                c = int(name[: -len(".npz")])
                if c in where:
                    die(f"chunk {c} is in both {where[c]} and {d}: keep one of them")
                where[c] = d
    n_chunks = settings[folders[0]]["chunks"]
    missing = [c for c in range(n_chunks) if c not in where]
    if missing:
        die(f"{len(missing)} of {n_chunks} chunks are missing (chunk {missing[0]} and others): "
            f"is a shard unfinished, or its parts folder not copied into {out}?")
    return settings[folders[0]], [part_path(where[c], c) for c in range(n_chunks)]


def parts_folders(out):
    """The unsharded parts/ and the shards' parts-<i>of<n>/ in out."""
    return sorted(os.path.join(out, d) for d in os.listdir(out)
                  if re.fullmatch(r"parts(-\d+of\d+)?", d) and os.path.isdir(os.path.join(out, d)))


# -----------------------------------------------------------------------------
# Writing the dataset: the parts appended to flat arrays, one part in memory at a time


def write_dataset(out, settings, paths):
    """Write phones.bin, codes.bin, index.npy and, last, meta.json from the parts at `paths`."""
    # First only the small arrays, so that nothing is written unless all parts fit together.
    kinds, ids, speakers_of, skipped, phone_lens, code_lens = set(), [], [], [], [], []
    languages, unknown = [], 0
    for path in paths:
        with np.load(path) as pt:
            kinds.add(str(pt["codec"]))
            ids += [str(x) for x in pt["ids"]]
            speakers_of += [str(x) for x in pt["speakers"]]
            languages += pt["languages"].tolist() if "languages" in pt else [0] * len(pt["ids"])
            unknown += int((pt["phones"] == valle.UNK_ID).sum())
            skipped += [tuple(map(str, x)) for x in pt["skipped"]]
            phone_lens.append(pt["phone_lens"]), code_lens.append(pt["code_lens"])
    if len(kinds) > 1:
        die(f"parts were encoded with different codecs {kinds}; delete {out} and run again")
    kind = next(iter(kinds), None)
    if kind and kind.startswith("mel-"):  # its codebooks go with the dataset, into checkpoints
        try:
            state = torch.load(os.path.join(out, CODEC_STATE), weights_only=True)
            assert codecs.mel(state["codebooks"]).kind == kind, "other codebooks"
        except (OSError, KeyError, AssertionError) as e:
            die(f"{out}/{CODEC_STATE} does not hold the codebooks of {kind} ({e}): copy the "
                "file from the shard that fitted them")
    if not ids:
        die(f"every utterance was skipped: {dict(Counter(r for _, r in skipped))}")
    if os.path.exists(os.path.join(out, "meta.json")):  # replaced (--overwrite): unmark it first
        os.remove(os.path.join(out, "meta.json"))
    with open(os.path.join(out, "phones.bin"), "wb") as phones, \
            open(os.path.join(out, "codes.bin"), "wb") as codes:
        for path in paths:
            with np.load(path) as pt:
                phones.write(pt["phones"].tobytes())
                codes.write(pt["codes"].tobytes())  # (frames, 8) int16, row-major
    speakers = sorted(set(speakers_of))
    number = {s: n for n, s in enumerate(speakers)}
    index = np.zeros((len(ids), LANGUAGE + 1), dtype=np.int64)
    index[:, PHONE_COUNT] = np.concatenate(phone_lens)
    index[:, FRAME_COUNT] = np.concatenate(code_lens)
    index[1:, PHONE_OFFSET] = np.cumsum(index[:-1, PHONE_COUNT])
    index[1:, FRAME_OFFSET] = np.cumsum(index[:-1, FRAME_COUNT])
    index[:, SPEAKER] = [number[s] for s in speakers_of]
    index[:, LANGUAGE] = languages
    np.save(os.path.join(out, "index.npy"), index)
    meta = {
        "codec": kinds.pop(), "sample_rate": valle.SAMPLE_RATE, "frame_rate": valle.FRAME_RATE,
        "n_codebooks": valle.N_CODEBOOKS, "phones": valle.PHONES, "languages": valle.LANGUAGES,
        "utterances_by_language": {valle.LANGUAGES[k]: n
                                   for k, n in sorted(Counter(languages).items())},
        "unknown_phones": unknown, "speakers": speakers,
        "ids": ids, "utterances": len(ids), "frames": int(index[:, FRAME_COUNT].sum()),
        "hours": round(float(index[:, FRAME_COUNT].sum()) / valle.FRAME_RATE / 3600, 4),
        "skipped": {reason: n for reason, n in Counter(r for _, r in skipped).items()},
        "skipped_ids": skipped, "layout": settings["layout"], "source": settings["src"],
    }
    write_json(os.path.join(out, "meta.json"), meta, indent=1)  # marks a finished dataset
    print(f"{out}: {len(ids)} utterances, {len(speakers)} speakers, "
          f"{meta['hours'] * 60:.1f} min, {meta['frames']} frames, codec {meta['codec']}; "
          f"skipped {len(skipped)}: {meta['skipped'] or 'none'}")
    for utt, reason in skipped[:NAMED_SKIPS]:
        print(f"  skipped {utt}: {reason}")
    if len(skipped) > NAMED_SKIPS:
        print(f"  ... and {len(skipped) - NAMED_SKIPS} more: every one is in {out}/meta.json "
              "(skipped_ids)")
    if len(meta["utterances_by_language"]) > 1 or "en" not in meta["utterances_by_language"]:
        print(f"languages: {meta['utterances_by_language']}")
    if unknown:
        print(f"{unknown} phones outside the phone table were read as <unk>")


def merge(out, folders):
    """Write the dataset from the parts in `folders`, then delete them."""
    settings, paths = find_parts(out, folders)
    write_dataset(out, settings, paths)
    for d in folders:
        for name in os.listdir(d):
            os.remove(os.path.join(d, name))
        os.rmdir(d)


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=LAYOUTS, help="required, except with --merge")
    p.add_argument("--src", help="corpus folder (or manifest file); required, except with --merge")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--language", default="en",
                   help=f"the utterances' language: {', '.join(valle.LANGUAGES)} (a manifest "
                        "line's fourth field overrides it)")
    p.add_argument("--codec", choices=["auto", "pretrained", "mel", "untrained", "spectral"],
                   default="auto",
                   help="auto: pretrained EnCodec if it can be loaded, else the untrained test codec; "
                        "mel: log-mel codes with codebooks fitted on this corpus, decoded by HiFi-GAN "
                        "(speech offline); spectral: the test codec whose codes follow the spectrum")
    p.add_argument("--codebooks", help="with --codec mel: use these codebooks (another dataset's "
                                       "codec_state.pt, or a checkpoint) instead of fitting them")
    p.add_argument("--encodec-checkpoint", help="local encodec_24khz-d7cc33bc.th for offline use")
    p.add_argument("--min-seconds", type=float, default=0.5,
                   help="skip utterances shorter than this")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="skip utterances longer than this")
    p.add_argument("--overwrite", action="store_true", help="replace a finished dataset")
    g = p.add_argument_group("speed (none of these changes what is encoded, but near-tie codes)")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    g.add_argument("--batch-size", type=int,
                   help="utterances per EnCodec call (default: 16 on CUDA; 1 on the CPU, where "
                        "batches are no faster, and 1 gives exactly Codec.encode's codes)")
    g.add_argument("--workers", type=int, default=0,
                   help="processes that read, resample and phonemize (default 0: the main one)")
    g = p.add_argument_group("several GPUs or machines")
    g.add_argument("--shard", help="i/n: encode only the chunks c with c %% n == i, into "
                                   "--out/parts-<i>of<n>/; finish with --merge")
    g.add_argument("--merge", action="store_true",
                   help="write the dataset from the parts folders in --out (after all shards)")
    args = p.parse_args(argv)

    # Every check before anything is written, so a bad flag leaves no half-made output.
    if args.codebooks and args.codec != "mel":
        die("--codebooks needs --codec mel")
    if args.merge and args.shard:
        die("--merge combines the shards' parts: give it no --shard")
    if not args.merge and not (args.layout and args.src):
        die("--layout and --src are required (except with --merge)")
    if args.shard is not None:
        m = re.fullmatch(r"(\d+)/(\d+)", args.shard)
        if not m or int(m[1]) >= int(m[2]):
            die(f"--shard wants i/n with 0 <= i < n, e.g. 0/2, not {args.shard!r}")
        args.shard = int(m[1]), int(m[2])
    if args.workers < 0:
        die(f"--workers must be 0 or more, not {args.workers}")
    try:
        valle.check_language(args.language)
    except ValueError as e:
        die(f"--language: {e}")
    if args.batch_size is not None and args.batch_size < 1:
        die(f"--batch-size must be 1 or more, not {args.batch_size}")
    if not 0 <= args.min_seconds < args.max_seconds:
        die(f"--min-seconds ({args.min_seconds}) must be 0 or more and below --max-seconds "
            f"({args.max_seconds})")
    try:
        args.device = cli.pick_device(args.device)
    except ValueError as e:
        die(str(e))
    return args


def refuse_finished(out, overwrite):
    """A finished dataset is replaced only with --overwrite (and only when the new one is
    written: until then, it stays whole)."""
    if os.path.exists(os.path.join(out, "meta.json")) and not overwrite:
        die(f"{out} already holds a finished dataset; pass --overwrite to replace it")


def list_items(src, layout, language="en", layouts=LAYOUTS):
    """--src in --layout -> sorted (id, audio path, text, speaker, language); eval.py lists its
    utterances with it too. Raises ValueError for a source that is not there or not the layout,
    and for a language whose text frontend cannot run (espeak-ng missing), before any work."""
    if not os.path.exists(src):
        raise ValueError(f"--src {src} does not exist")
    try:
        items = sorted(layouts[layout](src))
    except FileNotFoundError as e:
        raise ValueError(f"{src} is not in the {layout} layout ({e.filename} is missing); "
                         "see --help for the layouts") from None
    if not items:
        raise ValueError(f"no utterances found in {src} for the {layout} layout")
    items = with_language(items, language)
    for code in sorted({item[4] for item in items}):
        try:
            valle.check_language(code)
            valle.phonemize("a", code)  # espeak-ng must be there before anything is written
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{src}: {e}") from None
    return items


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        if not os.path.isdir(args.out):
            die(f"{args.out} does not exist")
        refuse_finished(args.out, args.overwrite)
        merge(args.out, parts_folders(args.out))
        return
    try:
        items = list_items(args.src, args.layout, args.language)
    except ValueError as e:
        die(str(e))
    refuse_finished(args.out, args.overwrite)
    settings = corpus_settings(args, items)
    codec = None
    if args.codec == "mel":  # the codebooks decide the codes: they join the run's settings
        codec = mel_codec(items, args)
        settings["codec"] = codec.kind
    shard, n_shards = args.shard or (0, 1)
    mine = range(settings["chunks"])[shard::n_shards]  # chunk c goes to shard c % n
    parts_dir = os.path.join(args.out, f"parts-{shard}of{n_shards}" if args.shard else "parts")
    todo = [c for c in mine if not os.path.exists(part_path(parts_dir, c))]  # else done earlier
    # the codec first: when it cannot be loaded, the run stops before writing anything
    if todo and codec is None:
        codec = make_codec(args.codec, args.encodec_checkpoint, args.device)
    claim(parts_dir, settings, args.out)
    size = {c: len(items[c * CHUNK: (c + 1) * CHUNK]) for c in mine}
    progress = Progress(total=sum(size.values()),
                        done=sum(size.values()) - sum(size[c] for c in todo))
    if todo:
        encode_chunks(items, todo, parts_dir, codec, args, progress)
    progress.bar.close()

    if args.shard:
        print(f"shard {shard}/{n_shards} done: its {len(mine)} of {settings['chunks']} chunks are "
              f"in {parts_dir}. When every shard is done and their parts-*of{n_shards} folders "
              f"are in one --out, run: python data/prepare.py --merge --out {args.out}")
    else:
        merge(args.out, [parts_dir])


if __name__ == "__main__":
    main()
