"""Tiny random encoders in the real files' formats, written next to a toy DiT (checkpoint/toy.py).

    Wan2.1_VAE.pth                        Wan 2.1 VAE, Wan's keys (same tree as the real one, base_dim 8)
    models_t5_umt5-xxl-enc-bf16.pth       umT5 encoder, Wan's keys, bf16 (2 layers, d_model = text_dim)
    google/umt5-xxl/                      a SentencePiece-style (Unigram, metaspace) tokenizer.json
    wav2vec2-large-xlsr-53-english/       Wav2Vec2ForCTC in the large model's layout (stable layer norm,
                                          the real conv strides, so 50 Hz), hidden audio_dim, 24 layers

They load through exactly the code that loads the real files; their weights are random.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

from ..model import ModelConfig
from .audio_encoder import WAV2VEC_DIR
from .keymaps import t5_hf_to_wan, vae_diffusers_to_wan
from .text_encoder import T5_FILE, TOKENIZER_DIR
from .vae import VAE_FILE

_WORDS = ("a the and of in to is with on at person woman man face talking speaking smiling portrait looking "
          "camera studio light background natural realistic video young old hair eyes mouth head calm").split()


def write_toy_tokenizer(out: Path) -> int:
    """A Unigram tokenizer shaped like umT5's (pad 0, </s> 1, <unk> 2, metaspace); returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in _WORDS]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    fast.save_pretrained(str(out))
    return len(pieces)


def toy_t5_state(cfg: ModelConfig, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    heads = 4
    model = UMT5EncoderModel(UMT5Config(vocab_size=vocab, d_model=cfg.text_dim, d_kv=cfg.text_dim // heads,
                                        d_ff=2 * cfg.text_dim, num_layers=2, num_heads=heads,
                                        feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    out = {}
    for k, v in model.state_dict().items():
        wan = t5_hf_to_wan(k)
        if wan is not None:
            out[wan] = v.to(torch.bfloat16).clone()
    return out


def toy_vae_state(seed: int) -> dict[str, torch.Tensor]:
    from ..quiet import quiet_bitsandbytes

    with quiet_bitsandbytes():  # diffusers imports bitsandbytes, which logs on import
        from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                             temperal_downsample=[False, True, True])
    return {vae_diffusers_to_wan(k, 2): v.clone() for k, v in model.state_dict().items()}


def write_toy_wav2vec2(out: Path, cfg: ModelConfig, seed: int) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()

    torch.manual_seed(seed)
    config = Wav2Vec2Config(hidden_size=cfg.audio_dim, num_hidden_layers=cfg.num_wav2vec_layers - 1,
                            num_attention_heads=2, intermediate_size=2 * cfg.audio_dim, conv_dim=(16,) * 7,
                            feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4, vocab_size=32)
    Wav2Vec2ForCTC(config).save_pretrained(str(out))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(str(out))


def write_toy_encoders(dit_dir: Path, cfg: ModelConfig, seed: int = 0) -> None:
    dit_dir = Path(dit_dir)
    with torch.random.fork_rng():  # seeded construction must not disturb the caller's RNG
        vocab = write_toy_tokenizer(dit_dir / TOKENIZER_DIR)
        torch.save(toy_t5_state(cfg, vocab, seed + 11), dit_dir / T5_FILE)
        torch.save(toy_vae_state(seed + 12), dit_dir / VAE_FILE)
        write_toy_wav2vec2(dit_dir / WAV2VEC_DIR, cfg, seed + 13)
