"""
Speed-ups for inference (oneDNN and int8 on a CPU, bf16 on a GPU), applied to a loaded model by swapping its modules (gpt-fast keeps
its quantization beside the model the same way). The weights and checkpoints stay as they are.

    from extras import speedups
    speedups.onednn(ar)          # big fp32 matrix products through oneDNN (sample.py's default on a CPU)
    speedups.quantize_int8(ar)   # int8 weights for the linear layers (sample.py --int8)
    speedups.bf16_linears(ar)    # bf16 weights for a GPU, run under bf16 autocast (--bf16)

docs/performance.md has what each gives.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import valle

# A decode step streams every weight from memory once. On the CPU, PyTorch's default fp32 kernel
# reads them with one core, oneDNN with all: same maths, faster steps. PyTorch's own switch
# turns it off: torch.backends.mkldnn.enabled = False (bench.py compares the two).
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_MIN_WEIGHT = 2**18  # elements (1 MB in fp32): below this, oneDNN's per-call cost wins


def linear(x, weight, bias=None):
    """F.linear, through oneDNN for big fp32 weights on the CPU when no gradient is needed.

    Not inside torch.compile, which chooses its own kernels, nor under autocast, which casts
    only F.linear's inputs to bf16."""
    if (not torch.compiler.is_compiling() and ONEDNN and torch.backends.mkldnn.enabled
            and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.numel() >= ONEDNN_MIN_WEIGHT and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """nn.Linear (the same parameters) whose inference on the CPU goes through `linear`."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class OneDNNHead(valle.TiedHead):
    """valle.TiedHead through `linear`: the tied heads are the biggest matrix products of a
    decode step (1025 or 1024 codes x d)."""

    def forward(self, h, weight):
        with valle.fp32(h.device):
            return linear(h.float(), weight.float())


def swap(model, replace):
    """Replace, in place, every submodule for which replace(module) returns a new one."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            new = replace(child)
            if new is not None:
                setattr(parent, name, new)
    return model


def onednn(model):
    """Every nn.Linear and tied head of `model` through oneDNN, sharing their parameters.
    Returns model."""
    def replace(m):
        if type(m) is nn.Linear:
            new = OneDNNLinear(m.in_features, m.out_features, m.bias is not None, device="meta")
            new.weight, new.bias = m.weight, m.bias
            return new
        return OneDNNHead() if type(m) is valle.TiedHead else None
    return swap(model, replace)


def quantize_int8(model):
    """Inference on the CPU with int8 weights: every linear layer of the transformer blocks (and
    the AR's group layers) becomes PyTorch's dynamically quantized Linear, in place (weights int8
    per output channel; activations quantized on the fly; the same fp32 in and out). Returns how
    many layers it converted.

    A decode step reads every weight once, so a quarter of the bytes makes the AR's steps faster;
    the NAR's big matrix products are compute-bound and gain little on a CPU without int8 dot
    instructions (docs/performance.md). Conversion is explicit: torch.ao's quantize_dynamic
    matches module types exactly and would skip OneDNNLinear. The tied code-prediction heads stay
    fp32 (onednn reaches them): they are the code embedding table itself, which the inputs also
    read."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig
    converted = []

    def replace(m):
        if not isinstance(m, nn.Linear):
            return None
        plain = nn.Linear(m.in_features, m.out_features, m.bias is not None)
        plain.load_state_dict(m.state_dict())
        plain.qconfig = per_channel_dynamic_qconfig  # a scale per output channel
        converted.append(m)
        return Int8Linear.from_float(plain)
    swap(model, replace)
    return len(converted)


def bf16_linears(model):
    """Inference in bf16 (run it under torch.autocast(..., dtype=torch.bfloat16)): the linear
    layers' weights become bf16, in place, so that a decode step reads 2 bytes per weight and
    casts none (autocast over fp32 weights would cast them again in every compiled step).
    Norms, embeddings, the residual stream and the logits (head) stay fp32. Returns model."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.to(torch.bfloat16)
    return model
