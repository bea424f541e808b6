"""Parameter counts: TAP-PER (full and compressed per-user rows) against OPPU (one LoRA per user).

Shapes come from a transformers config (``--model-dir``) or from flags; d = hidden size, L = prefix slots,
q width = heads·head_dim, k/v width = kv_heads·head_dim (GQA).

- TAP-PER full: ``L·d`` per user. Shared: scorer ``4d·d + d`` and ``d + 1``, projection ``d·L·d + L·d``,
  2 lambdas, bridge LoRA (r=4 on q, k, v, o: ``r·(d_in + d_out)`` per projection and layer).
- TAP-PER compressed: ``r`` per user; shared as above plus the up-projection ``r·L·d + L·d``.
- OPPU: a LoRA (r=8 on q_proj and v_proj) per user, ``layers · r·((d + q_width) + (d + kv_width))``.

Commands::

    python -m recsys_tapper.params --hidden 576 --layers 30 --heads 9 --kv-heads 3 --users 1000
    python -m recsys_tapper.params --model-dir ~/.cache/recsys-tapper/models/smollm2-135m-instruct --json
    python -m recsys_tapper.params --paper          # Llama-3.1-8B, L=8, 1,000 users

Paper check: at Llama-3.1-8B (d=4096, 32 layers, 32 heads, 8 KV heads) a user row is 8·4096 = 32,768. OPPU's
~4.19M per user (4,194,304 = 32 · 2 · 8·(4096+4096)) holds only when v_proj is 4096 wide, i.e. without GQA
(Llama-2-7B, OPPU's own backbone, ``kv_heads=32``); with Llama-3.1-8B's 8 KV heads v_proj is 1024 wide and
the same LoRA has 32 · (8·(4096+4096) + 8·(4096+1024)) = 3,407,872 per user. Both are reported.

Example::

    shape = BackboneShape(hidden=576, layers=30, heads=9, kv_heads=3)
    param_table(shape, users=1000)["oppu"]["per_user"]          # 460800
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

BRIDGE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
OPPU_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class BackboneShape:
    """Backbone dimensions. ``head_dim`` defaults to ``hidden // heads``."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim else self.hidden // self.heads

    @property
    def q_width(self) -> int:
        return self.heads * self.hd

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.hd

    @classmethod
    def from_config(cls, cfg) -> BackboneShape:
        """From a transformers config (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
        ``num_key_value_heads``, ``head_dim``)."""
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        return cls(cfg.hidden_size, cfg.num_hidden_layers, heads, kv, getattr(cfg, "head_dim", None) or None)

    @classmethod
    def from_model_dir(cls, path: str | Path) -> BackboneShape:
        """A Hugging Face model directory, or a saved TAP-PER model directory (its backbone's shapes)."""
        import json

        from transformers import AutoConfig

        from llm_bridge.backbone import TINY, resolve_path

        path = Path(path).expanduser()
        conf = path / "config.json"
        saved = json.loads(conf.read_text()) if (path / "manifest.json").exists() and conf.exists() else {}
        if isinstance(saved.get("model"), dict):  # runs/<out>/model: follow its backbone
            name = saved["model"]["backbone"]["name_or_path"]
            if name == TINY:  # built in code, no directory
                from llm_bridge.tiny import tiny_llama

                return cls.from_config(tiny_llama()[0].config)
            path = resolve_path(name)
        return cls.from_config(AutoConfig.from_pretrained(str(path)))

    def proj_dims(self, name: str) -> tuple[int, int]:
        """(d_in, d_out) of an attention projection."""
        return {"q_proj": (self.hidden, self.q_width), "k_proj": (self.hidden, self.kv_width),
                "v_proj": (self.hidden, self.kv_width), "o_proj": (self.q_width, self.hidden)}[name]


# Llama-3.1-8B, the paper's backbone; Llama-2-7B-shaped (no GQA), OPPU's.
LLAMA31_8B = BackboneShape(hidden=4096, layers=32, heads=32, kv_heads=8)
LLAMA2_7B = BackboneShape(hidden=4096, layers=32, heads=32, kv_heads=32)


def lora_params(shape: BackboneShape, r: int, targets: Sequence[str]) -> int:
    """LoRA parameters over all layers: ``layers · Σ_targets r·(d_in + d_out)``."""
    return shape.layers * sum(r * sum(shape.proj_dims(t)) for t in targets)


def tapper_params(shape: BackboneShape, users: int, slots: int = 8, user_dim: int | None = None,
                  bridge_r: int = 4) -> dict:
    """TAP-PER counts. ``user_dim`` None (or L·d) = full rows; r < L·d = compressed rows + up-projection."""
    d, full = shape.hidden, slots * shape.hidden
    per_user = full if user_dim is None else user_dim
    shared = {
        "scorer": (4 * d * d + d) + (d + 1),
        "lambdas": 2,
        "projection": d * full + full,
        "up_projection": 0 if per_user == full else per_user * full + full,
        "bridge_lora": lora_params(shape, bridge_r, BRIDGE_TARGETS),
    }
    n_shared = sum(shared.values())
    return {"per_user": per_user, "shared": n_shared, "total": users * per_user + n_shared,
            "shared_breakdown": shared}


def oppu_params(shape: BackboneShape, users: int, r: int = 8, targets: Sequence[str] = OPPU_TARGETS) -> dict:
    per_user = lora_params(shape, r, targets)
    return {"per_user": per_user, "shared": 0, "total": users * per_user}


def param_table(shape: BackboneShape, users: int, slots: int = 8, user_dim: int = 64, bridge_r: int = 4,
                oppu_r: int = 8) -> dict:
    """``{"tapper_full", "tapper_compressed", "oppu"}`` counts, each with ``pct_of_oppu_total``."""
    out = {"tapper_full": tapper_params(shape, users, slots, None, bridge_r),
           "tapper_compressed": tapper_params(shape, users, slots, user_dim, bridge_r),
           "oppu": oppu_params(shape, users, oppu_r)}
    for v in out.values():
        v["pct_of_oppu_total"] = 100.0 * v["total"] / out["oppu"]["total"]
    return out


def paper_reference(users: int = 1000, slots: int = 8) -> dict:
    """The paper's configuration (Llama-3.1-8B, L=8) and OPPU at both v_proj widths (see the module doc)."""
    table = param_table(LLAMA31_8B, users, slots)
    table["oppu_no_gqa"] = oppu_params(LLAMA2_7B, users)
    table["oppu_no_gqa"]["pct_of_oppu_total"] = 100.0
    table["tapper_full"]["pct_of_oppu_no_gqa_total"] = 100.0 * table["tapper_full"]["total"] / table[
        "oppu_no_gqa"]["total"]
    return table


def format_table(table: dict, shape: BackboneShape, users: int) -> str:
    lines = [(f"d={shape.hidden} layers={shape.layers} heads={shape.heads} kv_heads={shape.kv_heads} "
              f"head_dim={shape.hd}  users={users:,}"),
             f"{'method':<20}{'per user':>14}{'shared':>16}{'total':>18}{'% of OPPU':>11}"]
    for name, v in table.items():
        lines.append(f"{name:<20}{v['per_user']:>14,}{v['shared']:>16,}{v['total']:>18,}"
                     f"{v['pct_of_oppu_total']:>10.2f}%")
        if "pct_of_oppu_no_gqa_total" in v:
            lines.append(f"  ({name} total = {v['pct_of_oppu_no_gqa_total']:.2f}% of oppu_no_gqa's; "
                         "the paper reports 5.7%)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recsys_tapper.params", description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", help="a Hugging Face model directory (its config.json gives the shapes) or a "
                    "saved TAP-PER model directory such as runs/demo/model (its backbone's)")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int, help="default: --heads (no GQA)")
    ap.add_argument("--head-dim", type=int, help="default: hidden // heads")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=8, help="L, prefix slots")
    ap.add_argument("--user-dim", type=int, default=64, help="r, the compressed row width")
    ap.add_argument("--bridge-r", type=int, default=4)
    ap.add_argument("--oppu-r", type=int, default=8)
    ap.add_argument("--paper", action="store_true", help="the paper's Llama-3.1-8B configuration")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.paper:
        shape, table = LLAMA31_8B, paper_reference(a.users, a.slots)
    else:
        if a.model_dir:
            shape = BackboneShape.from_model_dir(a.model_dir)
        elif None in (a.hidden, a.layers, a.heads):
            ap.error("give --model-dir, or --hidden, --layers and --heads (and --kv-heads for GQA)")
        else:
            shape = BackboneShape(a.hidden, a.layers, a.heads, a.kv_heads or a.heads, a.head_dim)
        table = param_table(shape, a.users, a.slots, a.user_dim, a.bridge_r, a.oppu_r)
    if a.json:
        print(json.dumps({"shape": asdict(shape), "users": a.users, "slots": a.slots, **table}, indent=2))
    else:
        print(format_table(table, shape, a.users))
    return 0


if __name__ == "__main__":
    sys.exit(main())
