"""Key maps between Wan's own checkpoint files and the transformers / diffusers classes that run them.

umT5-XXL (`models_t5_umt5-xxl-enc-bf16.pth`, Wan's T5Encoder) -> transformers UMT5EncoderModel:
    token_embedding                      shared (tied with encoder.embed_tokens)
    blocks.i.norm1 / norm2               encoder.block.i.layer.0 / layer.1 .layer_norm
    blocks.i.attn.{q,k,v,o}              encoder.block.i.layer.0.SelfAttention.{q,k,v,o}
    blocks.i.pos_embedding.embedding     encoder.block.i.layer.0.SelfAttention.relative_attention_bias
    blocks.i.ffn.gate.0 / fc1 / fc2      encoder.block.i.layer.1.DenseReluDense.wi_0 / wi_1 / wo
    norm                                 encoder.final_layer_norm
  (Wan's FFN is fc2(fc1(x) * gelu(gate(x))); transformers' is wo(gelu(wi_0(x)) * wi_1(x)).)

Wan 2.1 VAE (`Wan2.1_VAE.pth`, WanVAE_) -> diffusers AutoencoderKLWan: the encoder's flat `downsamples.N` list
keeps its index as `down_blocks.N`; the decoder's flat `upsamples.N` list regroups into `up_blocks.L`, each
(num_res_blocks + 1) resnets and then an upsampler; a residual block's Sequential `residual.{0,2,3,6}` is
norm1, conv1, norm2, conv2; `middle.{0,1,2}` is mid_block resnet 0, attention 0, resnet 1; `head.{0,2}` is
norm_out, conv_out; `conv1` is conv_in (inside encoder/decoder) or quant_conv / post_quant_conv (top level).
"""
from __future__ import annotations

import re

_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
             "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
             "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_RESIDUAL_BACK = {v: k for k, v in _RESIDUAL.items()}


# ------------------------------------------------------------------------------------------------ umT5
def t5_wan_to_hf(key: str) -> list[str]:
    """The transformers UMT5EncoderModel key(s) for one key of Wan's T5 encoder."""
    if key == "token_embedding.weight":
        return ["shared.weight", "encoder.embed_tokens.weight"]
    if key == "norm.weight":
        return ["encoder.final_layer_norm.weight"]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if not m:
        raise KeyError(f"unknown umT5 key {key!r}")
    i, rest = m.groups()
    table = {"norm1.weight": "layer.0.layer_norm.weight", "norm2.weight": "layer.1.layer_norm.weight",
             "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
             "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
             "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
             "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
    a = re.fullmatch(r"attn\.(q|k|v|o)\.weight", rest)
    if a:
        return [f"encoder.block.{i}.layer.0.SelfAttention.{a.group(1)}.weight"]
    if rest not in table:
        raise KeyError(f"unknown umT5 key {key!r}")
    return [f"encoder.block.{i}.{table[rest]}"]


def t5_hf_to_wan(key: str) -> str | None:
    """The inverse; None for transformers' tied duplicate of the embedding."""
    if key == "encoder.embed_tokens.weight":
        return None
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
    if not m:
        raise KeyError(f"unknown UMT5 key {key!r}")
    for wan in (f"blocks.{m.group(1)}.{r}" for r in ("norm1.weight", "norm2.weight", "pos_embedding.embedding.weight",
                                                      "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight",
                                                      "attn.q.weight", "attn.k.weight", "attn.v.weight",
                                                      "attn.o.weight")):
        if t5_wan_to_hf(wan) == [key]:
            return wan
    raise KeyError(f"unknown UMT5 key {key!r}")


# ------------------------------------------------------------------------------------------------ VAE
def vae_diffusers_to_wan(key: str, num_res_blocks: int = 2) -> str:
    """The Wan2.1_VAE.pth key of one diffusers AutoencoderKLWan key."""
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    head, _, rest = key.partition(".")
    if head in top:
        return f"{top[head]}.{rest}"
    part, _, rest = rest.partition(".")
    if part == "conv_in":
        return f"{head}.conv1.{rest}"
    if part == "conv_out":
        return f"{head}.head.2.{rest}"
    if part == "norm_out":
        return f"{head}.head.0.{rest}"
    if part == "mid_block":
        kind, idx, leaf = re.fullmatch(r"(resnets|attentions)\.(\d+)\.(.+)", rest).groups()
        if kind == "attentions":
            return f"{head}.middle.1.{leaf}"
        return f"{head}.middle.{2 * int(idx)}.{_RESIDUAL_BACK[leaf]}"
    if part == "down_blocks":  # same flat index; residual names change, resample/time_conv do not
        idx, leaf = re.fullmatch(r"(\d+)\.(.+)", rest).groups()
        return f"{head}.downsamples.{idx}.{_RESIDUAL_BACK.get(leaf, leaf)}"
    if part == "up_blocks":
        level, kind, j, leaf = re.fullmatch(r"(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", rest).groups()
        per_level = num_res_blocks + 2  # num_res_blocks + 1 resnets, then the upsampler
        if kind == "upsamplers":
            return f"{head}.upsamples.{int(level) * per_level + num_res_blocks + 1}.{leaf}"
        return f"{head}.upsamples.{int(level) * per_level + int(j)}.{_RESIDUAL_BACK[leaf]}"
    raise KeyError(f"unknown AutoencoderKLWan key {key!r}")


def vae_wan_to_diffusers(keys: list[str], num_res_blocks: int = 2) -> dict[str, str]:
    """{Wan key: diffusers key} for the keys of a diffusers model (the map is one-to-one)."""
    return {vae_diffusers_to_wan(k, num_res_blocks): k for k in keys}
