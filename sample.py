"""
Speak text in the voice of a short recording.

    python sample.py --text "Hello there."     # the shipped model, in a bundled voice: out.wav
    python sample.py --text "Hello there." --prompt voice.wav --prompt-text "what voice.wav says" \
        --checkpoint runs/demo/best.pt --out out.wav

Without --checkpoint it speaks with the model shipped in models/ (docs/model.md), and without
--prompt in a voice bundled beside it (models/voices/, the voices it was trained on).

Other languages (VALL-E X): --language names the text's language, --prompt-language the
prompt's (both default to English; en, de, es, fr; all but English need the espeak-ng program):
an English recording can speak German with a model trained on both.

    python sample.py ... --language de --text "Guten Morgen." --prompt-text "Good morning."

Prompting modes (VALL-E §5):
  cross         (default) the prompt is another recording of the speaker; out.wav holds the
                new sentence only
  continuation  the prompt is the start of the utterance; out.wav holds prompt + continuation
Text of any length (--text, or --long-text-file story.txt) becomes one file: it is spoken in
chunks of whole sentences (long_text.generate_long; --long-mode fixed or rolling). Several
sentences at once: --text-file lines.txt (one per line) runs them as one batch and writes
out_1.wav, out_2.wav, ... Errors print one line and exit with status 2, writing nothing.

Best of N (VALL-E 2's five-time sampling; Llasa's verifiers): --candidates 5 --select paper
samples five candidates per sentence in one batch and keeps the best by speaker similarity and
word error rate (scorers.py); --select likelihood needs no extra model. --keep-all writes the
others beside it (out_c1.wav, ...) and their scores to out_scores.tsv.
"""
import argparse
import contextlib
import math
import os
import sys
import time

import torch

import valle
from extras import audio, batched, cli, codecs, languages, long_text, scorers, speedups

ROOT = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(ROOT, "models", "flite-small.pt")  # the model in the repository
VOICE = os.path.join(ROOT, "models", "voices", "slt.flac")  # its default voice; slt.txt says what it says
MIN_PROMPT_SECONDS = 1.0  # shorter prompts carry too little of the voice
MAX_PROMPT_SECONDS = 10.0  # longer ones are cropped: the paper prompts with 3 s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="what to speak: a sentence, or paragraphs; one output file")
    text.add_argument("--text-file", help="a file of sentences, one per line, run as a batch: "
                                          "one output file each")
    text.add_argument("--long-text-file", help="a text file of any length, spoken as one output file")
    p.add_argument("--long-mode", choices=["fixed", "rolling"], default="fixed",
                   help="long text: fixed prompts every chunk with --prompt (one batch, fast); "
                        "rolling prompts each chunk with the one before (smoother seams)")
    p.add_argument("--chunk-seconds", type=float,
                   help="long text: plan chunks of at most this much speech, e.g. the length of "
                        "the training utterances (default: what the model's tables allow)")
    p.add_argument("--prompt", default=VOICE,
                   help="voice prompt audio (WAV, FLAC, OGG; any rate; default: a bundled voice)")
    p.add_argument("--prompt-text", help="transcript of the prompt (default: the .txt file of the "
                                         "same name beside it, as the bundled voices have)")
    p.add_argument("--language", default="en",
                   help=f"the text's language: {', '.join(valle.LANGUAGES)}")
    p.add_argument("--prompt-language", default="en",
                   help="the language the prompt speaks (and its transcript is in)")
    p.add_argument("--out", default="out.wav", help="output WAV (24 kHz)")
    p.add_argument("--checkpoint", default=SHIPPED, help="from train.py (default: the shipped model)")
    p.add_argument("--mode", choices=["cross", "continuation"], default="cross",
                   help="cross: out.wav holds the new text only; continuation: prompt + text")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same audio")
    p.add_argument("--temperature", type=float, default=valle.Sampling.temperature,
                   help="divides the logits")
    p.add_argument("--top-p", type=float, default=valle.Sampling.top_p,
                   help="nucleus; 0 = greedy (with RAS)")
    p.add_argument("--top-k", type=int, default=valle.Sampling.top_k, help="0 = off")
    p.add_argument("--ras-window", type=int, default=valle.Sampling.ras_window,
                   help="RAS: previous codes looked at (K)")
    p.add_argument("--ras-threshold", type=float, default=valle.Sampling.ras_threshold,
                   help="RAS: redraw when the repetition ratio reaches this (t_r)")
    p.add_argument("--no-ras", action="store_true", help="plain nucleus sampling")
    p.add_argument("--candidates", type=int, default=1,
                   help="samples per sentence, in one batch, written as _c1, _c2, ...")
    p.add_argument("--select", choices=scorers.SCORES + ("paper",),
                   help="keep the best candidate per sentence: likelihood (the model's own, "
                        "offline), wer (ASR), similarity (speaker encoder), paper (Eq. 23: SIM "
                        "up to 0.3, then WER; 0.3 suits WavLM, resemblyzer always reaches it)")
    p.add_argument("--keep-all", action="store_true",
                   help="with --select: also write the other candidates, and all scores to "
                        "<out>_scores.tsv")
    p.add_argument("--asr", default="whisper",
                   help="for --select wer/paper and --transcribe: whisper (tiny.en, offline) or "
                        "whisper:<model> (any faster-whisper model, downloaded)")
    p.add_argument("--transcribe", action="store_true",
                   help="print what the ASR (--asr) hears in each file written (needs the "
                        "optional scorers, requirements-eval.txt)")
    p.add_argument("--speaker-encoder", default="resemblyzer", choices=scorers.SPEAKER_ENCODERS,
                   help="for --select similarity/paper: resemblyzer (offline) or wavlm")
    p.add_argument("--max-new-seconds", type=float,
                   help="stop each sentence (long text: each chunk) at this length and keep what "
                        "came (default: the model's tables; a long-text chunk that reaches them "
                        "is split and spoken again)")
    p.add_argument("--max-batch", type=int, default=batched.MAX_BATCH,
                   help="rows decoded at once (sentences x candidates, or long-text chunks x "
                        "candidates); the paper's size takes about 0.25 GB a row in bf16")
    p.add_argument("--encodec-checkpoint", help="local encodec_24khz-d7cc33bc.th (offline use)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the AR decode step, a CUDA graph on a GPU (slower on a CPU)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 matrix products for inference (norms, residual stream and "
                        "logits stay fp32; default: on with CUDA, off on the CPU)")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights for the transformers' linear layers, on a CPU: faster AR "
                        "steps, and a faster NAR where the CPU has int8 dot products (VNNI); "
                        "not with CUDA, --bf16 or --compile")
    args = p.parse_args(argv)
    if args.prompt_text is None:  # a bundled voice, or a corpus recording: its transcript beside it
        transcript = os.path.splitext(args.prompt)[0] + ".txt"
        if not os.path.isfile(transcript):
            raise ValueError(f"--prompt-text is needed: say what {args.prompt} says (or put it in "
                             f"{os.path.basename(transcript)} beside it)")
        with open(transcript, encoding="utf-8") as f:
            args.prompt_text = f.read().strip()
    for flag, code in (("--language", args.language), ("--prompt-language", args.prompt_language)):
        try:
            valle.check_language(code)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    try:  # valle.Sampling checks its own values; its errors name the flags here
        args.sampling = valle.Sampling(temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p, ras_window=args.ras_window,
                                       ras_threshold=args.ras_threshold, ras=not args.no_ras)
    except ValueError as e:
        name = str(e).split()[0]
        raise ValueError(f"--{name.replace('_', '-')}{str(e)[len(name):]}") from None
    checks = [
        ("--candidates", args.candidates, args.candidates >= 1, "must be at least 1"),
        ("--max-batch", args.max_batch, args.max_batch >= 1, "must be at least 1"),
        ("--max-new-seconds", args.max_new_seconds,
         args.max_new_seconds is None or args.max_new_seconds > 0,
         "must be positive"),
        ("--chunk-seconds", args.chunk_seconds, args.chunk_seconds is None or args.chunk_seconds > 0,
         "must be positive"),
    ]
    for flag, value, ok, rule in checks:
        if not ok or (value is not None and not math.isfinite(value)):
            raise ValueError(f"{flag} {rule}, not {value}")
    if args.select in ("wer", "paper") and args.language != "en":
        raise ValueError(f"--select {args.select} transcribes English only: for --language "
                         f"{args.language} choose likelihood or similarity")
    if args.select and args.candidates < 2:
        raise ValueError("--select chooses among candidates: give --candidates 2 or more")
    scorers.check_asr(args.asr)
    for flag, on in (("--bf16", args.bf16), ("--compile", args.compile)):
        if args.int8 and on:
            raise ValueError(f"--int8 and {flag} do not go together: choose one")
    if args.keep_all and not args.select:
        raise ValueError("--keep-all goes with --select (without it every candidate is written)")
    return args


def output_paths(out, n_texts, n_candidates):
    stem, ext = os.path.splitext(out)
    names = []
    for i in range(n_texts):
        for c in range(n_candidates):
            name = stem + (f"_{i + 1}" if n_texts > 1 else "") + (f"_c{c + 1}" if n_candidates > 1 else "")
            names.append(name + ext)
    return names  # text-major: [(text 1, cand 1), (text 1, cand 2), ...]


def read_texts(args):
    """What to speak: [--text], the non-empty lines of --text-file, or [--long-text-file]."""
    if args.text is not None:
        return [args.text]
    path = args.text_file or args.long_text_file
    if not os.path.isfile(path):
        raise ValueError(f"no such text file: {path}")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    texts = [line.strip() for line in content.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts if args.text_file else [content.strip()]  # blank lines part paragraphs


def check_inputs(args, texts):
    """The texts can be pronounced and --out can be written."""
    for t, language in [(t, args.language) for t in texts] + [(args.prompt_text, args.prompt_language)]:
        ids = valle.text_to_ids(t, language)  # ValueError for empty or unpronounceable text
        if languages.count_unknown(ids):
            print(f"warning: {languages.count_unknown(ids)} symbol(s) of {t[:40]!r} are not in the "
                  "phone table and read as <unk>", file=sys.stderr)
    if not args.out.lower().endswith(".wav"):
        raise ValueError(f"--out must name a .wav file, not {args.out}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write to {folder}: create it or choose another --out")


def load_prompt(path):
    """The voice prompt -> (n,) waveform at 24 kHz: not silent, trimmed of leading and trailing
    silence, at least MIN_PROMPT_SECONDS long, cropped to MAX_PROMPT_SECONDS."""
    wav = audio.load_audio(path)
    if wav.abs().max() < audio.SILENCE_PEAK:
        raise ValueError(f"the prompt {path} is silent: record some speech")
    wav = audio.trim_silence(wav)  # leading and trailing silence
    seconds = len(wav) / valle.SAMPLE_RATE
    if seconds < MIN_PROMPT_SECONDS:
        raise ValueError(f"the prompt holds {seconds:.2f} s of sound: give at least "
                         f"{MIN_PROMPT_SECONDS} s of speech")
    if seconds > MAX_PROMPT_SECONDS:
        print(f"warning: prompt cropped to its first {MAX_PROMPT_SECONDS:.0f} s; "
              "--prompt-text should say only what is spoken there", file=sys.stderr)
        wav = wav[: int(MAX_PROMPT_SECONDS * valle.SAMPLE_RATE)]
    return wav


def run(args):
    device = cli.pick_device(args.device)
    if args.int8 and device.type != "cpu":
        raise ValueError(f"--int8 runs on the CPU only: on {device.type} use --bf16")
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda"
    # Everything that can be wrong with the input, before any work is done.
    texts = read_texts(args)
    check_inputs(args, texts)
    prompt_wav = load_prompt(args.prompt)
    # The verifiers load before any work: a missing extra stops the run here, writing nothing.
    needs = scorers.needed(args.select) if args.select else ()
    asr = scorers.ASR(args.asr) if "wer" in needs or args.transcribe else None
    encoder = scorers.SpeakerEncoder(args.speaker_encoder) if "similarity" in needs else None
    ar, nar, ckpt = cli.load_for_inference(args.checkpoint, device, bf16, args.int8)
    if args.int8:
        from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
        n = sum(isinstance(m, Int8Linear) for model in (ar, nar) for m in model.modules())
        print(f"int8 weights: {n} linear layers", file=sys.stderr)
    codec = codecs.load(ckpt["codec"], args.encodec_checkpoint, ckpt.get("codec_state"))
    if not codec.speaks:
        print(f"note: this checkpoint was trained on codes of a test codec ({ckpt['codec']}; the "
              "pretrained EnCodec was not available): the output is noise with the right timing, "
              "not speech. Speech offline: the mel codec, as the shipped model has (docs/model.md)",
              file=sys.stderr)
    prompt_codes = codec.encode(prompt_wav).to(device)  # (8, Tp)
    sampling = args.sampling

    last_print = [0.0]

    def progress(*where):  # at most twice a second: ([chunks,] step, total)
        if time.time() - last_print[0] > 0.5:
            last_print[0] = time.time()
            chunks = f"{where[0]}: " if len(where) == 3 else ""
            print(f"AR decoding: {chunks}group {where[-2]} of at most {where[-1]}", file=sys.stderr,
                  flush=True)

    start = time.time()
    N = args.candidates
    cache_class = speedups.FixedShapeCache if args.compile else valle.KVCache
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # codecs stay fp32
    if args.text_file:  # sentences, one output each, all candidates of all in --max-batch rows
        rows = [t for t in texts for _ in range(N)]  # text-major; candidate c: seed + c * stride
        seeds = [args.seed + batched.SEED_STRIDE * c for _ in texts for c in range(N)]
        with autocast:
            codes, ended = batched.generate(ar, nar, rows, prompt_codes, args.prompt_text, sampling,
                                          seed=seeds, max_seconds=args.max_new_seconds,
                                          progress=progress, cache_class=cache_class,
                                          language=args.language,
                                          prompt_language=args.prompt_language,
                                          max_batch=args.max_batch)
        outputs = [([t], [c], [e], [None]) for t, c, e in zip(rows, codes, ended)]
    else:  # one text of any length, spoken chunk after chunk; candidate c: the stream `generate` gives it
        with autocast:
            outputs = long_text.generate_long(
                ar, nar, texts[0], prompt_codes, args.prompt_text, args.long_mode, sampling,
                args.seed, args.max_new_seconds, progress=progress, cache_class=cache_class,
                chunk_seconds=args.chunk_seconds, candidates=N, language=args.language,
                prompt_language=args.prompt_language, max_batch=args.max_batch,
                log=lambda line: print(line, file=sys.stderr, flush=True))
    waves = [decode(codec, output[1], prompt_codes, args.mode) for output in outputs]
    wall = time.time() - start

    # (path, wave) to write; with --select, the kept candidate of each sentence gets the plain
    # name and, with --keep-all, the others their _c names.
    n_texts = len(outputs) // N
    kept_paths, all_paths = output_paths(args.out, n_texts, 1), output_paths(args.out, n_texts, N)
    if args.select:
        rows, files, scoring = [], [], time.time()
        for i in range(n_texts):
            group = range(i * N, (i + 1) * N)
            reference = (args.prompt_text + " " if args.mode == "continuation" else "") + texts[i]
            scores = score([outputs[k] for k in group], [waves[k] for k in group], needs, ar,
                           prompt_codes, prompt_wav, args.prompt_text, reference, asr, encoder,
                           (args.language, args.prompt_language), autocast)
            frames = [sum(c.shape[1] for c in outputs[k][1]) for k in group]  # new speech only
            least = scorers.MIN_FRAMES_PER_PHONE * len(valle.text_to_ids(texts[i], args.language))
            plausible = [f >= least for f in frames]
            kept = scorers.best(scores, args.select, plausible)
            for c in range(N):
                line = "  ".join(f"{name} {scores[name][c]:.4f}" for name in needs)
                line += "" if plausible[c] else f"  too short ({frames[c]} frames)"
                print(f"sentence {i + 1} candidate {c + 1}: {line}" + ("  <- kept" if c == kept else ""))
                path = kept_paths[i] if c == kept else all_paths[i * N + c]
                if c == kept or args.keep_all:
                    files.append((path, i * N + c))
                written = (c == kept or args.keep_all) and waves[i * N + c] is not None
                rows.append([str(i + 1), str(c + 1), str(int(c == kept))] +
                            [f"{scores[name][c]:.6f}" for name in needs] +
                            [os.path.basename(path) if written else ""])
        print(f"scored {len(outputs)} candidates ({', '.join(needs)}) in {time.time() - scoring:.2f} s")
    else:
        files = list(zip(all_paths, range(len(outputs))))

    audio_seconds, written = 0.0, 0
    for path, k in files:
        wav = waves[k]
        if wav is None:
            print(f"warning: the model produced no speech for {path}; not written", file=sys.stderr)
            continue
        warn_if_short(path, *outputs[k][:3], args.language)
        audio.write_wav(path, wav)
        audio_seconds += len(wav) / valle.SAMPLE_RATE
        written += 1
        print(f"wrote {path}: {len(wav) / valle.SAMPLE_RATE:.2f} s")
        if args.transcribe:
            print(f"  {asr.name} hears: {asr.transcribe(wav, valle.SAMPLE_RATE)!r}")
    if not written:
        raise ValueError("the model produced no speech for any sentence (it ended at once): "
                         "try another --seed, a higher --top-p, or a longer prompt")
    if args.keep_all:
        path = os.path.splitext(args.out)[0] + "_scores.tsv"
        with cli.atomic(path) as f:
            f.write("\t".join(["sentence", "candidate", "kept", *needs, "file"]) + "\n")
            f.writelines("\t".join(r) + "\n" for r in rows)
        print(f"wrote {path}")
    print(f"{audio_seconds:.2f} s of audio in {wall:.2f} s on {device}: real-time factor "
          f"{wall / max(audio_seconds, 1e-9):.3f} (wall / audio; below 1 is faster than real time)")


def warn_if_short(path, texts, codes, ended, language):
    """A warning for each chunk of an output whose speech is far shorter than its text: under
    scorers.MIN_FRAMES_PER_PHONE frames per phone (read speech takes about 5.4) when the model
    drew <eos>, which a weak model does early, dropping words. A chunk cut off at --max-new-seconds
    was cut on request."""
    for k, (text, c, e) in enumerate(zip(texts, codes, ended)):
        phones = len(valle.text_to_ids(text, language))
        if e and c.shape[1] < scorers.MIN_FRAMES_PER_PHONE * phones:
            where = f", chunk {k + 1} of {len(texts)}" if len(texts) > 1 else ""
            print(f"warning: {path}{where} ({long_text.first_words(text)}): {c.shape[1] / valle.FRAME_RATE:.2f} s "
                  f"of speech for {phones} phones ({c.shape[1] / phones:.2f} frames a phone, where "
                  "read speech takes about 5.4): the model ended early and words are likely "
                  "missing", file=sys.stderr)


def decode(codec, chunks, prompt_codes, mode):
    """One output's chunk codes -> its waveform, or None if the model said nothing."""
    if all(c.shape[1] == 0 for c in chunks):  # <eos> at once: no speech, no file
        return None
    if mode == "continuation":
        chunks = [torch.cat([prompt_codes, chunks[0]], dim=1)] + chunks[1:]
    # a chunk that said <eos> at once has nothing to decode (EnCodec rejects 0 frames)
    decoded = [codec.decode(c.cpu()) for c in chunks if c.shape[1] > 0]
    return long_text.join_speech(decoded) if decoded else None


def score(candidates, waves, needs, ar, prompt_codes, prompt_wav, prompt_text, reference,
          asr=None, encoder=None, languages=("en", "en"), autocast=contextlib.nullcontext()):
    """The candidates of one sentence, each its chunks (texts, codes, ended, prompted by) as
    long_text.generate_long gives them, and their waveforms -> {score name: one value per
    candidate}. A candidate without speech scores the worst there is. The model's likelihood
    runs under `autocast` (--bf16), the verifiers as they are."""
    scores = {name: [] for name in needs}
    voice = encoder.embed(prompt_wav, valle.SAMPLE_RATE) if encoder else None
    for chunks, wav in zip(candidates, waves):
        if "likelihood" in needs:
            with autocast:
                scores["likelihood"].append(scorers.chunks_likelihood(ar, *chunks, prompt_codes, prompt_text,
                                                       *languages) if wav is not None else float("-inf"))
        if "wer" in needs:
            scores["wer"].append(scorers.wer(asr, wav, valle.SAMPLE_RATE, reference)
                                 if wav is not None else float("inf"))
        if "similarity" in needs:
            scores["similarity"].append(scorers.similarity(encoder, wav, valle.SAMPLE_RATE, voice)
                                        if wav is not None else float("-inf"))
    return scores


# Errors print one line and exit with status 2, writing nothing.
main = cli.entry(lambda argv: run(parse_args(argv)))


if __name__ == "__main__":
    main()
