"""
Speed-ups for inference (oneDNN and int8 on a CPU, bf16 and a compiled decode step on a GPU),
applied to a loaded model by swapping its modules, or to decoding by the cache it runs on
(gpt-fast keeps its quantization beside the model the same way). Weights and checkpoints stay as
they are.

    from extras import speedups
    speedups.onednn(ar)          # big fp32 matrix products through oneDNN (sample.py's default on a CPU)
    speedups.quantize_int8(ar)   # int8 weights for the linear layers (sample.py --int8)
    speedups.bf16_linears(ar)    # bf16 weights for a GPU, run under bf16 autocast (--bf16)
    valle.generate(..., cache_class=speedups.FixedShapeCache)  # the step compiled (--compile)

docs/performance.md has what each gives.
"""
from functools import lru_cache

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


# Each shape's buffers (keys and values per layer, validity, the write position), shared by every
# FixedShapeCache of that shape: a compiled step then sees the same tensors at every call, so a
# new cache (the next batch, the next chunk of a long text) neither recompiles nor re-records its
# CUDA graph, and memory stays flat. One decoding at a time uses a shape's buffers.
BUFFERS = {}


class FixedShapeCache(valle.KVCache):
    """valle.KVCache for a compiled decode step, which needs fixed shapes: after the prefill each
    step writes one slot at the tensor `pos` and attends to the whole buffer, its unfilled part
    masked out. On CUDA the step is a CUDA graph, without the launch cost of ~200 small kernels
    (worth it on a GPU; on a CPU it is slower). Lengths are rounded up to a multiple of 256, so
    that few shapes compile; caches of one shape share their buffers (BUFFERS)."""

    def __init__(self, cfg, batch_size, max_len, device=None):
        super().__init__(cfg, batch_size, -(-max_len // 256) * 256, device)
        # inference_mode's tensors cannot be written outside it, nor the others' inside: a key each
        key = (self.shape, str(self.valid.device), torch.is_inference_mode_enabled())
        if key not in BUFFERS:
            BUFFERS[key] = {"valid": self.valid, "pos": torch.zeros(1, dtype=torch.long, device=device)}
        self.buffers = BUFFERS[key]
        self.valid = self.buffers["valid"].zero_()  # the last cache's tokens are gone
        self.slots = None  # after the prefill: what the compiled step writes through (Slots)

    def step(self, model, new, pos):
        if self.length >= self.max_len:  # index_copy_ past the end would fail on the device
            raise RuntimeError(f"KV cache is full ({self.max_len} slots)")
        if self.slots is None:  # the first step, after the prefill: the shapes are fixed from here
            self.slots = Slots(self)
        # a copy with strides of its own: a view's, even .contiguous() at B=1, would recompile
        new = new.clone(memory_format=torch.contiguous_format)  # (B, 1, G)
        logits = compiled_step(new.device.type)(model, new, pos, self.slots)
        self.length += 1  # counted here, outside the graph, where a Python int is no guard
        return logits

    def update(self, layer, k, v):
        if self.k[layer] is None:  # this shape's buffers for the layer, in k's dtype
            key = (self.shape, layer, str(k.device), k.dtype, torch.is_inference_mode_enabled())
            if key not in BUFFERS:
                BUFFERS[key] = [torch.zeros(self.shape, device=k.device, dtype=k.dtype) for _ in "kv"]
            self.k[layer], self.v[layer] = BUFFERS[key]
        return super().update(layer, k, v)


class Slots:
    """A FixedShapeCache after its prefill, as the compiled step sees it: each call writes one
    slot at the tensor `pos` (then moves it on, in place) and attends to the whole buffer. One
    class whatever the cache's own (batched.reporting subclasses it anew for every batch), so
    that the compiled step's guard on the type of its argument holds from batch to batch."""

    def __init__(self, cache):
        self.k, self.v, self.valid = cache.k, cache.v, cache.valid
        self.pos = cache.buffers["pos"].fill_(cache.length)  # (1,): the slot the next step writes
        for t in [*self.k, *self.v, self.valid, self.pos]:  # CUDA graphs replay on these
            mark_static(t)

    def mask(self, valid, causal):
        self.valid.index_copy_(1, self.pos, valid)  # one query: every filled slot is its past
        return self.valid[:, None, None, :]

    def update(self, layer, k, v):
        self.k[layer].index_copy_(2, self.pos, k)
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer], self.v[layer]

    def advance(self, n):
        self.pos += n  # in place: a CUDA graph replays on this tensor (the cache counts length)


def mark_static(t):
    """torch._dynamo.mark_static_address without a guard on the tensor where PyTorch allows it
    (before 2.10 the default guards, and a new tensor recompiled)."""
    try:
        torch._dynamo.mark_static_address(t, guard=False)
    except TypeError:  # a PyTorch without the argument
        torch._dynamo.mark_static_address(t)


def decode_step(model, new, pos, cache):
    """One decode step, the model called on the cache (valle.KVCache.step; a FixedShapeCache's
    Slots), to compile."""
    return model(new, pos, cache)


def compile_missing(*device_types):
    """Why torch.compile cannot build its kernels here for these device types, in one line, or
    None when it can. Inductor's CPU kernels (a CPU decode step, or the CPU arithmetic inside
    a compiled training forward on a GPU) need a C++ compiler; CUDA kernels need Triton, and a C
    compiler and Python's headers to build Triton's launcher. A bare CUDA image may have none."""
    import importlib.util
    import os
    import shutil
    import sysconfig
    missing = []
    if "cpu" in device_types:
        try:  # the search Inductor itself makes ($CXX, else g++)
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
        except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or a PyTorch without the function
            missing.append(f"a C++ compiler ({os.environ.get('CXX', 'g++')}, or set $CXX) for its "
                           "CPU kernels")
    if "cuda" in device_types:
        if importlib.util.find_spec("triton") is None:
            missing.append("Triton (pip install triton) for its GPU kernels")
        else:
            cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
            if not cc:
                missing.append("a C compiler (gcc or clang, or set $CC) for Triton's launcher")
            if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
                missing.append(f"Python's headers (Python.h, in {sysconfig.get_paths()['include']}) "
                               "for Triton's launcher")
    return f"torch.compile needs {' and '.join(missing)}: not found here" if missing else None


@lru_cache(maxsize=None)
def compiled_step(device_type):
    """decode_step compiled for a FixedShapeCache (a CUDA graph on CUDA)."""
    mode = "reduce-overhead" if device_type == "cuda" else "default"
    return torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
