"""The reference a GPU row of `bench throughput` is read against: the same LLaMA preset
trained by PyTorch eager with transformers' LlamaForCausalLM, bf16 autocast, f32 weights
and AdamW, on the same batch shape, on the same GPU, in the same script run. Its
attention is PyTorch's fused scaled-dot-product attention (transformers' default, what
a user of PyTorch gets); Starling's is unfused, and the row says which it was.

    python3 trainer/cuda/torch_reference.py --preset llama-125m --shape 8x512 [--precision bf16]

Prints one JSON object with the keys of `bench throughput --json`'s rows that it can
fill (preset, rows, seq, precision, params, tokens_per_s): a Rust row's tokens/s over
this one's is the ratio to report. Needs torch and transformers (the GPU machines have
both); nothing here runs in the tests.
"""

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# (hidden, layers, heads, kv heads, intermediate, positions, rope theta): Preset::config.
PRESETS = {
    "tiny": (128, 4, 4, 2, 384, 512, 10000.0),
    "llama-125m": (768, 12, 12, 12, 2048, 2048, 10000.0),
    "llama-1b": (2048, 16, 32, 8, 8192, 8192, 500000.0),
}


def config(preset: str, vocab: int) -> LlamaConfig:
    hidden, layers, heads, kv, inter, positions, theta = PRESETS[preset]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=positions,
        rope_theta=theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-125m", choices=sorted(PRESETS))
    p.add_argument("--shape", default="8x512", help="ROWSxSEQ")
    p.add_argument("--precision", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    rows, seq = (int(x) for x in a.shape.split("x"))
    vocab = 256 if a.preset == "tiny" else 32000
    c = config(a.preset, vocab)
    c.max_position_embeddings = max(c.max_position_embeddings, seq)
    torch.manual_seed(0)
    c._attn_implementation = "sdpa"
    model = LlamaForCausalLM(c).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tokens = torch.randint(0, vocab, (rows, seq + 1), device="cuda")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=a.precision == "bf16"):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, vocab), targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = a.steps * rows * seq / elapsed
    print(
        json.dumps(
            {
                "reference": "pytorch-eager",
                "attention": c._attn_implementation,
                "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(),
                "preset": a.preset,
                "rows": rows,
                "seq": seq,
                "precision": a.precision,
                "params": sum(p.numel() for p in model.parameters()),
                "tokens_per_s": tokens_per_s,
                "peak_memory_bytes": torch.cuda.max_memory_allocated(),
            }
        )
    )


if __name__ == "__main__":
    main()
