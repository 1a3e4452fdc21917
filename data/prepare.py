"""
Turn a speech corpus into training files, once: phone ids and EnCodec codes in flat
memory-mapped arrays, an index and a meta file.

    python data/prepare.py --layout folder --src data/demo --out data/prepared/demo
    python data/prepare.py --layout ljspeech --src LJSpeech-1.1 --out data/prepared/ljspeech
    python data/prepare.py --layout libritts --src LibriTTS/train-clean-100 --out data/prepared/libritts
    python data/prepare.py --layout vctk --src VCTK-Corpus --out data/prepared/vctk
    python data/prepare.py --layout manifest --src my_list.txt --out data/prepared/mine

Layouts:
  ljspeech  metadata.csv (id|text|normalized text) + wavs/<id>.wav, one speaker
  libritts  <speaker>/<chapter>/<id>.wav + <id>.normalized.txt (LibriTTS and LibriTTS-R)
  vctk      wav48*/<speaker>/<id>[_mic1].wav|flac + txt/<speaker>/<id>.txt
  folder    any audio file with a same-name .txt transcript; the speaker is its folder's name
  manifest  a text file of lines path|text|speaker (paths relative to the manifest)

Output (in --out):
  phones.bin  uint8 phone ids of every utterance, back to back
  codes.bin   int16 (frames, 8) EnCodec codes of every utterance, back to back
  index.npy   int64 (utterances, 5): phone offset, phone count, frame offset, frame count, speaker
  meta.json   codec, rates, phone table, speakers, utterance ids, counts, skipped files and why
Work is saved in chunks under --out/parts/, so an interrupted run picks up where it stopped.
A finished dataset (meta.json present) is never overwritten unless --overwrite is given.
"""
import argparse
import csv
import glob
import json
import os
import shutil
import sys
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import valle  # noqa: E402

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
CHUNK = 256  # utterances per saved part


# -----------------------------------------------------------------------------
# Layouts: each returns a sorted list of (utterance id, audio path, text, speaker)


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


def vctk(src):
    items, seen = [], set()
    for audio in sorted(glob.glob(os.path.join(src, "wav48*", "*", "*"))):
        if not audio.endswith(AUDIO_EXTENSIONS):
            continue
        speaker = os.path.basename(os.path.dirname(audio))
        utt = os.path.splitext(os.path.basename(audio))[0]
        utt = utt.replace("_mic1", "").replace("_mic2", "")  # VCTK 0.92 has two microphones
        if utt in seen:
            continue  # keep one microphone (mic1 sorts first)
        seen.add(utt)
        txt = os.path.join(src, "txt", speaker, utt + ".txt")
        items.append((utt, audio, _read(txt) if os.path.exists(txt) else "", speaker))
    return items


def folder(src):
    items = []
    for audio in glob.glob(os.path.join(src, "**", "*"), recursive=True):
        if audio.lower().endswith(AUDIO_EXTENSIONS):
            txt = os.path.splitext(audio)[0] + ".txt"
            text = _read(txt) if os.path.exists(txt) else ""
            utt = os.path.splitext(os.path.relpath(audio, src))[0].replace(os.sep, "/")
            items.append((utt, audio, text, os.path.basename(os.path.dirname(audio))))
    return items


def manifest(src):
    items, base = [], os.path.dirname(os.path.abspath(src))
    with open(src, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if line.strip():
                parts = line.rstrip("\n").split("|")
                path = os.path.join(base, parts[0])
                text = parts[1] if len(parts) > 1 else ""
                speaker = parts[2] if len(parts) > 2 else "speaker"
                items.append((f"{n:06d}", path, text, speaker))
    return items


LAYOUTS = {"ljspeech": ljspeech, "libritts": libritts, "vctk": vctk, "folder": folder,
           "manifest": manifest}


# -----------------------------------------------------------------------------
# Encoding


def encode_one(codec, path, text, min_s, max_s):
    """-> (phone ids, codes (T, 8) int16) or a reason to skip."""
    if not text.strip():
        return "empty transcript"
    try:
        ids = valle.text_to_ids(text)
    except ValueError:
        return "nothing to pronounce"
    try:
        wav = valle.load_audio(path)
    except (FileNotFoundError, ValueError):
        return "unreadable audio"
    seconds = len(wav) / valle.SAMPLE_RATE
    if seconds < min_s:
        return f"shorter than {min_s} s"
    if seconds > max_s:
        return f"longer than {max_s} s"
    if wav.abs().max() < 1e-4:
        return "silent"
    codes = codec.encode(wav).T.numpy().astype(np.int16)  # (T, 8)
    return ids, codes


def make_codec(name, checkpoint):
    if name == "untrained":
        return valle.Codec.untrained(seed=0)
    try:
        return valle.Codec.pretrained(checkpoint)
    except (OSError, RuntimeError, ValueError) as e:  # no network, bad file
        if name == "pretrained":
            raise SystemExit(f"error: cannot load pretrained EnCodec ({e}); pass "
                             "--encodec-checkpoint /path/to/encodec_24khz-d7cc33bc.th") from None
        print(f"WARNING: pretrained EnCodec unavailable ({type(e).__name__}); using the untrained "
              "test codec: training works, but decoded audio will be noise, not speech.")
        return valle.Codec.untrained(seed=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=LAYOUTS, required=True)
    p.add_argument("--src", required=True, help="corpus folder (or manifest file)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--codec", choices=["auto", "pretrained", "untrained"], default="auto",
                   help="auto: pretrained EnCodec if it can be loaded, else the untrained test codec")
    p.add_argument("--encodec-checkpoint", help="local encodec_24khz-d7cc33bc.th for offline use")
    p.add_argument("--min-seconds", type=float, default=0.5)
    p.add_argument("--max-seconds", type=float, default=20.0)
    p.add_argument("--overwrite", action="store_true", help="replace a finished dataset")
    args = p.parse_args(argv)

    if not os.path.exists(args.src):
        raise SystemExit(f"error: {args.src} does not exist")
    if os.path.exists(os.path.join(args.out, "meta.json")):
        if not args.overwrite:
            raise SystemExit(f"error: {args.out} already holds a finished dataset; "
                             "pass --overwrite to replace it")
        shutil.rmtree(args.out)
    try:
        items = sorted(LAYOUTS[args.layout](args.src))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {args.src} is not in the {args.layout} layout ({e.filename} "
                         "is missing); see --help for the layouts") from None
    if not items:
        raise SystemExit(f"error: no utterances found in {args.src} for the {args.layout} layout")

    parts_dir = os.path.join(args.out, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    with open(os.path.join(parts_dir, "settings.json"), "a+") as f:  # a resumed run must agree
        f.seek(0)
        settings = {k: v for k, v in vars(args).items() if k != "overwrite"}
        previous = f.read()
        if previous and json.loads(previous) != settings:
            raise SystemExit(f"error: {args.out} holds an unfinished run with other settings; "
                             "delete the folder or use the same arguments")
        if not previous:
            f.write(json.dumps(settings))

    codec = None
    n_chunks = (len(items) + CHUNK - 1) // CHUNK
    from tqdm import tqdm  # installed with nltk
    bar = tqdm(total=len(items), unit="utt", desc="encoding", mininterval=2.0)
    for c in range(n_chunks):
        part = os.path.join(parts_dir, f"{c:05d}.npz")
        chunk = items[c * CHUNK: (c + 1) * CHUNK]
        if os.path.exists(part):  # finished by an earlier run
            bar.update(len(chunk))
            continue
        codec = codec or make_codec(args.codec, args.encodec_checkpoint)
        ids, phones, codes, speakers, skipped = [], [], [], [], []
        for utt, path, text, speaker in chunk:
            out = encode_one(codec, path, text, args.min_seconds, args.max_seconds)
            if isinstance(out, str):
                skipped.append((utt, out))
            else:
                ids.append(utt), phones.append(out[0]), codes.append(out[1]), speakers.append(speaker)
            bar.update(1)
        tmp = part + ".tmp.npz"
        np.savez(tmp, ids=np.array(ids, dtype=str), speakers=np.array(speakers, dtype=str),
                 phones=np.array([i for x in phones for i in x], np.uint8),
                 phone_lens=np.array([len(x) for x in phones], np.int64),
                 codes=np.concatenate(codes) if codes else np.zeros((0, 8), np.int16),
                 code_lens=np.array([len(x) for x in codes], np.int64),
                 skipped=np.array(skipped, dtype=str).reshape(-1, 2), codec=codec.kind)
        os.replace(tmp, part)
    bar.close()

    # Concatenate the parts into flat arrays; meta.json is written last, marking the end.
    parts = [np.load(os.path.join(parts_dir, f"{c:05d}.npz")) for c in range(n_chunks)]
    kinds = {str(pt["codec"]) for pt in parts}
    if len(kinds) > 1:
        raise SystemExit(f"error: parts were encoded with different codecs {kinds}; "
                         f"delete {args.out} and run again")
    ids = [str(x) for pt in parts for x in pt["ids"]]
    speakers_of = [str(x) for pt in parts for x in pt["speakers"]]
    skipped = [tuple(map(str, x)) for pt in parts for x in pt["skipped"]]
    if not ids:
        raise SystemExit(f"error: every utterance was skipped: {dict(Counter(r for _, r in skipped))}")
    speakers = sorted(set(speakers_of))
    index = np.zeros((len(ids), 5), dtype=np.int64)
    index[:, 1] = np.concatenate([pt["phone_lens"] for pt in parts])
    index[:, 3] = np.concatenate([pt["code_lens"] for pt in parts])
    index[1:, 0] = np.cumsum(index[:-1, 1])
    index[1:, 2] = np.cumsum(index[:-1, 3])
    index[:, 4] = [speakers.index(s) for s in speakers_of]
    np.concatenate([pt["phones"] for pt in parts]).tofile(os.path.join(args.out, "phones.bin"))
    np.concatenate([pt["codes"] for pt in parts]).tofile(os.path.join(args.out, "codes.bin"))
    np.save(os.path.join(args.out, "index.npy"), index)
    meta = {
        "codec": kinds.pop(), "sample_rate": valle.SAMPLE_RATE, "frame_rate": valle.FRAME_RATE,
        "n_codebooks": valle.N_CODEBOOKS, "phones": valle.PHONES, "speakers": speakers,
        "ids": ids, "utterances": len(ids), "frames": int(index[:, 3].sum()),
        "hours": round(float(index[:, 3].sum()) / valle.FRAME_RATE / 3600, 4),
        "skipped": {reason: n for reason, n in Counter(r for _, r in skipped).items()},
        "skipped_ids": skipped, "layout": args.layout, "source": os.path.abspath(args.src),
    }
    tmp = os.path.join(args.out, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "meta.json"))
    shutil.rmtree(parts_dir)
    print(f"{args.out}: {len(ids)} utterances, {len(speakers)} speakers, "
          f"{meta['hours'] * 60:.1f} min, {meta['frames']} frames, codec {meta['codec']}; "
          f"skipped {len(skipped)}: {meta['skipped'] or 'none'}")


if __name__ == "__main__":
    main()
