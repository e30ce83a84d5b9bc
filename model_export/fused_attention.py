"""Export the foundation's unmasked attention as onnxruntime's fused `com.microsoft::MultiHeadAttention`.

    diffprompt export --pipeline ... --attention fused    # the default; --attention plain: MatMul + Softmax

Exported as it is, `Attention` (training/models/grounding.py) becomes MatMul -> Softmax -> MatMul:
onnxruntime then holds every head's full score matrix at once, (B, H, N, N) floats and the
Softmax output beside it; for OWLv2 B/16 at 960 px (N = 3601, 12 heads) 622 MB each, per layer and
batch item. onnxruntime's contrib operator MultiHeadAttention takes q, k, v as (B, N, D) and the
head count as an attribute; its CPU kernel (float32, no mask, no attention bias, no past state)
runs a flash-attention loop over blocks sized to the L2 cache and never stores the whole score
matrix (where onnxruntime knows the L2 cache size; otherwise, or with the environment variable
ORT_DISABLE_FLASH_ATTENTION=1, the kernel computes the full scores, as the plain graph does).
docs/results.md ("Attention export: plain vs fused") measures both.

`fused_attention(module)` is used only while exporting: inside it, every `Attention` of `module`
called without an attention bias (the vision tower: the image tokens and its deep prompts) runs
through `MultiHeadAttentionOp`, which computes exactly what `Attention` does in PyTorch (the same
`scaled_dot_product_attention`) and exports as the contrib node. Attention with a bias (the text
tower: causal + padding over 16 tokens) stays plain. The prompt DiT's attentions (self-attention
over the latent tokens, cross-attention to the condition tokens with its key bias) go through the
same operator, the bias as its `attention_bias` input: at the embedded default's size a DiT step is
mostly per-node overhead, and one node replaces the ~25 of an exported head split, scaled
dot-product and head merge. Training and evaluation never enter it.

Who runs the node: onnxruntime's CPU and CUDA providers (any onnxruntime build has the contrib
operators). TensorRT does not know the com.microsoft domain; onnxruntime then runs that node on
the next provider in the list (CUDA, else CPU) and the rest of the graph in TensorRT. Plain
`onnx` tools that do not know the domain (onnx.checker's shape inference, other runtimes) cannot
run such a graph: export with --attention plain for those.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from diffprompt.training.models import prompt_dit
from diffprompt.training.models.grounding import Attention

ATTENTION_MODES = ("plain", "fused")  # --attention
DEFAULT_ATTENTION = "fused"
CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_OPSET = {CONTRIB_DOMAIN: 1}  # torch.onnx.export(custom_opsets=...)


def _absent(g):
    """An omitted optional input of an ONNX node."""
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


class MultiHeadAttentionOp(torch.autograd.Function):
    """softmax(q k^T / sqrt(D/H) + bias) v per head; exports as com.microsoft::MultiHeadAttention.

    q (B, N, D), k, v (B, S, D), heads laid out along D as `Attention` splits them; bias None or
    (B, 1, 1, S) additive over the keys -> (B, N, D).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = q.shape
        heads = lambda t: t.view(B, t.shape[1], num_heads, D // num_heads).transpose(1, 2)  # (B, H, *, D/H)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias)
        return out.transpose(1, 2).reshape(B, N, D)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int, bias=None):
        # scale: the operator's default, 1 / sqrt(head size), as scaled_dot_product_attention's
        inputs = [q, k, v]
        if bias is not None and not (hasattr(bias, "node") and bias.node().mustBeNone()):
            # attention_bias (input 5) is (B, 1, N, S): the key bias repeated over the N queries
            shape = g.op("Concat", g.op("Shape", bias, end_i=2), g.op("Shape", q, start_i=1, end_i=2),
                         g.op("Shape", bias, start_i=3), axis_i=0)
            inputs += [_absent(g), _absent(g), g.op("Expand", bias, shape)]
        out = g.op(f"{CONTRIB_DOMAIN}::MultiHeadAttention", *inputs, num_heads_i=num_heads)
        out.setType(q.type())  # (B, N, D) as q: the exporter's shape inference does not know the operator
        return out


def _fused_forward(self: Attention, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
    """`Attention.forward` with the head split, attention and head merge in one operator."""
    if attn_bias is not None:  # the text tower's causal + padding bias: plain attention
        return Attention.forward(self, x, attn_bias)
    out = MultiHeadAttentionOp.apply(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
    return self.out_proj(out)


def _fused_dit_forward(self: prompt_dit.Attention, x: torch.Tensor, context: torch.Tensor | None = None,
                       key_bias: torch.Tensor | None = None, kv: torch.Tensor | None = None) -> torch.Tensor:
    """`prompt_dit.Attention.forward` (self- or cross-attention, precomputed keys/values) in one operator."""
    if kv is None:
        kv = self.kv(x if context is None else context)  # (B, S, 2D): keys, then values
    k, v = kv.chunk(2, dim=-1)
    return self.proj(MultiHeadAttentionOp.apply(self.q(x), k.contiguous(), v.contiguous(), self.num_heads, key_bias))


@contextlib.contextmanager
def fused_attention(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While inside: `module`'s unmasked foundation `Attention`s and every prompt-DiT attention export as
    MultiHeadAttention (a no-op if not `enabled`)."""
    patched = []
    if enabled:
        for m in module.modules():
            if isinstance(m, Attention):
                patched.append((m, _fused_forward))
            elif isinstance(m, prompt_dit.Attention):
                patched.append((m, _fused_dit_forward))
    for m, forward in patched:
        m.forward = types.MethodType(forward, m)  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for m, _ in patched:
            del m.forward


def check_attention_mode(mode: str) -> str:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {list(ATTENTION_MODES)}, got {mode!r}")
    return mode
