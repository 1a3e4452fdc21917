"""
VALL-E 2 in one file: zero-shot text-to-speech with a neural codec language model.

EnCodec turns speech into codes (8 codebooks at 75 frames/s). Two transformers model them
given the text's phonemes and a 3-second voice prompt:
  * the AR model writes the first codebook, one *group* of G frames per step (grouped code
    modeling, VALL-E 2 §3.1), sampled with repetition-aware sampling (§3.4.1);
  * the NAR model fills in codebooks 1..7, one whole codebook per pass (§3.3.2).
EnCodec's decoder turns the 8 codebooks back into a waveform.

Reading order: config; text to phone ids (the phone and language tables); the codec;
transformer and KV cache; the AR model with grouped code modeling; the NAR model; sampling
with RAS; generation (cached, and the naive path beside it). The rest lives in extras/, which
imports this file: the text frontends (which phonemize imports when it first reads a language),
long text, batches and candidates, test codecs, speed-ups, and loading a checkpoint (cli.py):
the config, the phone table and each model's weights, as train.py saves them.
Papers: VALL-E 2 = arXiv 2406.05370, VALL-E = arXiv 2301.02111, VALL-E X = arXiv 2303.03926.
"""
import functools
import importlib
import math
import unicodedata
from contextlib import nullcontext
from dataclasses import asdict, dataclass

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

MAX_FRAMES_PER_TOKEN = 20  # generation's cap, so it ends: speech takes about 6 frames a phone


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

    def __post_init__(self):
        if self.group_size not in (1, 2, 4, 8):
            raise ValueError(f"group_size must be 1, 2, 4 or 8, not {self.group_size}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        self.head_dim = self.d_model // self.n_head  # derived, not a field: not in to_dict

    def to_dict(self):
        return asdict(self)


PRESETS = {
    # tests and the CPU demo: 1.0M (AR) and 2.0M (NAR) parameters, trains in minutes on 2 cores
    "tiny": dict(n_layer=3, n_head=4, d_model=128, d_ff=512, dropout=0.1,
                 max_text_tokens=512, max_frames=30 * FRAME_RATE),
    # the shipped model's (docs/model.md): 4.0M (AR) and 5.8M (NAR), utterances up to 20 s
    "small": dict(n_layer=4, n_head=4, d_model=256, d_ff=1024, dropout=0.1,
                  max_text_tokens=256, max_frames=20 * FRAME_RATE),
    # VALL-E's size (VALL-E §5): 159M (AR) and 164M (NAR) parameters
    "paper": dict(n_layer=12, n_head=16, d_model=1024, d_ff=4096, dropout=0.1),
}


def get_config(preset="tiny", **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return Config(**{**PRESETS[preset], **overrides})


# -----------------------------------------------------------------------------
# Text: phones and one id table (English: ARPAbet by g2p-en; other languages: eSpeak's IPA)

# g2p_en's 70 ARPAbet symbols with stress digits. The table is fixed here, never built from
# training data, so a checkpoint and any text always agree on ids.
ARPABET = sorted([v + stress for v in "AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split()
                  for stress in "012"] + "B CH D DH F G HH JH K L M N NG P R S SH T TH UW V W Y Z ZH".split())
PAD, UNK, WORD_BOUNDARY = "<pad>", "<unk>", "_"
PUNCTUATION = [".", ",", "?", "!", "-", "'"]  # the only non-letters g2p_en keeps
# Other languages' IPA symbols (eSpeak NG's German, Spanish, French, and other common letters),
# appended: the table only grows at its end, so older checkpoints' and datasets' ids stay valid.
IPA_VOWELS = "a e i o u y æ ø œ ɐ ɑ ɒ ɔ ə ɘ ɛ ɜ ɞ ɤ ɨ ɪ ɯ ɵ ɶ ʉ ʊ ʌ ʏ ɚ ɝ".split() + [
    "ã", "ẽ", "ĩ", "õ", "ũ", "ɐ̃", "ɑ̃", "ɔ̃", "ɛ̃", "œ̃"]  # nasal vowels (French, Portuguese)
IPA_CONSONANTS = ("b c d f g h j k l m n p q r s t v w x z ç ð ħ ŋ ɕ ɖ ɟ ɡ ɢ ɣ ɥ ɦ ɫ ɬ ɭ ɮ ɰ ɱ "
                  "ɲ ɳ ɴ ɸ ɹ ɺ ɻ ɽ ɾ ʀ ʁ ʂ ʃ ʈ ʋ ʍ ʎ ʐ ʑ ʒ ʔ ʕ ʝ β θ χ").split()
# Two letters, one sound: diphthongs (ɔø: German eu/äu) and affricates, which eSpeak ties in some
# words only. Read as one wherever the two letters meet, even across syllables ("Rätsel").
IPA_UNITS = "aɪ aʊ eɪ oʊ ɔɪ ɔø ɔʏ əʊ tʃ dʒ ts dz pf tɕ dʑ tʂ".split()
IPA_MARKS = "ˈ ˌ ː ˑ ʰ ʲ ʷ".split()  # no sound of their own: stress, length, secondary articulation
IPA = [unicodedata.normalize("NFC", s)  # one spelling of each: precomposed where one exists
       for s in IPA_VOWELS + IPA_CONSONANTS + IPA_UNITS + IPA_MARKS]
PHONES = [PAD, UNK, WORD_BOUNDARY] + PUNCTUATION + ARPABET + IPA
PHONE_ID = {p: i for i, p in enumerate(PHONES)}
PAD_ID, UNK_ID = PHONE_ID[PAD], PHONE_ID[UNK]
PHONE_SLOTS = 256  # phone ids are stored as uint8 (data/prepare.py): the table's hard limit
assert len(PHONES) <= PHONE_SLOTS and len(set(PHONES)) == len(PHONES)
SOUNDS = set(ARPABET) | set(IPA) - set(IPA_MARKS)  # what speakable() looks for

# Languages (VALL-E X §3), append-only. A text token is language index * PHONE_SLOTS + phone id,
# so a prompt's transcript in one language and a text in another are one sequence.
LANGUAGES = ["en", "de", "es", "fr"]
LANGUAGE_ID = {code: i for i, code in enumerate(LANGUAGES)}

# Text frontends, each text -> phones, punctuation and word boundaries. A frontend registers
# itself in PHONEMIZERS when its module is imported; phonemize imports it the first time its
# language is read: g2p-en for English, made to run offline (extras/english.py), and eSpeak NG's
# IPA for the others (extras/languages.py).
PHONEMIZERS = {}
FRONTENDS = {"en": "extras.english", "de": "extras.languages", "es": "extras.languages",
             "fr": "extras.languages"}


def phonemize(text, language="en"):
    """Text -> list of phones, punctuation and word boundaries, by the language's frontend."""
    check_language(language)
    if language not in PHONEMIZERS:
        importlib.import_module(FRONTENDS[language])  # registers it
    return PHONEMIZERS[language](text)


def check_language(code):
    """Raises ValueError, listing the supported languages, unless `code` is one of them."""
    if code not in LANGUAGE_ID:
        raise ValueError(f"unknown language {code!r}: choose one of {', '.join(LANGUAGES)}")


def join_phones(first, second):
    """Two text-token sequences as one, at a word boundary (English's token, whose language
    embedding is zero: neutral): a prompt's transcript and a text, or two training utterances."""
    return [*first, PHONE_ID[WORD_BOUNDARY], *second]


def speakable(phones):
    """Whether phones hold anything to pronounce (not only punctuation and word boundaries)."""
    return any(p in SOUNDS for p in phones)


def text_to_ids(text, language="en"):
    """Text -> text tokens (language index * PHONE_SLOTS + phone id); a symbol outside the table
    reads as <unk>. ValueError: nothing to pronounce, or an unknown language."""
    phones = phonemize(text, language)
    if not speakable(phones):
        words = "English words" if language == "en" else f"words of language {language!r}"
        raise ValueError(f"nothing to pronounce in {text!r}: give {words}")
    base = LANGUAGE_ID[language] * PHONE_SLOTS
    return [base + PHONE_ID.get(p, UNK_ID) for p in phones]  # an unseen symbol never crashes


# -----------------------------------------------------------------------------
# Codec: EnCodec 24 kHz at 6 kbps, audio <-> [8, T] codes (VALL-E 2 §3.2)

def fp32(device):
    """A region in fp32 even under a caller's autocast (the "meta" device has none)."""
    return nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


class Codec:
    """EnCodec: waveform (n,) at 24 kHz <-> codes (8, T) at 75 Hz, behind the interface other
    codecs fill (extras/codecs.py): sample_rate, frame_rate, encode(_batch), decode, `speaks`
    (whether decoded codes are speech), and `kind`, which datasets and checkpoints record."""

    sample_rate, frame_rate = SAMPLE_RATE, FRAME_RATE

    def __init__(self, model, kind, speaks=True):
        """model: an EncodecModel (the published one: extras/codecs.pretrained)."""
        self.model, self.kind, self.speaks = model.eval(), kind, speaks
        self.model.set_target_bandwidth(6.0)  # 8 codebooks

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode(self, wav):
        """(n,) float waveform at 24 kHz, on any device -> (8, ceil(n / 320)) long codes (CPU)."""
        return self.encode_batch([wav])[0]

    @torch.no_grad()  # not inference_mode: codes may train a model
    def encode_batch(self, wavs):
        """[(n_i,) waveforms] -> [(8, ceil(n_i / 320)) codes] in one call, in fp32. Right-padding
        is safe as the 24 kHz EnCodec is causal: the zeros reach only an item's last frame."""
        lengths = [len(w) for w in wavs]
        x = torch.zeros(len(wavs), 1, max(lengths), device=self.device)  # (B, 1, n_max)
        for row, wav in zip(x, wavs):
            row[0, : len(wav)] = wav
        with fp32(self.device):
            codes = self.model.encode(x)[0][0].long().cpu()  # frames[0] = (codes, scale=None)
        return [c[:, : -(-n // (SAMPLE_RATE // FRAME_RATE))] for c, n in zip(codes, lengths)]

    @torch.no_grad()
    def decode(self, codes):
        """(8, T) codes, on any device -> (T * 320,) float waveform, on the codec's; fp32."""
        with fp32(self.device):
            return self.model.decode([(codes.unsqueeze(0).long().to(self.device), None)]).reshape(-1)


# -----------------------------------------------------------------------------
# Transformer blocks with a preallocated KV cache

class KVCache:
    """Every layer's keys and values for `max_len` sequence slots (made at the first write, in its
    dtype), and which slots hold real tokens. A forward pass asks for its `mask`, stores each
    layer's keys and values (`update`), then moves on (`advance`). A slot is a place in the
    sequence, text included; it is not an audio position (the models' `pos`)."""

    def __init__(self, cfg, batch_size, max_len, device=None):
        self.shape = (batch_size, cfg.n_head, max_len, cfg.head_dim)
        self.k, self.v = [None] * cfg.n_layer, [None] * cfg.n_layer
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # slots filled so far

    def mask(self, valid, causal):
        """Record the validity (B, q) of this call's q new slots -> (B, 1, q, S) mask of the
        filled slots they may attend to."""
        end = self.length + valid.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"KV cache is full ({self.max_len} slots)")
        self.valid[:, self.length:end] = valid
        return attention_mask(self.valid[:, :end], valid.shape[1], causal)

    def update(self, layer, k, v):
        """Store this call's (B, nh, q, hs) keys/values; return all keys/values so far."""
        if self.k[layer] is None:
            self.k[layer] = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.v[layer] = torch.zeros(self.shape, device=v.device, dtype=v.dtype)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n):
        """Move past this call's n slots, once every layer has stored them."""
        self.length += n

    def step(self, model, new, pos):
        """One decode step: the model called on this cache with the newest groups (B, 1, G) at
        audio positions (B, 1) -> logits (B, 1, G, 1025). (speedups.FixedShapeCache compiles it.)"""
        return model(new, pos, self)


def attention_mask(valid_keys, q_len, causal):
    """(B, S) key validity -> (B, 1, q_len, S) mask, True = may attend, for queries at the last
    q_len positions: causal bottom-right, as a cached query needs (SDPA's is_causal: top-left)."""
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
        self.cfg, self.layer = cfg, layer  # its index in a KV cache
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
        """x (B, S, d), valid (B, S) -> (B, S, d); with a cache, x holds only the new slots."""
        mask = attention_mask(valid, x.shape[1], self.causal) if cache is None else \
            cache.mask(valid, self.causal)
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
    """(B,) lengths -> (B, size) validity on `device` (default: the lengths'). Training keeps
    lengths on the CPU, where shapes are read without waiting for a GPU; the copy is queued."""
    device = lengths.device if device is None else device
    return torch.arange(size, device=device) < lengths.to(device, non_blocking=True)[:, None]


class TiedHead(nn.Module):
    """A code prediction layer tied to a code embedding (§3.1): hidden (..., d), the table's rows
    -> logits in fp32, also under autocast: bf16 would round near-ties in the loss and sampler
    together. A module, though it has no weights, so that extras/speedups.py can swap it."""

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
    """Text tokens (B, L) -> (B, L, d): each phone's embedding plus its language's (VALL-E X §3).
    English's row is zero, not learned (language_emb holds the others): its phone embeddings
    absorb any offset, and English-only checkpoints compute what they would without one."""
    phone, language = text % PHONE_SLOTS, text // PHONE_SLOTS  # see LANGUAGES
    table = F.pad(language_emb, (0, 0, 1, 0))  # (len(LANGUAGES), d): English's zero row first
    return phone_emb(phone) + table[language]


# -----------------------------------------------------------------------------
# AR model: first codebook, one group of G frames per step (VALL-E 2 §3.1, §3.3.1)

def group_codes(c0, G):
    """(T,) codes of codebook 0 -> (T // G + 1, G) groups, the last one all <eos>. Leading codes
    are clipped to a multiple of G (§3.1: speech starts with silence)."""
    return group_batch(c0[None], torch.tensor([len(c0)]), G)[0]


def group_batch(c0, lens, G):
    """The AR's targets (Eq. 10): (B, T) codes of codebook 0, right-padded, and (B,) lengths ->
    (B, T // G + 1, G). Per row, plainly:

        c = c0[i, lens[i] % G : lens[i]]       # leading codes clipped to whole groups
        targets[i] = c.view(-1, G), then one group of G <eos>, then IGNORE groups

    Speech ends on a whole <eos> group; inference ends on a group that holds an <eos> and keeps
    none of its codes (ungroup), so both see only whole groups of codes. Done as one gather
    with a shape from T, never from a length's value (which on a GPU would wait for it)."""
    N = c0.shape[1] // G  # room for the longest row's groups (collate pads to its length)
    lens = lens.to(c0.device, non_blocking=True)
    n = (lens // G)[:, None]  # (B, 1) each row's groups
    slot = torch.arange((N + 1) * G, device=c0.device)  # ((N + 1) * G,) the targets' code slots
    first = (lens % G)[:, None]  # (B, 1) the leading codes clipped
    padded = F.pad(c0, (0, 1))  # (B, T + 1): a batch without codes still has a column to gather
    codes = padded.gather(1, (first + slot).clamp(max=c0.shape[1]))  # (B, (N + 1) * G)
    group = slot // G  # which group each slot is in
    targets = torch.where(group < n, codes, torch.where(group == n, EOS, IGNORE))
    return targets.view(len(c0), N + 1, G)  # (B, N + 1, G)


def ungroup(groups):
    """(N, G) groups -> (T,) codes: the groups before the first that holds an <eos>. An <eos> in
    any slot ends the speech and none of its group's codes are kept: the output is whole groups,
    like training's targets (group_batch)."""
    ends = (groups == EOS).any(dim=1).nonzero()  # (n_ends, 1) the groups that hold one
    return groups[: ends[0, 0] if len(ends) else len(groups)].reshape(-1)


class ARModel(nn.Module):
    """Decoder-only LM over E_x || [e_eos, e_bos] || E_g (Eq. 9), for L phones and N groups:

        slot          0 .. L-1          L       L+1     L+2    ...   L+1+N
        input         x_0 .. x_{L-1}    e_eos   <bos>   g_0    ...   g_{N-1}
        text pos      0 .. L-1          L       -       -      ...   -
        audio pos     -                 -       0       1      ...   N
        predicts      -                 -       g_0     g_1    ...   <eos> <eos> .. (G of them)

    Each g_n is one group of G codes of codebook 0, embedded as one vector (Eq. 7-8); the
    hidden state at a slot gives the logits of all G codes of the next group. Attention is
    causal over the whole sequence, text included: the text is then prefilled once into the
    KV cache and every slot reads like a GPT token. (A prefix-LM, with the text attending
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
        x = x + self.text_pos(positions(valid))  # e_eos at text position L_i, after row i's text
        bos = (specials[1] + self.audio_pos.weight[0]).expand(B, 1, -1)  # audio position 0
        return torch.cat([x, bos], dim=1), torch.cat([valid, ones], dim=1)

    def embed_groups(self, groups, pos):
        """Groups (B, N, G) at audio positions (B, N) -> (B, N, d) (Eq. 7-8)."""
        B, N, G = groups.shape
        e = self.code_emb(groups).view(B, N, G * self.cfg.d_model)  # (B, N, G*d): concatenated
        return self.group_in(e) + self.audio_pos(pos)  # (B, N, d)

    def logits(self, h):
        """Hidden (B, S, d) -> (B, S, G, 1025) logits for the next group's G codes: the group
        prediction layer, then the code prediction layer tied to W_c (§3.1). All G codes come
        from one hidden state: inside a group the model is non-autoregressive (Eq. 11)."""
        B, S, d = h.shape
        h = self.group_out(h).view(B, S, self.cfg.group_size, d)  # (B, S, G, d)
        return self.head(h, self.code_emb.weight[: EOS + 1])  # <bos> is never predicted

    def forward(self, groups, pos=None, cache=None, text=None, text_valid=None, groups_valid=None):
        """Groups (B, N, G) of codebook 0 at audio positions pos (B, N) -> (B, S, G, 1025) logits:
        at each slot, those of the next group. One forward for training, prefill and decoding:

          * with text (B, L) (training, or the prefill): the sequence E_x || e_eos || <bos> ||
            groups, and the logits from <bos> on, S = N + 1; pos defaults to 1 .. N;
          * without (a decode step): the groups continue the sequence that `cache` holds, S = N.

        groups_valid (B, N): False where a row is padding. cache: see KVCache."""
        if groups_valid is None:
            groups_valid = torch.ones(groups.shape[:2], dtype=torch.bool, device=groups.device)
        if pos is None:
            pos = positions(groups_valid) + 1  # after <bos>, audio position 0
        x, valid = self.embed_groups(groups, pos), groups_valid  # (B, N, d), (B, N)
        if text is not None:
            prefix, prefix_valid = self.embed_prefix(text, text_valid)  # (B, L + 2, d)
            x, valid = torch.cat([prefix, x], dim=1), torch.cat([prefix_valid, valid], dim=1)
        h = self.transformer(self.drop(x), valid, cache)  # (B, L + 2 + N, d) or (B, N, d)
        if text is not None:
            h = h[:, text.shape[1] + 1:]  # from <bos> on: (B, N + 1, d)
        return self.logits(h)

    def loss(self, text, text_lens, codes, code_lens):
        """Training loss (Eq. 10-11): text (B, L), codes (B, 8, T) or (B, T) -> (loss, top-1
        accuracy), both averaged over every target code, <eos> included."""
        c0 = codes[:, 0] if codes.dim() == 3 else codes
        targets = group_batch(c0, code_lens, self.cfg.group_size)  # (B, N + 1, G)
        # Inputs: the targets shifted right by one group behind <bos>. A shorter row's <eos>
        # group is an input too, harmlessly: with causal attention only its padding reads it.
        groups = targets[:, :-1]  # (B, N, G)
        groups_valid = groups[:, :, 0] != IGNORE  # (B, N)
        text_valid = valid_lengths(text_lens, text.shape[1], text.device)
        logits = self(groups.clamp(min=0), None, None, text, text_valid, groups_valid)  # (B, N + 1, G, 1025)
        loss = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=IGNORE)
        return loss, accuracy(logits, targets, targets != IGNORE)


# -----------------------------------------------------------------------------
# NAR model: codebooks 1..7, one whole codebook per pass (VALL-E 2 §3.3.2)

class NARModel(nn.Module):
    """Bidirectional transformer over E_x || e_eos || E_c || e_eos || e_j (Eq. 12-16):

        input      x_0 .. x_{L-1}   e_eos   p_0 .. p_{Tp-1}   t_0 .. t_{T-1}   e_eos   e_j
        text pos   0 .. L-1         -       -                 -                -       -
        audio pos  -                -       0 .. Tp-1         Tp .. Tp+T-1     -       -
        predicts   -                -       -                 codebook j       -       -

    x: phones; p: prompt frames, each the sum of its 8 code embeddings (Eq. 13); t: target
    frames, each the sum of its codes in codebooks 0..j-1 (Eq. 14); e_j: which codebook.
    The two e_eos are one vector without a position, so with full attention they compute the
    same state in every layer: one token counted twice, which attention cannot place. Nothing
    is lost: phones and codes come from separate tables and carry their own positions, so
    attention tells text from audio without them, and e_j is a token of its own."""

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
        """Logits (B, T, 1024) for codebook j (1..7) of the target frames. text (B, L); prompt
        (B, 8, Tp): all 8 codebooks; target (B, 8, T): only codebooks 0..j-1 are read."""
        audio = torch.cat([prompt, target], dim=2)  # (B, 8, Tp + T)
        is_prompt = torch.cat([prompt_valid, torch.zeros_like(target_valid)], dim=1)
        logits = self.frames(text, text_valid, audio, torch.cat([prompt_valid, target_valid], dim=1),
                             is_prompt, j)
        return logits[:, prompt.shape[2]:]

    def frames(self, text, text_valid, audio, audio_valid, is_prompt, j):
        """The model proper: logits (B, S, 1024) for codebook j of every audio frame. audio
        (B, 8, S): each row's frames in time order; those is_prompt marks read all 8 codebooks
        (Eq. 13), the others codebooks 0..j-1 (Eq. 14). Training passes utterances whole, their
        prompts a prefix; inference, the prompt then the target (forward)."""
        B, L = text.shape
        # (B, S, 8): which codebooks each frame reads, all 8 in the prompt, 0..j-1 elsewhere
        read = is_prompt[:, :, None] | (torch.arange(N_CODEBOOKS, device=audio.device) < j)
        e_audio = sum(self.code_embs[k](audio[:, k]) * read[:, :, k, None]  # (B, S, d)
                      for k in range(N_CODEBOOKS))
        audio = e_audio + self.audio_pos(positions(audio_valid))
        text_x = embed_text(self.text_emb, self.language_emb, text)
        text_x = text_x + self.text_pos(positions(text_valid))
        tail = torch.stack([self.eos, self.codebook_id.weight[j]]).expand(B, 2, -1)  # e_eos, e_j
        x = torch.cat([text_x, self.eos.expand(B, 1, -1), audio, tail], dim=1)  # Eq. 15: (B, L + S + 3, d)
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
        """Training loss (Eq. 17) -> (loss, top-1 accuracy, j): each utterance's prompt is a random
        prefix (10-50%, all 8 codebooks), its target the rest; the loss is on the target frames
        of codebook j ~ U{1..7}. `draw` draws j and the prefixes, where not given."""
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
    temperature: float = 1.0  # divides the logits of the nucleus draw (not RAS's fallback)
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
    """Mask (-inf) all but the top-k codes and the smallest nucleus of mass >= top_p (0: greedy,
    only the most likely code; 1: everything)."""
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
    """(B, V) logits -> (B,) codes drawn with temperature, top-k and top-p, by inverse CDF with
    one uniform draw per row: `generator` is one, or a list of B (a stream per row)."""
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
    """r = (1/K) * #{k in 1..K : c_t == c_{t-k}} (§3.4.1): codes (B,), history (B, H) of the
    codes before them, the newest last (H < K while there are fewer) -> (B,) ratios."""
    return (history[:, -window:] == codes[:, None]).sum(dim=1).double() / window


def repetition_aware_sample(logits, history, generator=None, cfg=Sampling()):
    """Algorithm 1: nucleus sampling, unless the drawn code repeats in the history; then a plain
    random sample from the full distribution. It fires when r >= t_r over the K codes before c_t:
    with the paper's K=10, t_r=0.1, once the code appeared among the last ten. (The written sum,
    read with k from 0, counts c_t itself and tests r > t_r: the same rule.) The fallback draws
    from the model's own distribution (no temperature, top-k or top-p), so what breaks a loop is
    what the model finds likely. Both draws are always made: the stream does not depend on data."""
    nucleus = sample(logits, generator, cfg.temperature, cfg.top_k, cfg.top_p)
    if not cfg.ras:
        return nucleus
    fallback = sample(logits, generator)  # temperature 1, everything
    too_often = repetition_ratio(nucleus, history, cfg.ras_window) >= cfg.ras_threshold
    return torch.where(too_often, fallback, nucleus)


# -----------------------------------------------------------------------------
# Generation: text + voice prompt -> codes -> waveform

def pad_ids(seqs, device=None):
    """List of id lists -> (B, L) padded tensor and (B, L) validity."""
    ids = nn.utils.rnn.pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs],
                                    batch_first=True, padding_value=PAD_ID).to(device)
    return ids, ids != PAD_ID


def inference(fn):
    """Decoding is inference, whatever mode the caller left a model in: fn's model arguments run
    in eval mode (no dropout), under inference_mode, and get their mode back."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        modes = [(m, m.training) for m in args if isinstance(m, nn.Module)]
        try:
            with torch.inference_mode():
                return fn(*[a.eval() if isinstance(a, nn.Module) else a for a in args], **kwargs)
        finally:
            for m, mode in modes:
                m.train(mode)
    return run


def sample_group(logits, history, generator, sampling):
    """(B, G, 1025) logits of one group -> its (B, G) codes, and the RAS history (B, <=K) after
    them. A group's codes come from one hidden state but are drawn one by one, each RAS seeing
    those before it (§3.4.1)."""
    codes = []
    for g in range(logits.shape[1]):
        code = repetition_aware_sample(logits[:, g], history, generator, sampling)  # (B,)
        history = torch.cat([history, code[:, None]], dim=1)[:, -sampling.ras_window:]  # (B, <=K)
        codes.append(code)
    return torch.stack(codes, dim=1), history  # (B, G)


@inference
def generate_ar(model, text, text_valid, prompt_c0, max_groups, sampling=Sampling(),
                generator=None, use_cache=True, cache_class=KVCache):
    """AR decoding: (B, L) text, (Tp,) prompt codes of codebook 0 -> list of B (T_i,) codes.

    An item ends at the first group that holds an <eos> (none of whose codes it keeps: ungroup),
    or after max_groups groups (an int, or each item's own), or where the position tables end:
    its codes are whole groups, and one that drew no <eos> has exactly its budget of them.
    generator: one, or one per item. use_cache=False: the naive path, which runs the whole
    sequence again at every step; the cached one must match it."""
    cfg, device, B, G = model.cfg, text.device, text.shape[0], model.cfg.group_size
    prompt_groups = group_codes(prompt_c0.to(device), G)[:-1]  # (Np, G), no <eos> group
    Np = prompt_groups.shape[0]
    # each item's budget, and prompt and speech together within the position tables' max_frames
    budgets = list(max_groups) if isinstance(max_groups, (list, tuple)) else [max_groups] * B
    room = (cfg.max_frames - len(prompt_c0)) // G
    if room < 1:
        raise ValueError(f"the prompt fills the model's {cfg.max_frames} frames: shorten it")
    budget = torch.tensor([min(b, room) for b in budgets], device=device)  # (B,)
    n_new = int(budget.max())

    # 1. Prefill: text and prompt in one pass (into the KV cache, unless naive).
    groups = prompt_groups.expand(B, Np, G)  # (B, Np, G)
    cache = cache_class(cfg, B, text.shape[1] + 2 + Np + n_new, device) if use_cache else None
    logits = model(groups, None, cache, text, text_valid)[:, -1]  # (B, G, 1025): the next group

    # 2. Decode: a group per step until every item has ended; RAS first sees the prompt.
    history = prompt_groups.reshape(1, -1)[:, -sampling.ras_window:].expand(B, -1)  # (B, <=K)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(n_new):
        new, history = sample_group(logits, history, generator, sampling)  # (B, G)
        groups = torch.cat([groups, new[:, None]], dim=1)  # (B, Np + step + 1, G)
        done |= (new == EOS).any(dim=1) | (budget <= step + 1)
        if done.all():
            break
        if cache is None:  # naive: the whole sequence again
            logits = model(groups, None, None, text, text_valid)[:, -1]
        else:  # the newest group at its audio position (<bos> is 0, group n is n + 1)
            pos = torch.full((B, 1), groups.shape[1], device=device)
            logits = cache.step(model, groups[:, -1:], pos)[:, -1]

    # 3. Collect: each item's new groups within its budget, up to the first with an <eos>.
    return [ungroup(g[Np: Np + b]) for g, b in zip(groups, budget.tolist())]


@inference
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


def prompted_text(cfg, target_ids, prompt_text, device=None, prompt_language="en"):
    """The models' text: the prompt's transcript, a word boundary, each target's tokens -> (B, L)
    tokens, validity. prompt_text=None: the targets include it (the paper's continuation)."""
    prompt_ids = text_to_ids(prompt_text, prompt_language) if prompt_text is not None else None
    text, text_valid = pad_ids([join_phones(prompt_ids, ids) if prompt_ids else ids
                                for ids in target_ids], device)
    if text.shape[1] > cfg.max_text_tokens:
        raise ValueError(f"text too long: at most {cfg.max_text_tokens} phones with the prompt")
    return text, text_valid


def speech_budget(cfg, target_ids, max_seconds=None):
    """Each text's most groups of speech, so that decoding ends: MAX_FRAMES_PER_TOKEN frames a
    text token, at most max_seconds (generate_ar cuts it further to the position tables)."""
    frames = [MAX_FRAMES_PER_TOKEN * len(ids) for ids in target_ids]
    if max_seconds:
        frames = [min(n, int(max_seconds * FRAME_RATE)) for n in frames]
    return [max(1, n // cfg.group_size) for n in frames]


def generate(ar, nar, texts, prompt_codes, prompt_text, sampling=Sampling(), seed=0,
             max_seconds=None, use_cache=True, cache_class=KVCache, language="en",
             prompt_language="en"):
    """Texts (list of str) in the voice of a prompt -> list of (8, T_i) codes of new speech.

    The models read prompt_text + text and continue prompt_codes (8, Tp) (VALL-E's prompting),
    all texts in one batch. seed: an int, or one per text; each text draws from a stream of its
    own, so that its codes never depend on its batch. language: the texts', prompt_language:
    the transcript's (VALL-E X: an English voice speaks German)."""
    device = next(ar.parameters()).device
    target_ids = [text_to_ids(t, language) for t in texts]
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(texts)
    if len(seeds) != len(texts):
        raise ValueError(f"{len(seeds)} seeds for {len(texts)} texts: give one per text")
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    text, text_valid = prompted_text(ar.cfg, target_ids, prompt_text, device, prompt_language)
    c0 = generate_ar(ar, text, text_valid, prompt_codes[0], speech_budget(ar.cfg, target_ids, max_seconds),
                     sampling, generators, use_cache, cache_class)
    return generate_nar(nar, text, text_valid, prompt_codes, c0)
