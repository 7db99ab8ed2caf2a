"""The prompt encoder: umT5-XXL from Wan's own .pth, run by transformers' UMT5EncoderModel.

The .pth is opened with torch.load(weights_only=True, mmap=True): no unpickling of code, and no copy of the
11.4 GB of weights (the pages are mapped from disk). Its keys are renamed (keymaps.t5_wan_to_hf) and the
model config is read off the tensor shapes, so the real encoder and the toy one load through the same code.

It runs on the CPU by default, so on 24 GB cards it takes no GPU memory, and prompt embeddings are cached on
disk by a hash of (encoder file, precision, prompt): a prompt is encoded once per machine.
precision="int8" stores every Linear as int8 per output channel (weight-only, qavatar's QuantLinear): 6.7 GB
of RAM instead of 11.4 GB (the token embedding stays bf16); activations are untouched, as T5's have outliers.
Padding is not needed: keys past the prompt are masked in the reference, so running the unpadded tokens gives
the same states.
"""
from __future__ import annotations

import hashlib
import html
import os
import pickle
import re
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError, ConfigError, first_sentence
from .keymaps import t5_wan_to_hf

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = Path("google") / "umt5-xxl"
T5_PRECISIONS = ("bf16", "int8")


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy (when installed), HTML entities twice, collapsed whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def cache_dir() -> Path:
    """$QAVATAR_CACHE, else $XDG_CACHE_HOME/qavatar, else ~/.cache/qavatar."""
    root = os.environ.get("QAVATAR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qavatar"
    return Path(root)


def load_wan_t5_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or corrupt zip, a missing file, a pickle needing code...
        if isinstance(e, pickle.UnpicklingError) and str(e).startswith("Weights only load failed"):
            raise CheckpointError(f"{path}: not a loadable umT5 checkpoint: it holds Python objects besides tensors, "
                                  f"which qavatar does not unpickle (weights_only: no code from a weights file is "
                                  f"run); use Wan's original umT5 file") from None
        raise CheckpointError(f"{path}: not a loadable umT5 checkpoint ({e.__class__.__name__}: "
                              f"{first_sentence(e)}); re-download it") from None
    if not isinstance(state, dict) or "token_embedding.weight" not in state:
        raise CheckpointError(f"{path}: has no token_embedding.weight; not Wan's umT5 encoder file")
    return state


def umt5_config(state: dict[str, torch.Tensor]):
    """transformers UMT5Config read off the shapes of Wan's T5 state dict."""
    from transformers import UMT5Config

    vocab, d_model = state["token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=state["blocks.0.attn.q.weight"].shape[0] // heads,
                      d_ff=state["blocks.0.ffn.fc1.weight"].shape[0], num_layers=layers, num_heads=heads,
                      relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False)


def umt5_from_wan(state: dict[str, torch.Tensor]):
    """A UMT5EncoderModel holding Wan's tensors (assigned, not copied)."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config(state))
    mapped = {}
    for k, v in state.items():
        for hf in t5_wan_to_hf(k):
            mapped[hf] = v
    want = set(model.state_dict())
    missing, extra = sorted(want - set(mapped)), sorted(set(mapped) - want)
    if missing or extra:
        raise CheckpointError(f"umT5 key map mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(mapped, assign=True, strict=True)
    return model.eval()


class TextEncoder:
    """prompt -> [L, text_dim] states (L = prompt tokens incl. </s>, at most text_len)."""

    def __init__(self, root: "str | Path", text_len: int = 512, device: str = "cpu",
                 dtype: Optional[torch.dtype] = None, use_cache: bool = True, precision: str = "bf16"):
        if precision not in T5_PRECISIONS:
            raise ConfigError(f"umT5 precision must be one of {', '.join(T5_PRECISIONS)}, not {precision!r}")
        root = Path(root)
        self.path, self.tokenizer_dir = root / T5_FILE, root / TOKENIZER_DIR
        for p, what in ((self.path, "umT5 encoder"), (self.tokenizer_dir, "umT5 tokenizer")):
            if not p.exists():
                raise CheckpointError(f"{root}: missing the {what} ({p.relative_to(root)})")
        self.text_len, self.device, self.dtype, self.use_cache = text_len, device, dtype, use_cache
        self.precision = precision
        self._model = None
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from .hf_files import load_error

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
            except Exception as e:  # JSONDecodeError, TypeError, OSError...: name the file
                raise load_error(self.tokenizer_dir, "umT5 tokenizer", e) from None
        return self._tokenizer

    def _cache_key(self, prompt: str) -> str:
        st = self.path.stat()
        ident = f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.text_len}|{self.precision}|{prompt}"
        return hashlib.sha256(ident.encode()).hexdigest()

    def model(self):
        if self._model is None:
            m = umt5_from_wan(load_wan_t5_state(self.path))
            if self.dtype is not None:
                m = m.to(self.dtype)
            if self.precision == "int8":
                from ..quant import QuantConfig
                from ..quant.api import quantize_

                # layer by layer: each bf16 weight is read from the mapped file once, then dropped
                quantize_(m, QuantConfig("int8-wo"), filter_fn=lambda mod, name: True)
            self._model = m.to(self.device)
        return self._model

    @torch.no_grad()
    def encode_uncached(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(clean_prompt(prompt), truncation=True, max_length=self.text_len,
                             add_special_tokens=True, return_tensors="pt").input_ids
        out = self.model()(input_ids=ids.to(self.device)).last_hidden_state[0]
        return out.float().cpu()

    def encode(self, prompt: str) -> torch.Tensor:
        if not self.use_cache:
            return self.encode_uncached(prompt)
        from safetensors.torch import load_file

        from ..checkpoint.writer import save_file_atomic

        path = cache_dir() / "prompts" / f"{self._cache_key(prompt)}.safetensors"
        if path.is_file():
            try:
                return load_file(path)["context"]
            except Exception:  # a damaged cache entry is re-encoded, never trusted
                pass
        states = self.encode_uncached(prompt)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file_atomic(path, {"context": states.contiguous()})
        except OSError:  # a read-only cache costs time, not correctness
            pass
        return states

    def release(self) -> None:
        self._model = None
