"""Loads a Starling checkpoint with the reference `safetensors` reader and checks that
its tensors are exactly those of a Hugging Face LlamaForCausalLM with its config.json.

usage: python3 check_checkpoint.py CHECKPOINT_DIR
"""
import json
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

ckpt = Path(sys.argv[1])
config = json.loads((ckpt / "config.json").read_text())
tensors = load_file(str(ckpt / "model.safetensors"))

h, v, i = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
expected = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
for l in range(config["num_hidden_layers"]):
    p = f"model.layers.{l}."
    expected.update({
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, h),
        p + "mlp.gate_proj.weight": (i, h),
        p + "mlp.up_proj.weight": (i, h),
        p + "mlp.down_proj.weight": (h, i),
    })
if not config.get("tie_word_embeddings"):
    expected["lm_head.weight"] = (v, h)

assert config["architectures"] == ["LlamaForCausalLM"], config["architectures"]
# transformers 4.47 and older refuse a safetensors file without this metadata.
with safe_open(str(ckpt / "model.safetensors"), framework="np") as f:
    assert f.metadata() == {"format": "pt"}, f.metadata()
# `dtype` is the current key; `torch_dtype` is deprecated.
assert config.get("dtype") == "float32" and "torch_dtype" not in config, config
assert set(tensors) == set(expected), sorted(set(tensors) ^ set(expected))
for name, shape in expected.items():
    t = tensors[name]
    assert t.shape == shape, (name, t.shape, shape)
    assert t.dtype == np.float32, (name, t.dtype)
    assert np.isfinite(t).all(), name
params = sum(t.size for t in tensors.values())
print(f"{ckpt}: {len(tensors)} tensors, {params} parameters, LlamaForCausalLM layout OK")
