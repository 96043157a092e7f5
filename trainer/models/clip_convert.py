"""An OpenCLIP text tower as the ecosystem loads it: a transformers ``CLIPTextModel`` (weights, config) and a
``CLIPTokenizer`` (vocabulary and merges from open_clip's own BPE file), and the CompVis single-file keys of
SD 1.x (``cond_stage_model.transformer.text_model.*``) and SD 2.x (``cond_stage_model.model.*``).

Our conditioning is the output of the penultimate (SD 2.x) or last (SD 1.x) block through ``ln_final``; a
``CLIPTextModel`` with the blocks up to that one and ``ln_final`` as its ``final_layer_norm`` gives exactly that as
``last_hidden_state`` (how diffusers' SD 2 text encoders are stored: 23 of ViT-H's 24 blocks).
"""

from __future__ import annotations

import json

import torch
from torch import nn

from .text_encoders import LAYERS, OpenCLIPTextEncoder

START, END = "<|startoftext|>", "<|endoftext|>"  # transformers' names of open_clip's start/end tokens


def exportable(encoder: nn.Module) -> bool:
    """Whether ``encoder`` has a transformers equivalent (an OpenCLIP text tower of the plain CLIP kind)."""
    if not isinstance(encoder, OpenCLIPTextEncoder):
        return False
    block = encoder.text.transformer.resblocks[0]
    plain = all(
        isinstance(getattr(block, n, nn.Identity()), nn.Identity) for n in ("ls_1", "ls_2", "ln_attn")
    )
    return plain and isinstance(block.attn, nn.MultiheadAttention)


def _used_blocks(encoder: OpenCLIPTextEncoder) -> int:
    return len(encoder.text.transformer.resblocks) - LAYERS[encoder.config.layer]


def hf_text_config(encoder: OpenCLIPTextEncoder) -> dict:
    """``config.json`` of the equivalent ``CLIPTextModel``."""
    t = encoder.text
    block = t.transformer.resblocks[0]
    proj = t.text_projection
    projection_dim = (
        (proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]) if proj is not None else 0
    )
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": t.transformer.width,
        "intermediate_size": block.mlp.c_fc.out_features,
        "num_attention_heads": block.attn.num_heads,
        "num_hidden_layers": _used_blocks(encoder),
        "max_position_embeddings": t.context_length,
        "vocab_size": t.vocab_size,
        "hidden_act": "quick_gelu" if encoder.quick_gelu else "gelu",
        "layer_norm_eps": t.ln_final.eps,
        "projection_dim": projection_dim or t.transformer.width,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": encoder.config.pad_id,
        "torch_dtype": "float32",
    }


def text_to_hf(encoder: OpenCLIPTextEncoder) -> dict[str, torch.Tensor]:
    """The tower's weights under ``CLIPTextModel`` keys (``text_model.*``, the layout of every Hub checkpoint)."""
    t, out = encoder.text, {}
    out["text_model.embeddings.token_embedding.weight"] = t.token_embedding.weight
    out["text_model.embeddings.position_embedding.weight"] = t.positional_embedding
    for i in range(_used_blocks(encoder)):
        b, pre = t.transformer.resblocks[i], f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = getattr(b.attn, f"in_proj_{kind}").chunk(3)
            for name, value in zip(("q_proj", "k_proj", "v_proj"), qkv, strict=True):
                out[f"{pre}self_attn.{name}.{kind}"] = value
            out[f"{pre}self_attn.out_proj.{kind}"] = getattr(b.attn.out_proj, kind)
            out[f"{pre}layer_norm1.{kind}"] = getattr(b.ln_1, kind)
            out[f"{pre}layer_norm2.{kind}"] = getattr(b.ln_2, kind)
            out[f"{pre}mlp.fc1.{kind}"] = getattr(b.mlp.c_fc, kind)
            out[f"{pre}mlp.fc2.{kind}"] = getattr(b.mlp.c_proj, kind)
    out["text_model.final_layer_norm.weight"] = t.ln_final.weight
    out["text_model.final_layer_norm.bias"] = t.ln_final.bias
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def text_to_compvis(encoder: OpenCLIPTextEncoder) -> dict[str, torch.Tensor]:
    """The tower under a CompVis single file's keys: SD 2.x's open_clip layout for the penultimate layer,
    SD 1.x's transformers layout for the last."""
    if encoder.config.layer == "penultimate":
        sd = encoder.text.state_dict()
        return {f"cond_stage_model.model.{k}": v.detach().float().cpu().contiguous() for k, v in sd.items()
                if k != "attn_mask"}  # fmt: skip
    return {f"cond_stage_model.transformer.{k}": v for k, v in text_to_hf(encoder).items()}


def tokenizer_files(encoder: OpenCLIPTextEncoder) -> dict[str, str]:
    """``vocab.json``, ``merges.txt`` and the configs of a ``CLIPTokenizer`` that tokenizes as the encoder does
    (open_clip's BPE vocabulary, its start/end tokens under transformers' names, the encoder's padding)."""
    tok = encoder.tokenizer
    rename = {"<start_of_text>": START, "<end_of_text>": END}
    vocab = {rename.get(k, k): v for k, v in tok.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    pad = {v: k for k, v in vocab.items()}[encoder.config.pad_id]
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": encoder.text.context_length,
              "do_lower_case": True, "errors": "replace", "clean_up_tokenization_spaces": True, **special}  # fmt: skip
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=1),
        "special_tokens_map.json": json.dumps(special, indent=1),
    }
