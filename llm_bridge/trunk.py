"""Late prefix on a cached frozen trunk: the prefix enters at decoder layer k, not at the input embeddings.

Below layer k the backbone never sees the prefix, so the hidden states entering layer k depend on the token
ids alone. They are computed once per distinct token sequence (a MovieLens movie prompt, a LaMP question) under
``no_grad`` and kept in a :class:`TrunkCache`; training, evaluation and serving then run only layers k..N-1:

    tokens ──► embed ──► layers[0:k]  (frozen, cached per sequence)  ──► S (T, d)
    [P | S] ──► layers[k:N] (+ bridge LoRA) ──► norm ──► lm_head       positions 0..L-1 | L..L+T-1

Positions are those of the input-level layout (prefix at 0..L-1, tokens from L), so k = 0 is exactly the
paper's input-level prefix and RoPE stays consistent in the upper layers.

Example::

    cache = TrunkCache(lm, k=28, offset=8, fingerprint=fp, max_bytes=2**30)
    states = cache.states([[12, 7, 99], [12, 7]])           # [(3, d), (2, d)]
    h = run_layers(lm, torch.cat([prefix, padded], 1), mask, start=28)   # (B, L+T, d), final norm applied
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class TrunkCacheError(RuntimeError):
    """A trunk cache used under another backbone, task LoRA or prefix layer than it was built for."""


def decoder(lm):
    """(inner decoder with .layers/.norm/.rotary_emb/.embed_tokens, lm_head) of a (peft-wrapped) causal LM."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return base.model, base.lm_head


def num_layers(lm) -> int:
    return len(decoder(lm)[0].layers)


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) 1/0 key mask -> (B, 1, S, S) additive causal mask (0 where allowed, dtype-min elsewhere).

    A (B, S, S) boolean mask of allowed (query, key) pairs is taken as is (no causal mask added)."""
    if attention_mask.dim() == 3:
        allowed = attention_mask.bool()
    else:
        s = attention_mask.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()  # (S, S)
        allowed = causal[None, :, :] & attention_mask.bool()[:, None, :]  # (B, S, S)
    out = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (B, 1, S, S)


def run_layers(lm, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int = 0, end: int | None = None,
               offset: int = 0, final_norm: bool = True, query_pos: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Run decoder layers ``start..end-1`` on ``hidden`` (B, S, d) at positions ``offset..offset+S-1``.

    ``attention_mask``: (B, S) key mask (causal attention added), or (B, S, S) allowed (query, key) pairs used
    as is (a packed sequence, e.g. label-set scoring's tree of continuations); ``position_ids`` (B, S) then
    gives each position's RoPE position (``offset`` is added).
    ``final_norm`` applies the model's last RMSNorm when ``end`` is the last layer (the input of lm_head).
    ``query_pos`` (B, Q) names the only positions whose output is wanted (e.g. each row's answer position):
    the last layer then computes its queries, attention output and MLP at those positions alone (keys and
    values still at every position; with a (B, S) mask), and the result is (B, Q, d)."""
    inner, _ = decoder(lm)
    end = len(inner.layers) if end is None else end
    b, s, _ = hidden.shape
    if position_ids is None:
        positions = (torch.arange(s, device=hidden.device) + offset)[None].expand(b, s)  # (B, S)
    else:
        positions = position_ids + offset  # (B, S)
    rope = inner.rotary_emb(hidden, position_ids=positions)
    mask = additive_mask(attention_mask, hidden.dtype)
    layers = list(inner.layers[start:end])
    prune = query_pos is not None and attention_mask.dim() == 2 and layers and _prunable(layers[-1])
    for layer in layers[:-1] if prune else layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
    if prune:
        hidden = _last_layer_at(layers[-1], hidden, attention_mask, rope, query_pos)  # (B, Q, d)
    elif query_pos is not None:
        hidden = hidden.gather(1, query_pos[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, Q, d)
    if final_norm and end == len(inner.layers):
        hidden = inner.norm(hidden)
    return hidden


def _prunable(layer) -> bool:
    """A plain Llama-style layer (pre-norm attention + MLP, q/k/v/o projections, no q/k norms)."""
    attn = getattr(layer, "self_attn", None)
    return (attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
            and not hasattr(attn, "q_norm") and getattr(attn, "sliding_window", None) is None
            and hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm"))


def _last_layer_at(layer, hidden: torch.Tensor, key_mask: torch.Tensor, rope, query_pos: torch.Tensor) -> torch.Tensor:
    """One decoder layer whose output is needed at ``query_pos`` (B, Q) only -> (B, Q, d)."""
    from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

    attn = layer.self_attn
    b, s, d = hidden.shape
    hd = attn.head_dim
    take = query_pos[..., None]  # (B, Q, 1)
    x = layer.input_layernorm(hidden)  # (B, S, d)
    xq = x.gather(1, take.expand(-1, -1, d))  # (B, Q, d)
    q = attn.q_proj(xq).view(b, xq.shape[1], -1, hd).transpose(1, 2)  # (B, H, Q, hd)
    k = attn.k_proj(x).view(b, s, -1, hd).transpose(1, 2)  # (B, Hkv, S, hd)
    v = attn.v_proj(x).view(b, s, -1, hd).transpose(1, 2)
    cos, sin = rope  # (B, S, hd)
    cq, sq = cos.gather(1, take.expand(-1, -1, hd)), sin.gather(1, take.expand(-1, -1, hd))  # (B, Q, hd)
    q = q * cq[:, None] + rotate_half(q) * sq[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # (B, H, S, hd)
    allowed = (torch.arange(s, device=hidden.device)[None, None, :] <= query_pos[:, :, None]) & key_mask.bool()[
        :, None, :]  # (B, Q, S)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=attn.scaling)
    h = hidden.gather(1, take.expand(-1, -1, d)) + attn.o_proj(out.transpose(1, 2).reshape(b, xq.shape[1], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))  # (B, Q, d)


def right_pad(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(T_i, d)] -> (B, T_max, d) zero-padded on the right, (B, T_max) mask."""
    t = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), t, rows[0].shape[1])
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return out, mask


def trunk_fingerprint(backbone_fp: str, task_lora: dict[str, torch.Tensor] | None, k: int, offset: int) -> str:
    """What cached states depend on: the backbone, the merged Stage-1 LoRA, the prefix layer and offset."""
    h = hashlib.sha256(json.dumps({"backbone": backbone_fp, "k": k, "offset": offset}).encode())
    for name in sorted(task_lora or {}):
        h.update(name.encode())
        h.update(task_lora[name].detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class TrunkCache:
    """Hidden states entering layer ``k`` per distinct token sequence, computed on first use.

    Args:
        lm: the frozen backbone (the Stage-1 LoRA merged); only layers below ``k`` run here, and they carry no
            bridge LoRA.
        k: the prefix layer (>= 1).
        offset: the position of the first token (the number of prefix slots L).
        fingerprint: :func:`trunk_fingerprint` of what the states depend on; :meth:`check` refuses another.
        dtype: storage dtype (float32, float16 or bfloat16); states are returned as float32.
        max_bytes: in-memory bound; past it the oldest entries spill to safetensors files in ``spill_dir``.
        spill_dir: where spilled shards go; None: a temporary folder the cache makes on its first spill and deletes
            on :meth:`close` or when the cache is garbage-collected (a given ``spill_dir`` is left in place).
        batch_size: sequences per trunk forward pass when filling misses.
    """

    def __init__(self, lm, k: int, offset: int, fingerprint: str, dtype: str = "float32",
                 max_bytes: int = 2 << 30, spill_dir: str | None = None, batch_size: int = 64) -> None:
        if not 1 <= k < num_layers(lm):
            raise ValueError(f"prefix layer k={k} must be in 1..{num_layers(lm) - 1} for a cached trunk "
                             "(k = 0 is the input-level prefix, which needs no cache)")
        self.lm, self.k, self.offset, self.fingerprint = lm, k, offset, fingerprint
        self.dtype = getattr(torch, dtype)
        self.max_bytes, self.batch_size = max_bytes, batch_size
        self.mem: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.mem_bytes = 0
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self._spilled: dict[tuple[int, ...], tuple[Path, str]] = {}
        self.n_computed = 0
        self._cleanup: weakref.finalize | None = None  # removes the spill folder this cache made itself

    def close(self) -> None:
        """Forget the spilled states and delete the temporary spill folder, if the cache made one."""
        self._spilled.clear()
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup, self.spill_dir = None, None

    def __len__(self) -> int:
        return len(self.mem) + len(self._spilled)

    def check(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise TrunkCacheError(f"trunk cache was built for fingerprint {self.fingerprint} (backbone, Stage-1 LoRA, "
                                  f"k, offset), the model now is {fingerprint}: rebuild it")

    @torch.no_grad()
    def compute(self, rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The states entering layer k of each token sequence, computed now (no cache): [(T_i, d)] float32."""
        inner, _ = decoder(self.lm)
        out: list[torch.Tensor | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            ids, mask = right_pad([torch.tensor(rows[i], dtype=torch.long)[:, None] for i in idx])
            h = inner.embed_tokens(ids[..., 0])  # (b, T, d)
            h = run_layers(self.lm, h, mask, 0, self.k, self.offset, final_norm=False)
            for j, i in enumerate(idx):
                out[i] = h[j, : len(rows[i])].float()
        return out  # type: ignore[return-value]

    def states(self, rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Cached states of each token sequence; misses are computed in batches and stored."""
        keys = [tuple(int(x) for x in r) for r in rows]
        missing = list(dict.fromkeys(k for k in keys if k not in self.mem and k not in self._spilled))
        if missing:
            for key, st in zip(missing, self.compute(missing)):
                self._put(key, st)
            self.n_computed += len(missing)
        return [self._get(k) for k in keys]

    def save(self, path: str | Path) -> None:
        """Every cached state in one safetensors file; the token sequences and fingerprint in its metadata."""
        keys = list(self.mem) + list(self._spilled)
        tensors = {f"s{i}": self._get(k).to(self.dtype).contiguous() for i, k in enumerate(keys)}
        meta = {"fingerprint": self.fingerprint, "k": str(self.k), "offset": str(self.offset),
                "keys": json.dumps([list(k) for k in keys])}
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: str | Path) -> int:
        """Add the states saved at ``path``; refuses (TrunkCacheError) a file of another fingerprint."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            self.check(meta.get("fingerprint", "<none>"))
            keys = json.loads(meta["keys"])
            for i, key in enumerate(keys):
                self._put(tuple(key), f.get_tensor(f"s{i}"))
        return len(keys)

    def _put(self, key: tuple[int, ...], state: torch.Tensor) -> None:
        st = state.to(self.dtype).contiguous()
        self.mem[key] = st
        self.mem_bytes += st.numel() * st.element_size()
        if self.mem_bytes > self.max_bytes:
            self._spill()

    def _get(self, key: tuple[int, ...]) -> torch.Tensor:
        if key in self.mem:
            return self.mem[key].float()
        path, name = self._spilled[key]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name).float()

    def _spill(self) -> None:
        """Move the oldest half of the in-memory entries into one safetensors file."""
        if self.spill_dir is None:
            self.spill_dir = Path(tempfile.mkdtemp(prefix="tapper-trunk-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.spill_dir), ignore_errors=True)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"shard-{len(list(self.spill_dir.glob('shard-*.safetensors'))):05d}.safetensors"
        tensors = {}
        while self.mem and self.mem_bytes > self.max_bytes // 2:
            key, st = self.mem.popitem(last=False)
            self.mem_bytes -= st.numel() * st.element_size()
            name = f"s{len(self._spilled)}"
            tensors[name] = st
            self._spilled[key] = (path, name)
        save_file(tensors, str(path))
