"""
The VLM glue: frozen vision encoder -> (VMamba: outnorm) -> MLP connector -> spliced right after BOS -> Llama.

This is the whole "controlled swap" of the paper: everything here is identical for ViT and VMamba except which
encoder produces the tokens and at which depth they are tapped.

References
- paper.md §1.1 (pipeline: frozen encoder, trained connector + LLM), §1.2 (taps: ViT = patch tokens of the
  second-to-last block, no final norm; VMamba = output of the last block of stage 3, then `outnorm2`, a LayerNorm
  left at its default init for classification checkpoints, i.e. a plain non-affine LayerNorm), §1.4 (connectors
  and the init seed), §1.7 (patches go right after BOS; mask 1 and label IGNORE on them; text-only samples get
  masked-out zero patches).
- Prismatic VLMs (TRI-ML/prismatic-vlms) `models/vlms/prismatic.py` and `util/nn_utils.py`, the code the paper's
  training stack descends from (read for the layout, not copied).

Glossary
    B   batch size                    T   text length (tokens, incl. BOS and padding)
    P   image tokens per image        C   encoder token width (d_v)
    D   LLM hidden size (d_llm)       V   vocabulary size
    L   spliced length, L = T + P
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import llm as llm_lib

IGNORE_INDEX = -100  # the same value as llm.IGNORE_INDEX (HF / LLaVA convention); kept here so this file stands alone

# ----------------------------------------------------------------------------- connectors (api.md)


def mlp2x_gelu(d_v, d_llm):
    """The paper's default 2-layer connector (prismatic `gelu-mlp`): Linear(C, D) -> GELU -> Linear(D, D)."""
    return nn.Sequential(nn.Linear(d_v, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm))


def mlp3x_gelu(d_v, d_llm):
    """The 3-layer stabilizer (prismatic `fused-gelu-mlp`): Linear(C, 4C) -> GELU -> Linear(4C, D) -> GELU ->
    Linear(D, D). paper.md §1.4 maps the paper's "3-MLP connector" to this, the only 3-layer option in the code."""
    return nn.Sequential(nn.Linear(d_v, 4 * d_v), nn.GELU(), nn.Linear(4 * d_v, d_llm), nn.GELU(),
                         nn.Linear(d_llm, d_llm))


CONNECTORS = {"mlp2x_gelu": mlp2x_gelu, "mlp3x_gelu": mlp3x_gelu}


@dataclass
class ConnectorConfig:
    name: str = "mlp2x_gelu"   # a key of CONNECTORS
    d_v: int = 128             # C: encoder token width at the tap
    d_llm: int = 256           # D: LLM hidden size

    def __post_init__(self):
        if self.name not in CONNECTORS:
            raise KeyError(f"unknown connector {self.name!r}; valid: {sorted(CONNECTORS)}")


class _Presets(dict):
    def __missing__(self, key):
        raise KeyError(f"unknown connector preset {key!r}; valid: {sorted(self)}")


CONFIGS = _Presets(
    toy=ConnectorConfig("mlp2x_gelu", 128, 256),                # toy encoders (C=128) -> toy Llama (D=256)
    toy_3x=ConnectorConfig("mlp3x_gelu", 128, 256),
    vmamba_s_vicuna7b=ConnectorConfig("mlp2x_gelu", 384, 4096),  # VMamba-S stage 3 / ViT-S -> Vicuna-7B
    vmamba_s_vicuna7b_3x=ConnectorConfig("mlp3x_gelu", 384, 4096),
)


def build_connector(cfg: ConnectorConfig):
    # paper.md §1.4: prismatic seeds the RNG with the vision width right before building the projector, so the
    # connector's init depends only on C. fork_rng keeps that from disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.d_v)
        return CONNECTORS[cfg.name](cfg.d_v, cfg.d_llm)


# ----------------------------------------------------------------------------- encoders

DEFAULT_TAP = {"vit": -2, "vmamba": 3}  # ViT: second-to-last block; VMamba: stage 3 (stride 16)


def build_encoder(kind, config):
    """kind "vit" | "vmamba"; config: a preset name or a config dict/dataclass of that encoder -> nn.Module."""
    if kind == "vit":
        import vit as mod
        cls, cfg_cls = mod.ViT, mod.ViTConfig
    elif kind == "vmamba":
        import vmamba as mod
        cls, cfg_cls = mod.VMamba, mod.VMambaConfig
    else:
        raise ValueError(f"encoder must be 'vit' or 'vmamba', got {kind!r}")
    if isinstance(config, str):
        config = mod.CONFIGS[config]
    elif isinstance(config, dict):
        config = cfg_cls(**config)
    return cls(config)


def encoder_width(kind, encoder, tap):
    """C, the token width at the tap."""
    if kind == "vit":
        return encoder.config.embed_dim
    return encoder.config.dims[tap - 1]  # VMamba: stage s (1-based) has width dims[s - 1]


def check_state_dict(expected, got, what, show=5):
    """Raise one readable ValueError listing the first few missing / unexpected / mis-shaped keys with counts."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    bad = [f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
           if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        parts = [f"{len(v)} {n} ({', '.join(v[:show])}{', ...' if len(v) > show else ''})"
                 for n, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)) if v]
        raise ValueError(f"{what} does not match the model: " + "; ".join(parts))


# ----------------------------------------------------------------------------- the VLM


class VLM(nn.Module):
    """encoder (frozen) -> [outnorm for VMamba] -> connector -> tokens spliced right after BOS -> llm."""

    def __init__(self, encoder, llm, kind, tap=None, connector="mlp2x_gelu"):
        super().__init__()
        self.kind, self.tap = kind, DEFAULT_TAP[kind] if tap is None else tap
        self.encoder, self.llm = encoder, llm
        d_v = encoder_width(kind, encoder, self.tap)
        self.connector_config = ConnectorConfig(connector, d_v, llm.config.hidden_size)
        self.connector = build_connector(self.connector_config)
        # The encoder is frozen (paper §2: requires_grad=False, forward without grad) and kept in eval mode.
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # frozen means frozen: no train-mode behaviour in the encoder, ever
        return self

    @torch.no_grad()
    def encoder_features(self, pixel_values):
        """(B, 3, H, W) -> (B, P, C) frozen encoder tokens at the tap, in fp32 (what the feature cache stores)."""
        # The encoder runs in fp32 outside autocast: paper.md §1.2 keeps VMamba in fp32 ("selective-scan kernels are
        # most stable in fp32"); we do the same for ViT so the two encoders differ in nothing but architecture.
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            x = pixel_values.to(next(self.encoder.parameters()).dtype)
            if self.kind == "vit":
                f = self.encoder.forward_features(x, layer=self.tap)               # (B, P, C)
            else:
                f = self.encoder.forward_features(x, stage=self.tap)               # (B, P, C)
                # outnorm2 of the paper's VMamba wrapper: a LayerNorm at its default init (weight 1, bias 0) for
                # classification checkpoints, i.e. exactly this non-affine normalization over C.
                f = F.layer_norm(f.float(), (f.shape[-1],))                        # (B, P, C)
        return f.float()

    def encode_images(self, pixel_values=None, features=None):
        """(B, 3, H, W) pixels or cached (B, P, C) features -> (B, P, D) LLM-space image tokens."""
        if features is None:
            features = self.encoder_features(pixel_values)                         # (B, P, C)
        w = self.connector[0].weight
        return self.connector(features.to(w.dtype))                                # (B, P, C) -> (B, P, D)

    def _splice(self, input_ids, attention_mask, labels, image_tokens, image_mask, extra=()):
        """Insert the P image tokens right after each row's BOS (= its first unmasked position, so left padding
        works too). Returns inputs_embeds (B, L, D), attention_mask (B, L), labels (B, L) or None, bos (B,), and
        each (tensor (B, T), fill) of `extra` spread the same way, `fill` on the image positions."""
        B, T = input_ids.shape
        P = image_tokens.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = self.llm.embed(input_ids)                                           # (B, T, D)
        image_tokens = image_tokens.to(text.dtype)
        bos = attention_mask.long().argmax(dim=1, keepdim=True)                    # (B, 1) first real token
        j = torch.arange(T + P, device=input_ids.device)[None]                     # (1, L)
        is_img = (j > bos) & (j <= bos + P)                                        # (B, L)
        t_idx = torch.where(j <= bos, j, j - P).clamp(0, T - 1)                    # (B, L) text source index
        i_idx = (j - bos - 1).clamp(0, P - 1)                                      # (B, L) image source index
        D = text.shape[-1]
        emb = torch.where(is_img[..., None],
                          image_tokens.gather(1, i_idx[..., None].expand(B, T + P, D)),
                          text.gather(1, t_idx[..., None].expand(B, T + P, D)))    # (B, L, D)
        img_m = image_mask.to(attention_mask.dtype)[:, None].expand(B, T + P)     # (B, L)
        mask = torch.where(is_img, img_m, attention_mask.gather(1, t_idx))         # (B, L)
        spread = lambda t, fill: torch.where(is_img, torch.full_like(t_idx, fill), t.gather(1, t_idx))  # (B, L)
        if labels is not None:
            labels = spread(labels, IGNORE_INDEX)                                  # (B, L)
        return (emb, mask, labels, bos[:, 0]) + tuple(spread(t, fill) for t, fill in extra)

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None,
                output_hidden_states=False, features=None, image_mask=None, user_labels=None, user_loss=0.0,
                turn_ids=None):
        """pixel_values (B, 3, H, W) [or features (B, P, C) from the cache], input_ids (B, T) starting with BOS
        (right padding), attention_mask (B, T), labels (B, T) with IGNORE_INDEX on prompt/padding, image_mask (B,)
        0 for text-only samples (their zero image slots are masked out).
        Options of the from-scratch toy LLM (train.py --question-loss, --isolate-turns), off by default:
        user_labels (B, T) (llm.tokenize_turns) with user_loss = w > 0: loss = answers' mean + w * questions' mean;
        turn_ids (B, T) (llm.tokenize_turns, padding = its row's last turn): every turn sees the image and the
        system prompt but no other turn (llm.turn_isolation), i.e. the turns are single-turn samples sharing an image.
        Returns dict(loss, logits (B, L, V), hidden_states (if asked), image_slice: the P image positions for rows
        without left padding, and with user_loss also answer_loss and user_loss, the two means)."""
        img = self.encode_images(pixel_values, features)                           # (B, P, D)
        B, P = img.shape[:2]
        if image_mask is None:
            image_mask = torch.ones(B, dtype=torch.long, device=img.device)
        img = img * image_mask.to(img.dtype)[:, None, None]                        # zero patches for text-only rows
        extra = [(t, fill) for t, fill in ((user_labels, IGNORE_INDEX), (turn_ids, 0)) if t is not None]
        emb, mask, labels, _, *spread = self._splice(input_ids, attention_mask, labels, img, image_mask, extra)
        user_labels = spread.pop(0) if user_labels is not None else None          # (B, L)
        turn_ids = spread.pop(0) if turn_ids is not None else None                 # (B, L), image = prefix (0)
        position_ids = None
        if turn_ids is not None:
            iso, position_ids = llm_lib.turn_isolation(turn_ids)                   # (B, 1, L, L), (B, L)
            # and never a masked key: padding, or the zeroed image slots of a text-only row (every query still sees
            # BOS, so no row of the mask is empty). Positions still count those slots, unlike the plain path's.
            mask = iso & mask.bool()[:, None, None, :]                             # (B, 1, L, L)
        elif bool((mask[:, 1:] <= mask[:, :-1]).all()):
            # Only right padding: causal attention already keeps every real token from seeing the pads after it,
            # and positions are 0..L-1 either way, so dropping the mask changes no real token's output but lets
            # the LLM use the fast is_causal attention path. (Pads' outputs differ; their labels are IGNORE.)
            mask = None
        out = self.llm(inputs_embeds=emb, attention_mask=mask, output_hidden_states=output_hidden_states,
                       position_ids=position_ids)
        logits, hidden = (out if output_hidden_states else (out, None))
        result = dict(loss=None, logits=logits, image_slice=slice(1, 1 + P))
        if labels is not None:
            # next-token loss on answer tokens only (labels are IGNORE on the system prompt, questions and patches)
            result["loss"] = self.token_loss(logits, labels)
            if user_labels is not None and user_loss > 0:
                result["answer_loss"], result["user_loss"] = result["loss"], self.token_loss(logits, user_labels)
                result["loss"] = result["answer_loss"] + user_loss * result["user_loss"]
        if output_hidden_states:
            result["hidden_states"] = hidden
        return result

    @staticmethod
    def token_loss(logits, labels):
        """Mean next-token cross-entropy over the positions whose label (B, L) is not IGNORE_INDEX."""
        flat_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])        # (B*(L-1), V)
        flat_labels = labels[:, 1:].reshape(-1)                                    # (B*(L-1),)
        n = (flat_labels != IGNORE_INDEX).sum()
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum") / n.clamp(min=1)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, max_new_tokens=32,
                 eos_token_id=None, features=None, **kw):
        """Greedy continuation of LEFT-padded prompts (B, T) -> new token ids (B, T_new)."""
        img = self.encode_images(pixel_values, features)                           # (B, P, D)
        image_mask = torch.ones(img.shape[0], dtype=torch.long, device=img.device)
        emb, mask, _, _ = self._splice(input_ids, attention_mask, None, img, image_mask)
        return self.llm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos_token_id, **kw)


# ----------------------------------------------------------------------------- loading a finished run


def build_vlm(cfg):
    """A VLM with random weights from a run's resolved config dict (config.json)."""
    encoder = build_encoder(cfg["encoder"], cfg["encoder_config"])
    model = llm_lib.Llama(llm_lib.LLMConfig(**cfg["llm_config"]))
    return VLM(encoder, model, cfg["encoder"], cfg["tap"], cfg["connector"])


def load_run(run_dir, device="cpu"):
    """RUN_DIR (written by train.py) -> (vlm in eval mode, tokenizer, cfg dict)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise FileNotFoundError(f"load_run: {os.path.join(run_dir, name)} not found (is {run_dir} a finished "
                                    f"train.py run?)")
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    vlm = build_vlm(cfg)
    sd = load_file(os.path.join(run_dir, "model.safetensors"))
    check_state_dict(vlm.state_dict(), sd, f"{run_dir}/model.safetensors")
    vlm.load_state_dict(sd)
    tok = Tokenizer.from_file(os.path.join(run_dir, "tokenizer.json"))
    return vlm.to(device).eval(), tok, cfg

