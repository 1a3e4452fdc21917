"""
Audio files: read any soundfile format as valle's mono 24 kHz waveform, trim silence, write
16-bit WAV atomically.
"""
import os

import torch

import valle
from extras import cli

SILENCE_PEAK = 1e-3  # audio whose peak stays below this (-60 dB full scale) holds no speech


def load_audio(path):
    """Read any soundfile-supported file -> mono float32 tensor (n,) at 24 kHz."""
    import soundfile as sf
    import torchaudio.functional as AF
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such audio file: {path}")
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)  # (n, channels)
    except Exception as e:
        raise ValueError(f"cannot read {path} as audio ({e}); use WAV, FLAC or OGG") from None
    wav = torch.from_numpy(wav).mean(dim=1)  # downmix to mono
    return AF.resample(wav, sr, valle.SAMPLE_RATE) if sr != valle.SAMPLE_RATE else wav


def trim_silence(wav, threshold_db=-40.0, margin_s=0.05, start=True, end=True):
    """Cut leading (start) and trailing (end) audio quieter than threshold_db below the peak,
    in 20 ms frames, keeping margin_s of it. A silent waveform becomes empty.

    A voice prompt that ends in silence invites <eos>: in training, an utterance's final
    silence is followed by <eos>, so the AR would stop right after such a prompt."""
    frame = valle.SAMPLE_RATE // 50
    if len(wav) < frame:
        return wav
    rms = wav[: len(wav) // frame * frame].view(-1, frame).pow(2).mean(1).sqrt()  # (frames,)
    loud = (rms > rms.max() * 10 ** (threshold_db / 20)).nonzero()
    if len(loud) == 0:
        return wav[:0]
    margin = int(margin_s * valle.SAMPLE_RATE)
    first = max(0, int(loud[0]) * frame - margin) if start else 0
    return wav[first: min(len(wav), (int(loud[-1]) + 1) * frame + margin) if end else len(wav)]


def write_wav(path, wav, sample_rate=valle.SAMPLE_RATE):
    """A (n,) waveform -> 16-bit WAV, atomically."""
    import soundfile as sf
    with cli.atomic(path, "wb") as f:
        sf.write(f, wav.float().clamp(-1, 1).cpu().numpy(), sample_rate, format="WAV",
                 subtype="PCM_16")
