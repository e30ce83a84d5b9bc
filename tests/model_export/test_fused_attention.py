"""`diffprompt export --attention fused|plain`: the vision tower's attention as onnxruntime's MultiHeadAttention.

The fused graphs hold com.microsoft::MultiHeadAttention where the vision tower had MatMul + Softmax
(the text tower, with its causal + padding bias, stays plain), give PyTorch's outputs in onnxruntime,
and load and answer in the torch-free runtime like plain graphs; PyTorch itself is untouched.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from diffprompt.core.manifest import validate_artifact
from diffprompt.core.providers import ProviderConfig
from diffprompt.core.runtime import GroundingRuntime
from diffprompt.model_export.export import build_parser, main
from diffprompt.model_export.fused_attention import (
    ATTENTION_MODES,
    DEFAULT_ATTENTION,
    MultiHeadAttentionOp,
    fused_attention,
)
from diffprompt.training.models.diffprompt import DiffPromptPipeline
from diffprompt.training.models.grounding import Attention

ort = pytest.importorskip("onnxruntime")
CPU = ProviderConfig(preferred=("cpu",))
FOUNDATION_GRAPHS = ("condition_encoder", "grounding")  # the graphs that run the foundation


@pytest.fixture(scope="module")
def pair(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline exported with each attention mode: {"plain": dir, "fused": dir}."""
    out = tmp_path_factory.mktemp("attention")
    for mode in ATTENTION_MODES:
        assert main(build_parser().parse_args(["--pipeline", str(tiny_pipeline_dir), "--steps", "3", "--out",
                                               str(out / mode), "--name", "tiny", "--attention", mode,
                                               "--threads", "1", "--no-progress"])) == 0
    return {mode: out / mode / "tiny-3steps" for mode in ATTENTION_MODES}


def _nodes(path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def _in_tower(node: onnx.NodeProto, tower: str) -> bool:
    return f"/{tower}/" in node.name  # the exporter names nodes by module path: /foundation/vision_model/...


def _in_dit(node: onnx.NodeProto) -> bool:
    return node.name.startswith(("/context_blocks.", "/blocks.", "/dit/"))  # the prompt DiT's modules


def test_the_parser_offers_the_modules_modes_and_default():
    action = next(a for a in build_parser()._actions if a.dest == "attention")
    assert sorted(action.choices) == sorted(ATTENTION_MODES) and action.default == DEFAULT_ATTENTION


def test_fused_graphs_run_the_vision_attention_as_one_contrib_node(pair, tiny_pipeline_dir):
    layers = DiffPromptPipeline.from_pretrained(tiny_pipeline_dir).foundation.config.vision.num_hidden_layers
    for graph in FOUNDATION_GRAPHS:
        fused, plain = _nodes(pair["fused"] / f"{graph}.onnx"), _nodes(pair["plain"] / f"{graph}.onnx")
        mha = [n for n in fused if n.op_type == "MultiHeadAttention" and not _in_dit(n)]
        assert len(mha) == layers and all(n.domain == "com.microsoft" and _in_tower(n, "vision_model") for n in mha)
        assert not [n for n in fused if n.op_type == "Softmax" and _in_tower(n, "vision_model")], graph
        assert [n for n in fused if n.op_type == "Softmax" and _in_tower(n, "text_model")], graph  # text: plain
        assert [n for n in plain if n.op_type == "Softmax" and _in_tower(n, "vision_model")], graph
        assert not [n for n in plain if n.domain == "com.microsoft"], graph
    assert validate_artifact(pair["fused"], True).attention == "fused"
    assert validate_artifact(pair["plain"], True).attention == "plain"


def test_fused_graphs_match_pytorch_and_the_plain_graphs(pair, tiny_pipeline_dir):
    """Within the parity tolerance of tests/model_export/test_export_runtime.py, through the runtime."""
    assert max(validate_artifact(pair["fused"], False).export_max_abs_diff.values()) < 1e-3
    pipeline = DiffPromptPipeline.from_pretrained(tiny_pipeline_dir, steps=3)
    ids, mask = pipeline.tokenizer(["the red circle", "the second star from the left"])
    pixels = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    seeds = [5, 6]
    got = {mode: GroundingRuntime.load(d, CPU).ground(pixels.numpy(), ids, mask, seeds) for mode, d in pair.items()}
    out, _ = pipeline(pixels, torch.from_numpy(ids).long(), torch.from_numpy(mask).long(), seeds)
    np.testing.assert_allclose(got["fused"].boxes, out.pred_boxes.numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got["fused"].boxes, got["plain"].boxes, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got["fused"].scores, got["plain"].scores, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got["fused"].mask_logits, got["plain"].mask_logits, rtol=1e-3, atol=1e-4)


def test_the_dits_attentions_are_one_node_each_in_the_fused_graphs(pair, tiny_pipeline_dir):
    """The denoiser: a self- and a cross-attention node per DiT block (the cross one with the key bias as
    its attention_bias) and no Softmax left; the condition encoder: one node per context block."""
    dit = DiffPromptPipeline.from_pretrained(tiny_pipeline_dir).dit
    denoiser = _nodes(pair["fused"] / "denoiser.onnx")
    mha = [n for n in denoiser if n.op_type == "MultiHeadAttention"]
    assert len(mha) == 2 * dit.config.depth and not [n for n in denoiser if n.op_type == "Softmax"]
    assert sum(len(n.input) == 6 and n.input[5] != "" for n in mha) == dit.config.depth  # cross: with the bias
    assert [n for n in _nodes(pair["plain"] / "denoiser.onnx") if n.op_type == "Softmax"]
    context = [n for n in _nodes(pair["fused"] / "condition_encoder.onnx")
               if n.op_type == "MultiHeadAttention" and _in_dit(n)]
    assert len(context) == dit.config.context_layers
    assert len(denoiser) < len(_nodes(pair["plain"] / "denoiser.onnx"))


def test_fused_dit_attention_computes_what_it_does_in_pytorch(tiny_pipeline_dir):
    """Self-attention, cross-attention with a key bias (masked keys) and precomputed keys/values."""
    dit = DiffPromptPipeline.from_pretrained(tiny_pipeline_dir).dit.eval()
    block = dit.blocks[0]
    D = dit.config.hidden_size
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, D, generator=g), torch.randn(2, 6, D, generator=g)
    key_bias = torch.zeros(2, 1, 1, 6)
    key_bias[1, ..., 4:] = -1e4  # the second sample's last two keys are padding
    kv = block.cross_attn.kv(context)
    with torch.no_grad():
        want = (block.attn(x), block.cross_attn(x, context, key_bias), block.cross_attn(x, None, key_bias, kv))
        with fused_attention(dit):
            got = (block.attn(x), block.cross_attn(x, context, key_bias), block.cross_attn(x, None, key_bias, kv))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not any("forward" in vars(m) for m in dit.modules())


def test_fused_attention_computes_what_attention_does_and_leaves_the_module_as_it_was(tiny_pipeline_dir):
    foundation = DiffPromptPipeline.from_pretrained(tiny_pipeline_dir).foundation.eval()
    attention = foundation.vision_model.encoder.layers[0].self_attn
    x = torch.randn(2, 7, attention.q_proj.in_features, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(2, 1, 7, 7)
    with torch.no_grad():
        want = attention(x, None)
        with fused_attention(foundation):
            assert "forward" in vars(attention)
            got, got_bias = attention(x, None), attention(x, bias)
        after = attention(x, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_bias, want, rtol=1e-5, atol=1e-6)  # a bias: Attention's own forward
    assert torch.equal(after, want)
    assert not any("forward" in vars(m) for m in foundation.modules() if isinstance(m, Attention))
    q = torch.randn(1, 5, 8)
    torch.testing.assert_close(MultiHeadAttentionOp.apply(q, q, q, 2).shape, q.shape)


def test_fp16_keeps_the_contrib_node_in_float16(tiny_pipeline_dir, tmp_path):
    """onnxruntime's float16 converter converts MultiHeadAttention too (CUDA has a float16 kernel)."""
    assert main(build_parser().parse_args(["--pipeline", str(tiny_pipeline_dir), "--steps", "3", "--out",
                                           str(tmp_path), "--name", "tiny", "--precision", "fp16",
                                           "--attention", "fused", "--threads", "1", "--no-progress"])) == 0
    d = tmp_path / "tiny-3steps"
    model = onnx.load(str(d / "grounding.onnx"), load_external_data=False)
    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert mha
    produced_by_cast = {o: n for n in model.graph.node if n.op_type == "Cast" for o in n.output}
    # no float32 island: the node's inputs are not cast back up to float32 around it
    assert not any(i in produced_by_cast and produced_by_cast[i].attribute[0].i == onnx.TensorProto.FLOAT
                   for n in mha for i in n.input)
    assert max(validate_artifact(d, False).export_max_abs_diff.values()) < 0.5  # as the plain fp16 test
