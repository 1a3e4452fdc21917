"""
Measure a trained model as VALL-E 2 does (§4.1.2-4.1.3): word error rate, speaker similarity and
duration of what it says, prompted two ways, on a list of real utterances.

    python eval.py --checkpoint runs/paper/best.pt --layout librispeech --src LibriSpeech/test-clean
    python eval.py --checkpoint runs/demo/best.pt --layout folder --src data/demo \
        --prompt-seconds 1.5 --per-speaker 5 --out runs/demo/eval

Prompting modes (--modes, both by default), each speaker's utterances in sorted (official) order:
  continuation  the first --prompt-seconds (3) of utterance i are the prompt, its whole transcript
                is the text; the output is prompt + continuation and is scored whole
  cross         utterance i is spoken with utterance i-1 of its speaker as prompt (the first with
                the last); the output is the new speech only
Scores per mode: WER, an ASR transcript of the outputs against the transcripts (corpus level);
SIM, the cosine of speaker embeddings of output and prompt (mean); the duration ratio, output
seconds over the real recording's (mean). The real recordings, scored the same way, make the
ground-truth row; the paper's figures are printed below them.

Inputs: every layout of data/prepare.py. --layout librispeech reads LibriSpeech's own folders
(speaker/chapter/*.flac and the chapter's *.trans.txt) and keeps utterances of 4-10 s, the
paper's test set; the other layouts are unfiltered unless --min-seconds or --max-seconds is
given. --limit and --per-speaker make quick runs. --real-c0 adds a row: the NAR's codebooks over each recording's
real codebook 0, which tells whether the AR or the NAR limits the WER. --out DIR writes the outputs (DIR/<mode>/<utterance>.wav) and
DIR/scores.tsv, one row per utterance and mode.

Token space: codebook-0 edit distance between the model's codes and the real codes of the same
sentence (continuation: after the prompt), over the real codes' length, beside a baseline: the
real codes of another sentence of the speaker against the same reference. A model that learned
something lands below the baseline. The text gaps say whether the models read their text: the
mean log-probability per code of the real codes, teacher-forced, with their own text minus with
the other sentence's text (AR: codebook 0; NAR: codebooks 1-7). With a test codec, whose decoder
turns codes into noise, these are the only figures of the model that mean anything; --tokens-only
computes just them (no decoding, ASR or speaker encoder), in seconds.

The scorers (scorers.py): --asr whisper (tiny.en) and --speaker-encoder resemblyzer run offline;
whisper:<model> and wavlm download their weights on first use. The paper used a Conformer-Transducer ASR
and WavLM-TDNN, so compare a model with the ground-truth row of the same run, not with the paper.
Errors print one line and exit with status 2 before anything is written.
"""
import argparse
import math
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import numpy as np
import torch

import valle
from extras import audio, batched, cli, codecs, scorers
from data import prepare  # its layouts, their languages and its listing

MODES = ("continuation", "cross")
LIBRISPEECH_SECONDS = (4.0, 10.0)  # the paper's test set: test-clean utterances of 4-10 s
MIN_CONTINUATION_SECONDS = 0.5  # continuation: an utterance needs this much speech after its prompt
HOP = valle.SAMPLE_RATE // valle.FRAME_RATE  # samples per codec frame (320)
NO_SPEECH_SIM = 0.0  # SIM of an output without a single frame: no voice, no similarity

# VALL-E 2's results on LibriSpeech test-clean 4-10 s, single sampling: (SIM, WER %) per mode.
# SIM by WavLM-TDNN, WER by a Conformer-Transducer ASR: other scorers give other numbers.
PAPER = {
    "ground truth": {"continuation": (0.905, 1.6), "cross": (0.779, 1.6)},
    "VALL-E (re-trained)": {"continuation": (0.773, 2.3), "cross": (0.633, 3.1)},
    "VALL-E 2, G=1": {"continuation": (0.782, 1.6), "cross": (0.643, 1.5)},
    "VALL-E 2, G=2": {"continuation": (0.777, 1.5), "cross": (0.635, 1.5)},
    "VALL-E 2, G=4": {"continuation": (0.773, 1.8), "cross": (0.615, 2.2)},
    "VALL-E 2, G=8": {"continuation": (0.766, 2.5), "cross": (0.566, 4.2)},
}


# -----------------------------------------------------------------------------
# Utterances: a corpus's (id, audio path, text, speaker), in order


LAYOUTS = prepare.LAYOUTS  # librispeech among them: one reader for prepare.py and eval.py


def audio_seconds(path):
    import soundfile as sf
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such audio file: {path}")
    try:
        return sf.info(path).duration
    except Exception as e:
        raise ValueError(f"cannot read {path} as audio ({e})") from None


def select(items, per_speaker=None, limit=None):
    """The first `per_speaker` utterances of each speaker, then the first `limit` of those."""
    seen, kept = Counter(), []
    for item in items:
        seen[item[3]] += 1
        if per_speaker is None or seen[item[3]] <= per_speaker:
            kept.append(item)
    return kept[:limit]


def along_speaker(speakers, step):
    """For each utterance, the index of the one `step` places along its speaker's list, cyclically:
    step -1 is the cross-utterance prompt (utterance i-1, the first with the last), step +1 the
    token-space baseline (another sentence in the same voice)."""
    places = defaultdict(list)
    for i, s in enumerate(speakers):
        places[s].append(i)
    other = [0] * len(speakers)
    for indices in places.values():
        for k, i in enumerate(indices):
            other[i] = indices[(k + step) % len(indices)]
    return other


@dataclass
class Utterance:
    id: str
    text: str
    speaker: str
    wav: torch.Tensor  # (n,) at 24 kHz, leading and trailing silence trimmed
    codes: torch.Tensor  # (8, ceil(n / 320)) its EnCodec codes, on the CPU
    language: str = "en"  # valle.LANGUAGES

    @property
    def seconds(self):
        return len(self.wav) / valle.SAMPLE_RATE


def list_utterances(args):
    """--src in --layout -> sorted (id, audio path, text, speaker, language), filtered by
    duration, then --per-speaker and --limit. Raises ValueError for bad input."""
    items = prepare.list_items(args.src, args.layout, args.language, LAYOUTS)
    low, high = duration_range(args)
    if (low, high) != (0.0, math.inf):
        kept = [item for item in items if low <= audio_seconds(item[1]) <= high]
        if not kept:
            raise ValueError(f"none of the {len(items)} utterances in {args.src} lasts {low:g}-"
                             f"{high:g} s: --min-seconds and --max-seconds set the range")
        items = kept
    items = select(items, args.per_speaker, args.limit)
    for utt, _, text, _, language in items:
        try:
            valle.check_language(language)
            valle.text_to_ids(text, language)
        except ValueError as e:
            raise ValueError(f"utterance {utt}: {e}") from None
    return items


def duration_range(args):
    """(min, max) seconds: --min-seconds/--max-seconds, else 4-10 s for LibriSpeech (the paper's
    filter) and no filter for the other layouts."""
    low, high = LIBRISPEECH_SECONDS if args.layout == "librispeech" else (0.0, math.inf)
    return (args.min_seconds if args.min_seconds is not None else low,
            args.max_seconds if args.max_seconds is not None else high)


def load_utterances(items, codec, min_seconds, cfg):
    """Read, trim and encode each item -> ([Utterance], notes). Utterances of min_seconds or less
    (after trimming) are dropped, and those longer than half the model's position tables (cfg):
    a prompt and a text of two of them must fit together. Then speakers left with one utterance
    (who would be their own cross-utterance prompt)."""
    utts, notes, too_long = [], [], 0
    for utt, path, text, speaker, language in items:
        wav = audio.trim_silence(audio.load_audio(path))  # as sample.py trims a prompt
        if len(wav) / valle.SAMPLE_RATE <= min_seconds:
            continue
        u = Utterance(utt, text, speaker, wav, codec.encode(wav), language)
        if (u.codes.shape[1] > cfg.max_frames // 2
                or len(valle.text_to_ids(text, language)) > (cfg.max_text_tokens - 1) // 2):
            too_long += 1
            continue
        utts.append(u)
    if len(utts) + too_long < len(items):
        notes.append(f"{len(items) - len(utts) - too_long} utterances left out: {min_seconds:g} s "
                     "or less after trimming silence (continuation: --prompt-seconds + "
                     f"{MIN_CONTINUATION_SECONDS} s)")
    if too_long:
        notes.append(f"{too_long} utterances left out: longer than half the model's tables "
                     f"({cfg.max_frames // 2} frames, {(cfg.max_text_tokens - 1) // 2} phones)")
    count = Counter(u.speaker for u in utts)
    alone = [u for u in utts if count[u.speaker] < 2]
    if alone:
        notes.append(f"{len(alone)} speakers with one utterance left out ({alone[0].speaker}, ...): "
                     "cross needs another one as prompt")
        utts = [u for u in utts if count[u.speaker] >= 2]
    if not utts:
        raise ValueError(f"nothing left to evaluate ({'; '.join(notes)})")
    return utts, notes


# -----------------------------------------------------------------------------
# Token space: codebook-0 codes against the real ones (what means something with any codec)


def codebook0(codes):
    """(8, T) codes, or (T,) codebook-0 codes -> a list of ints."""
    codes = torch.as_tensor(codes)
    return (codes[0] if codes.dim() == 2 else codes).tolist()


def code_edits(codes, reference):
    """Levenshtein distance between two codebook-0 sequences: codes inserted, deleted, replaced.
    Plain numpy, so that --tokens-only runs on the core install: one row of the edit table at a
    time, its insertions along the row as a running minimum."""
    a, b = codebook0(codes), np.array(codebook0(reference))
    along = np.arange(len(b) + 1)
    row = along  # edits from nothing of `a` to each prefix of b
    for i, code in enumerate(a, 1):
        # without an insertion in this row: a deletion (from above) or a match or replacement
        # (diagonal); then row[j] = min over k <= j of no_insert[k] + (j - k) insertions
        no_insert = np.concatenate([[i], np.minimum(row[1:] + 1, row[:-1] + (b != code))])
        row = np.minimum.accumulate(no_insert - along) + along
    return int(row[-1])


def code_edit_distance(codes, reference):
    """Codebook-0 edit distance over the reference's length: a WER over codes. 0 for identical
    codes, 1 for as many codes all wrong, above 1 for codes much longer than the reference."""
    return code_edits(codes, reference) / max(len(codebook0(reference)), 1)


def code_error_rate(pairs):
    """[(codes, reference)] -> total edits over total reference codes: corpus level, like WER."""
    pairs = list(pairs)
    edits = sum(code_edits(c, r) for c, r in pairs)
    return edits / max(sum(len(codebook0(r)) for _, r in pairs), 1)


def token_references(mode, u, other, prompt_frames):
    """What the model's new codes for utterance u are compared with -> (reference, baseline):
    u's real codes, and the real codes of `other`, another sentence in u's voice, which the
    baseline compares with the same reference. Continuation compares only what comes after the
    prompt: the model copies the prompt's codes, it does not write them."""
    skip = prompt_frames if mode == "continuation" else 0
    return u.codes[:, skip:], other.codes[:, skip:]


def text_gaps(ar, nar, text, other_text, prompt_codes, prompt_text, reference,
              languages=("en", "en", "en")):
    """How much the models read their text: the mean log-probability per code of the real codes
    (`reference`, (8, T)) with their own text, minus with another sentence's text, from
    teacher-forced passes (AR: codebook 0 and <eos>; NAR: codebooks 1-7). About 0 for a model
    that has learned the voice but not the words; large for one that reads what it says.
    languages: of the text, of the other text, of the prompt."""
    (own, other), prompt_language = languages[:2], languages[2]
    ar_own, ar_other = (scorers.likelihood(ar, [t], prompt_codes, prompt_text, [reference],
                                         language=lang, prompt_language=prompt_language)[0]
                        for t, lang in ((text, own), (other_text, other)))
    nar_own = scorers.nar_likelihood(nar, text, prompt_codes, prompt_text, reference, own, prompt_language)
    nar_other = scorers.nar_likelihood(nar, other_text, prompt_codes, prompt_text, reference, other,
                               prompt_language)
    return ar_own - ar_other, nar_own - nar_other


# -----------------------------------------------------------------------------
# Evaluation


def prompt_of(mode, u, previous, prompt_frames):
    """Utterance u's prompt in `mode` -> (codes (8, Tp), transcript or None, waveform, its id,
    its language). Continuation: u's own first prompt_frames, with no transcript (the text, u's
    whole transcript, already says it: valle.prompted_text); cross: `previous`, its speaker's
    utterance before it (in a corpus of several languages, it may speak another one)."""
    if mode == "continuation":  # the recording's start after its leading silence is trimmed
        return u.codes[:, :prompt_frames], None, u.wav[: prompt_frames * HOP], u.id, u.language
    return previous.codes, previous.text, previous.wav, previous.id, previous.language


def evaluate_mode(mode, utts, ar, nar, codec, asr, encoder, sampling, P, args, bf16=False):
    """Speak every utterance in `mode` (P: continuation's prompt frames), score it, write it to
    --out -> one dict per utterance. bf16: the models run under bf16 autocast (fp32 weights)."""
    device = next(ar.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    speakers = [u.speaker for u in utts]
    previous, other = along_speaker(speakers, -1), along_speaker(speakers, +1)  # prompt, baseline
    rows = []
    for i, u in enumerate(utts):
        prompt_codes, prompt_text, prompt_wav, prompt_id, prompt_language = prompt_of(
            mode, u, utts[previous[i]], P)
        start = time.time()
        with autocast:
            [new], [ended] = batched.generate(ar, nar, [u.text], prompt_codes.to(device), prompt_text,
                                           sampling, seed=args.seed + i,
                                           max_seconds=args.max_new_seconds,
                                           language=u.language, prompt_language=prompt_language)
        new = new.cpu()  # (8, T)
        out = torch.cat([prompt_codes, new], dim=1) if mode == "continuation" else new
        wav = codec.decode(out) if out.shape[1] and not args.tokens_only else None  # EnCodec rejects 0 frames
        seconds = time.time() - start
        if args.tokens_only:
            hyp, sim = "", NO_SPEECH_SIM
        elif wav is None:
            hyp, sim = "", NO_SPEECH_SIM
        else:
            hyp = asr.transcribe(wav, valle.SAMPLE_RATE)
            voice = encoder.embed(prompt_wav, valle.SAMPLE_RATE)
            sim = scorers.similarity(encoder, wav, valle.SAMPLE_RATE, voice)
        if args.out and wav is not None:
            path = os.path.join(args.out, mode, u.id + ".wav")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            audio.write_wav(path, wav)
        reference, baseline = token_references(mode, u, utts[other[i]], P)
        with autocast:
            ar_gap, nar_gap = text_gaps(ar, nar, u.text, utts[other[i]].text,
                                        prompt_codes.to(device), prompt_text, reference,
                                        (u.language, utts[other[i]].language, prompt_language))
        rows.append(dict(mode=mode, index=i, utterance=u.id, speaker=u.speaker, prompt=prompt_id,
                         seconds=u.seconds, output_seconds=out.shape[1] / valle.FRAME_RATE,
                         generate_seconds=seconds, ended=ended, sim=sim, hypothesis=hyp, text=u.text,
                         codes=new, reference=reference, baseline=baseline, ar_gap=ar_gap,
                         nar_gap=nar_gap))
        print(f"{mode} {i + 1}/{len(utts)} {u.id}: {rows[-1]['output_seconds']:.2f} s "
              f"(recording {u.seconds:.2f} s) in {seconds:.2f} s", file=sys.stderr, flush=True)
    return rows


@torch.inference_mode()
def score_nar_on_real(mode, utts, nar, codec, asr, encoder, P):
    """--real-c0: the NAR's codebooks 1-7 over each recording's real codebook 0, decoded and
    scored as the model's output is -> (SIM, WER). Near the resynthesis row: the NAR is not what
    limits the model, its AR (codebook 0) is; far above it: the NAR is."""
    device = next(nar.parameters()).device
    previous = along_speaker([u.speaker for u in utts], -1)
    texts, hyps, sims = [], [], []
    for i, u in enumerate(utts):
        prompt_codes, prompt_text, prompt_wav, _, prompt_language = prompt_of(
            mode, u, utts[previous[i]], P)
        c0 = u.codes[0, P:] if mode == "continuation" else u.codes[0]
        text, text_valid = valle.prompted_text(nar.cfg, [valle.text_to_ids(u.text, u.language)],
                                               prompt_text, device, prompt_language)
        [new] = valle.generate_nar(nar, text, text_valid, prompt_codes.to(device), [c0.to(device)])
        new = new.cpu()
        wav = codec.decode(torch.cat([prompt_codes, new], dim=1) if mode == "continuation" else new)
        texts.append(u.text)
        hyps.append(asr.transcribe(wav, valle.SAMPLE_RATE))
        sims.append(scorers.similarity(encoder, wav, valle.SAMPLE_RATE,
                                       encoder.embed(prompt_wav, valle.SAMPLE_RATE)))
    return sum(sims) / len(sims), scorers.word_error_rate(texts, hyps)


def score_recordings(utts, asr, encoder, prompt_frames):
    """The ground truth, scored as the model is -> ({mode: (SIM, WER)}, ASR transcripts,
    {mode: SIM per utterance}). Continuation: each recording against its first prompt_frames;
    cross: against its speaker's previous recording; one WER for both (the same recordings)."""
    sr = valle.SAMPLE_RATE
    hyps = [asr.transcribe(u.wav, sr) for u in utts]
    whole = [encoder.embed(u.wav, sr) for u in utts]
    previous = along_speaker([u.speaker for u in utts], -1)
    per_mode = {
        "continuation": [scorers.similarity(encoder, u.wav[: prompt_frames * HOP], sr, e)
                         for u, e in zip(utts, whole)],
        "cross": [float(whole[i] @ whole[previous[i]]) for i in range(len(utts))],
    }
    wer = scorers.word_error_rate([u.text for u in utts], hyps)
    return {mode: (sum(s) / len(s), wer) for mode, s in per_mode.items()}, hyps, per_mode


def summarize(rows, tokens_only=False):
    """Per-utterance rows of one mode -> its figures (tokens_only: no WER, nothing was heard)."""
    n = len(rows)
    return dict(
        sim=sum(r["sim"] for r in rows) / n,
        wer=None if tokens_only else scorers.word_error_rate([r["text"] for r in rows],
                                                             [r["hypothesis"] for r in rows]),
        duration=sum(r["output_seconds"] / r["seconds"] for r in rows) / n,
        c0_edit=code_error_rate((r["codes"], r["reference"]) for r in rows),
        baseline=code_error_rate((r["baseline"], r["reference"]) for r in rows),
        ar_gap=sum(r["ar_gap"] for r in rows) / n,
        nar_gap=sum(r["nar_gap"] for r in rows) / n,
        no_speech=sum(r["output_seconds"] == 0 for r in rows),
        cut=sum(not r["ended"] for r in rows))


def print_table(modes, recordings, results, group_size, untrained, resynthesis=None,
                real_c0=None):
    """One row per mode for the recordings, this model and the paper (and, with --real-c0, for
    the NAR over the real codebook 0)."""
    def cell(value, spec, width, mark=""):
        return (format(value, spec) + mark if value is not None else "-").rjust(width)

    noise = "*" if untrained else ""
    paper = ["ground truth", f"VALL-E 2, G={group_size}"] if group_size in (1, 2, 4, 8) else ["ground truth"]
    print(f"{'mode':<13} {'system':<26} {'SIM':>7} {'WER %':>7} {'duration':>8} {'c0 edit':>8} "
          f"{'baseline':>8}")
    for mode in modes:
        sim, wer = recordings[mode]
        table = [("recordings (ground truth)", sim, wer * 100, None, None, None, "")]
        if resynthesis:
            table.append(("codec resynthesis", resynthesis[mode][0], resynthesis[mode][1] * 100,
                          None, None, None, ""))
        s = results[mode]
        table.append((f"this model, G={group_size}", s["sim"], s["wer"] * 100, s["duration"],
                      s["c0_edit"], s["baseline"], noise))
        if real_c0:
            table.append(("NAR on the real codebook 0", real_c0[mode][0], real_c0[mode][1] * 100,
                          None, None, None, noise))
        table += [(f"paper: {name}", *PAPER[name][mode], None, None, None, "") for name in paper]
        for name, sim, wer, duration, c0, base, mark in table:
            print(f"{mode:<13} {name:<26} {cell(sim, '.3f', 7, mark)} {cell(wer, '.1f', 7, mark)} "
                  f"{cell(duration, '.2f', 8)} {cell(c0, '.3f', 8)} {cell(base, '.3f', 8)}")


def print_token_table(modes, results, group_size):
    """Token space only (--tokens-only): one row per mode."""
    print(f"{'mode':<13} {'system':<16} {'c0 edit':>8} {'baseline':>8} {'ratio':>6} {'duration':>8} "
          f"{'AR gap':>7} {'NAR gap':>7}")
    for mode in modes:
        s = results[mode]
        print(f"{mode:<13} {f'this model, G={group_size}':<16} {s['c0_edit']:8.3f} {s['baseline']:8.3f} "
              f"{s['c0_edit'] / max(s['baseline'], 1e-9):6.2f} {s['duration']:8.2f} "
              f"{s['ar_gap']:7.3f} {s['nar_gap']:7.3f}")


def write_token_scores(path, rows):
    """--tokens-only: one line per (mode, utterance), token-space figures."""
    columns = ["mode", "utterance", "speaker", "prompt", "seconds", "output_seconds",
               "duration_ratio", "c0_edit", "baseline", "ar_gap", "nar_gap", "text"]
    with cli.atomic(path) as f:
        f.write("\t".join(columns) + "\n")
        for r in rows:
            values = [r["mode"], r["utterance"], r["speaker"], r["prompt"], f"{r['seconds']:.3f}",
                      f"{r['output_seconds']:.3f}", f"{r['output_seconds'] / r['seconds']:.3f}",
                      f"{code_edit_distance(r['codes'], r['reference']):.4f}",
                      f"{code_edit_distance(r['baseline'], r['reference']):.4f}",
                      f"{r['ar_gap']:.4f}", f"{r['nar_gap']:.4f}", r["text"]]
            f.write("\t".join(str(v).replace("\t", " ") for v in values) + "\n")


def write_scores(path, rows, recording_hyps, recording_sims):
    """One line per (mode, utterance): the model's scores beside the recording's."""
    columns = ["mode", "utterance", "speaker", "prompt", "seconds", "output_seconds",
               "duration_ratio", "sim", "recording_sim", "wer", "recording_wer", "c0_edit",
               "baseline", "text", "hypothesis", "recording_hypothesis"]
    with cli.atomic(path) as f:
        f.write("\t".join(columns) + "\n")
        for r in rows:
            i = r["index"]
            values = [r["mode"], r["utterance"], r["speaker"], r["prompt"], f"{r['seconds']:.3f}",
                      f"{r['output_seconds']:.3f}", f"{r['output_seconds'] / r['seconds']:.3f}",
                      f"{r['sim']:.4f}", f"{recording_sims[r['mode']][i]:.4f}",
                      f"{scorers.word_error_rate(r['text'], r['hypothesis']):.4f}",
                      f"{scorers.word_error_rate(r['text'], recording_hyps[i]):.4f}",
                      f"{code_edit_distance(r['codes'], r['reference']):.4f}",
                      f"{code_edit_distance(r['baseline'], r['reference']):.4f}",
                      r["text"], r["hypothesis"], recording_hyps[i]]
            f.write("\t".join(str(v).replace("\t", " ") for v in values) + "\n")


# -----------------------------------------------------------------------------
# The script


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line like every other error here (argparse adds the usage)
        raise ValueError(message)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo/best.pt", help="from train.py")
    p.add_argument("--layout", required=True, choices=LAYOUTS,
                   help="a data/prepare.py layout; librispeech: LibriSpeech's "
                        "speaker/chapter/*.flac + *.trans.txt")
    p.add_argument("--src", required=True, help="corpus folder (or manifest file)")
    p.add_argument("--language", default="en",
                   help="the utterances' language, unless a manifest line gives its own "
                        "(path|text|speaker|language); ASR and WER read English only")
    p.add_argument("--modes", default=",".join(MODES), help="continuation, cross or both")
    p.add_argument("--prompt-seconds", type=float, default=3.0,
                   help="continuation: the prompt is this much of the utterance's start")
    p.add_argument("--min-seconds", type=float,
                   help="keep utterances at least this long (default: 4 for librispeech, else 0)")
    p.add_argument("--max-seconds", type=float,
                   help="keep utterances at most this long (default: 10 for librispeech, else none)")
    p.add_argument("--per-speaker", type=int, help="keep the first N utterances of each speaker")
    p.add_argument("--limit", type=int, help="then keep the first N utterances")
    p.add_argument("--asr", default="whisper",
                   help="whisper (tiny.en, offline from requirements-eval.txt) or whisper:<model> "
                        "(any faster-whisper model, downloaded)")
    p.add_argument("--speaker-encoder", default="resemblyzer", choices=scorers.SPEAKER_ENCODERS,
                   help="resemblyzer (offline) or wavlm")
    p.add_argument("--out", help="folder for the outputs (<mode>/<utterance>.wav) and scores.tsv")
    p.add_argument("--tokens-only", action="store_true",
                   help="token-space figures only: no decoding, ASR or speaker similarity (fast; "
                        "what means something with a test codec)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0, help="utterance i samples with seed + i")
    p.add_argument("--top-p", type=float, default=valle.Sampling.top_p,
                   help="nucleus; 0 = greedy (with RAS); the paper sweeps 0-0.8")
    p.add_argument("--no-ras", action="store_true", help="plain nucleus sampling")
    p.add_argument("--max-new-seconds", type=float,
                   help="stop each output's new speech at this length (default: the model's limits)")
    p.add_argument("--real-c0", action="store_true",
                   help="add a row: the NAR's codebooks 1-7 over each recording's real codebook 0 "
                        "(near the resynthesis row, the AR is what limits the model)")
    p.add_argument("--encodec-checkpoint", help="local encodec_24khz-d7cc33bc.th (offline use)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 matrix products for inference (norms, residual stream and "
                        "logits stay fp32; default: on with CUDA, off on the CPU)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        raise ValueError(f"--modes takes continuation, cross or both (comma-separated), not "
                         f"{','.join(args.modes)!r}")
    args.modes = [m for m in MODES if m in args.modes]
    checks = [
        ("--prompt-seconds", args.prompt_seconds, args.prompt_seconds > 0, "must be positive"),
        ("--min-seconds", args.min_seconds, args.min_seconds is None or args.min_seconds >= 0,
         "must be 0 or more"),
        ("--max-seconds", args.max_seconds, args.max_seconds is None or args.max_seconds > 0,
         "must be positive"),
        ("--per-speaker", args.per_speaker, args.per_speaker is None or args.per_speaker >= 2,
         "must be at least 2 (cross needs another utterance of the speaker)"),
        ("--limit", args.limit, args.limit is None or args.limit >= 1, "must be at least 1"),
        ("--top-p", args.top_p, 0 <= args.top_p <= 1, "must be in [0, 1]"),
        ("--max-new-seconds", args.max_new_seconds,
         args.max_new_seconds is None or args.max_new_seconds > 0, "must be positive"),
    ]
    for flag, value, ok, rule in checks:
        if not ok or (value is not None and not math.isfinite(value)):
            raise ValueError(f"{flag} {rule}, not {value}")
    scorers.check_asr(args.asr)
    try:
        valle.check_language(args.language)
    except ValueError as e:
        raise ValueError(f"--language: {e}") from None
    low, high = duration_range(args)
    if low >= high:
        raise ValueError(f"--min-seconds ({low:g}) must be below --max-seconds ({high:g})")
    return args


def check_out(out):
    if out is None:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file: name a folder")
    if os.path.isdir(out) and not os.access(out, os.W_OK):
        raise ValueError(f"cannot write to {out}: choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write to {parent}: create it or choose another --out")


def run(args):
    start = time.time()
    device = cli.pick_device(args.device)
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda"
    # Everything that can be wrong with the input, before any work is done.
    items = list_utterances(args)
    if not args.tokens_only and any(item[4] != "en" for item in items):
        raise ValueError("the ASR and WER read English only: evaluate other languages with "
                         "--tokens-only (the token-space figures)")
    check_out(args.out)
    # The scorers load before any work: a missing extra stops the run here, writing nothing.
    asr, encoder = (None, None) if args.tokens_only else (scorers.ASR(args.asr),
                                                          scorers.SpeakerEncoder(args.speaker_encoder))
    ar, nar, ckpt = cli.load_for_inference(args.checkpoint, device, bf16)
    codec = codecs.load(ckpt["codec"], args.encodec_checkpoint, ckpt.get("codec_state"))
    untrained = not codec.speaks  # a test codec
    if untrained and not args.tokens_only:
        print(f"note: this checkpoint was trained on codes of a test codec ({ckpt['codec']}): its output "
              "is noise, so the model's WER and SIM (marked *) measure noise; read the token-space "
              "columns.", file=sys.stderr)
    min_seconds = args.prompt_seconds + MIN_CONTINUATION_SECONDS if "continuation" in args.modes else 0.0
    utts, notes = load_utterances(items, codec, min_seconds, ar.cfg)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    sampling = valle.Sampling(top_p=args.top_p, ras=not args.no_ras)
    prompt_frames = int(args.prompt_seconds * valle.FRAME_RATE)

    resynthesis = None
    if not args.tokens_only:
        recordings, recording_hyps, recording_sims = score_recordings(utts, asr, encoder,
                                                                      prompt_frames)
        if codec.speaks:  # what the codec alone loses: the best the model could sound
            resynthesis = score_recordings(
                [replace(u, wav=codec.decode(u.codes).cpu()) for u in utts],
                asr, encoder, prompt_frames)[0]
    real_c0 = None
    if args.real_c0 and not args.tokens_only:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            real_c0 = {mode: score_nar_on_real(mode, utts, nar, codec, asr, encoder, prompt_frames)
                       for mode in args.modes}
    rows, results = [], {}
    for mode in args.modes:
        mode_rows = evaluate_mode(mode, utts, ar, nar, codec, asr, encoder, sampling,
                                  prompt_frames, args, bf16)
        results[mode] = summarize(mode_rows, args.tokens_only)
        rows += mode_rows
    if args.out and args.tokens_only:
        os.makedirs(args.out, exist_ok=True)
        write_token_scores(os.path.join(args.out, "scores.tsv"), rows)
    elif args.out:
        write_scores(os.path.join(args.out, "scores.tsv"), rows, recording_hyps, recording_sims)

    minutes = sum(u.seconds for u in utts) / 60
    speakers = len({u.speaker for u in utts})
    print(f"{len(utts)} utterances of {speakers} speakers ({minutes:.1f} min of speech) from "
          f"{args.src} ({args.layout}); prompt {args.prompt_seconds:g} s; top-p {args.top_p:g}"
          f"{', no RAS' if args.no_ras else ''}; seed {args.seed}")
    if args.tokens_only:
        print_token_table(args.modes, results, ar.cfg.group_size)
        print("c0 edit: codebook-0 edit distance to the real codes of the sentence (continuation: "
              "after the prompt) over their length; baseline: the same for the real codes of "
              "another sentence of the speaker; ratio: c0 edit / baseline; AR gap, NAR gap: mean "
              "log-probability per code of the real codes with their own text minus with that "
              "other sentence's text (nats, teacher-forced)")
        generating = sum(r["generate_seconds"] for r in rows)
        print(f"time: {time.time() - start:.1f} s on {device}, {generating:.1f} s of it generating")
        return
    print_table(args.modes, recordings, results, ar.cfg.group_size, untrained, resynthesis,
                real_c0)
    print("text gap (AR / NAR, nats per code, teacher-forced, own text minus another's): " +
          ", ".join(f"{m} {results[m]['ar_gap']:.3f} / {results[m]['nar_gap']:.3f}"
                    for m in args.modes))
    if untrained:
        print("* a test codec decodes codes to noise: WER and SIM of the model's "
              "output mean nothing; its token-space figures do")
    print("c0 edit: codebook-0 edit distance to the real codes of the sentence (continuation: "
          "after the prompt) over their length; baseline: the same for the real codes of "
          "another sentence of the speaker")
    print(f"scorers: {asr.name if asr else args.asr} (WER), {args.speaker_encoder} (SIM). paper: LibriSpeech "
          "test-clean 4-10 s, Conformer-Transducer ASR, WavLM-TDNN: compare the model with the "
          "recordings of this run, not with the paper")
    no_speech = sum(s["no_speech"] for s in results.values())
    if no_speech:
        print(f"{no_speech} outputs had no speech (<eos> at once): WER counts their words as "
              f"deleted, SIM {NO_SPEECH_SIM}")
    cut = sum(s["cut"] for s in results.values())
    if cut:
        print(f"{cut} outputs were cut off without <eos> (at --max-new-seconds or the model's "
              "length limit): their duration ratio and WER are cut too")
    if args.out:
        print(f"wrote {args.out}/scores.tsv and the outputs in {args.out}/<mode>/")
    generating = sum(r["generate_seconds"] for r in rows)
    speech = sum(r["output_seconds"] for r in rows)
    print(f"time: {time.time() - start:.1f} s on {device}, {generating:.1f} s of it generating "
          f"{speech:.1f} s of audio (AR, NAR and decoding)")


# Errors print one line and exit with status 2, writing nothing.
main = cli.entry(lambda argv: run(parse_args(argv)))


if __name__ == "__main__":
    main()
