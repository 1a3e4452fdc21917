"""
The codecs besides the pretrained EnCodec, and the one lookup by name (`load`) through which
datasets and checkpoints find the codec their codes came from (their `codec` field):

    pretrained          valle.Codec.pretrained, EnCodec's published weights: speech
    untrained-seed<N>   EnCodec with random weights, its codebooks filled from a probe so that
                        its codes follow the audio; its decoder makes noise (tests, offline runs)
    spectral-seed<N>    the same with a log-mel encoder, whose codes follow what is said

Each is a valle.Codec: sample rate, frame rate, encode, decode, name (`kind`), and whether its
decoder speaks.
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import valle

ENCODEC_CHECKPOINT = "encodec_24khz-d7cc33bc.th"  # the official weights' file name (~90 MB)


def load(kind, checkpoint=None):
    """The codec that a dataset or checkpoint names by its `kind`; errors say what to do.
    checkpoint: a local copy of EnCodec's weights (offline)."""
    for name, make in (("untrained", untrained), ("spectral", spectral)):
        if kind.startswith(f"{name}-seed"):
            return make(int(kind.removeprefix(f"{name}-seed")))
    try:
        return valle.Codec.pretrained(checkpoint)
    except Exception as e:  # no network, a missing file, a file that is not EnCodec's
        why = (str(e).strip().splitlines() or [""])[0]  # torch's errors run over many lines
        raise ValueError(f"cannot load pretrained EnCodec ({type(e).__name__}: {why}); offline, "
                         f"pass --encodec-checkpoint /path/to/{ENCODEC_CHECKPOINT}") from None


class LogMel(nn.Module):
    """(B, 1, n) waveform -> (B, 128, ceil(n / 320)) log-mel frames: the spectral test codec's
    encoder, EnCodec's frame rate and shape. Frame t is the spectrum of the 1280 samples
    (53 ms, two periods of an 80 Hz voice) that end at sample 320 (t + 1): causal, like
    EnCodec, so padding an item on the right changes only its last frame (Codec.encode_batch)."""
    window_size, n_mels = 1280, 128

    def __init__(self):
        super().__init__()
        import torchaudio.functional as AF
        self.register_buffer("window", torch.hann_window(self.window_size))
        self.register_buffer("mel", AF.melscale_fbanks(self.window_size // 2 + 1, 50.0, 8000.0,
                                                       self.n_mels, valle.SAMPLE_RATE))  # (641, 128)

    def forward(self, x):
        hop = valle.SAMPLE_RATE // valle.FRAME_RATE
        n = x.shape[-1]
        T = -(-n // hop)
        x = F.pad(x[:, 0], (self.window_size - hop, T * hop - n))  # (B, (T + 3) * hop)
        frames = x.unfold(1, self.window_size, hop) * self.window  # (B, T, 1280)
        power = torch.fft.rfft(frames, dim=-1).abs() ** 2  # (B, T, 641)
        return torch.log10(power @ self.mel + 1e-6).transpose(1, 2)  # (B, 128, T)


def speech_probe(seed, seconds=20):
    """A speech-like probe for the spectral codec's codebooks: 0.25 s segments of vowels (a
    pulse train at 80-300 Hz through three resonators at random formants), fricatives (noise
    above 2-7 kHz) and near-silence, at random levels."""
    import torchaudio.functional as AF
    g = torch.Generator().manual_seed(seed)

    def uniform(low, high):
        return low + (high - low) * float(torch.rand(1, generator=g))

    n, segments = valle.SAMPLE_RATE // 4, []
    for _ in range(seconds * 4):
        kind = uniform(0, 1)
        if kind < 0.6:  # voiced
            y = torch.zeros(n)
            y[torch.arange(0, n, valle.SAMPLE_RATE / uniform(80, 300)).long()] = 1.0
            for low, high in ((250, 900), (700, 2600), (1800, 3600)):  # F1, F2, F3
                r, theta = math.exp(-math.pi * 100 / valle.SAMPLE_RATE), 2 * math.pi * uniform(low, high) / valle.SAMPLE_RATE
                a = torch.tensor([1.0, -2 * r * math.cos(theta), r * r])
                y = AF.lfilter(y, a, torch.tensor([1.0, 0.0, 0.0]), clamp=False)
        elif kind < 0.85:  # fricative
            y = AF.highpass_biquad(torch.randn(n, generator=g), valle.SAMPLE_RATE, uniform(2000, 7000))
        else:  # near-silence
            y = 1e-4 * torch.randn(n, generator=g)
        segments.append(y / (y.abs().max() + 1e-9) * uniform(0.05, 0.55))
    return torch.cat(segments)


def fill_codebooks(model, frames, generator=None):
    """Fill an EnCodec model's codebooks from encoder frames (T, 128): each codebook takes
    jittered frames at random, level by level on the residuals the levels before leave (a
    k-means init without iterations). generator=None draws from torch's global one."""
    residual = frames
    for layer in model.quantizer.vq.layers:
        book = layer._codebook
        pick = torch.randint(0, len(residual), (book.embed.shape[0],), generator=generator)
        jitter = torch.randn(book.embed.shape, generator=generator)
        book.embed.copy_(residual[pick] + 0.1 * residual.std(0) * jitter)  # (1024, 128)
        book.inited.fill_(1)
        residual = residual - book.dequantize(book.quantize(residual))


def untrained(seed=0):
    """A random EnCodec whose codes still follow the audio, for tests and offline demos.

    An untrained EncodecModel has all-zero codebooks, so it would encode every frame to code
    0. We fill each codebook with jittered encoder frames of a speech-like probe, level by
    level on the residuals: a k-means init without iterations. Its decoder stays random:
    it turns codes into noise, not speech."""
    from encodec import EncodecModel
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.manual_seed(seed)
        model = EncodecModel.encodec_model_24khz(pretrained=False)
        t = torch.arange(6 * valle.SAMPLE_RATE) / valle.SAMPLE_RATE  # 6 s probe
        pitch = 80 + 300 * (1 + torch.sin(2 * math.pi * 0.7 * t))  # Hz
        phase = 2 * math.pi * torch.cumsum(pitch, 0) / valle.SAMPLE_RATE
        voiced = sum(torch.sin(k * phase) / k for k in range(1, 12))
        voiced = voiced * (torch.sin(2 * math.pi * 1.3 * t) > -0.3)  # with pauses
        noise = torch.randn_like(t) * (torch.sin(2 * math.pi * 2.1 * t) > 0.6)  # fricatives
        probe = 0.3 * voiced + 0.2 * noise
        with torch.no_grad():
            frames = model.encoder(probe.view(1, 1, -1)).squeeze(0).T  # (450, 128)
            fill_codebooks(model, frames)  # the global generator, seeded above
    return valle.Codec(model, f"untrained-seed{seed}", speaks=False)


def spectral(seed=0):
    """A test codec whose codes follow what is said: the untrained EnCodec with its random
    encoder swapped for a fixed log-mel analysis (LogMel), codebooks filled as `untrained`
    fills them, from the log-mel frames of a source-filter probe (speech_probe).

    Why: the random encoder's frames are a function of the waveform's phase, so the codes
    change every frame even through a sustained vowel, and the same sentence in two voices
    shares almost no codes (docs/learning.md): no model can read its text into
    them. A spectrum has no phase. The decoder is EnCodec's random one: noise, as with
    `untrained`."""
    codec = untrained(seed)
    model = codec.model
    model.encoder = LogMel()
    with torch.no_grad():
        frames = model.encoder(speech_probe(seed).view(1, 1, -1)).squeeze(0).T  # (T, 128)
        fill_codebooks(model, frames, torch.Generator().manual_seed(seed))
    return valle.Codec(model, f"spectral-seed{seed}", speaks=False)
