"""Multimodal models: time to first token with one image, and the vision encoder alone against its GEMM floor.

Random weights at the released shapes (DeepSeek-VL 1.3B: SigLIP-L at 384 px, 576 image tokens; DeepSeek-VL 7B
hybrid: SigLIP-L at 384 px plus SAM ViT-B at 1024 px; Janus-Pro 7B; DeepSeek-VL2: a 1152x768 image tiled into a
global view and 3x2 local tiles of SigLIP-SO400M, 1,415 image tokens). Per backend: the encoder's median time,
its floor (the tower's linear and conv FLOPs at the GPU's dense peak: attention and elementwise work are left
out, so the floor is a lower bound), and time to first token (encoder + prefill of the image tokens and a short
text), and for Janus one whole image generation (576 codes under classifier-free guidance as a batch of two,
then the VQ decoder) in seconds. Eager is the baseline column. Results go to $OUT/vl_gpu.json.

    python benchmarks/vl_gpu.py --device cuda --dtype bf16 --backends eager,triton
    python benchmarks/vl_gpu.py --device cuda --dtype bf16 --presets deepseek-vl2-tiny,deepseek-vl2-small
    python benchmarks/vl_gpu.py --device cpu --dtype float32 --presets deepseek-vl-hybrid-tiny --backends eager
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import dsgraph.models as models
import torch

import dsgraph

PEAK_TFLOPS = {"cuda": 989.0, "cpu": 1.0}   # H200 dense bf16; the CPU figure only keeps the column defined


def tower_flops(graph, batch: int) -> float:
    """2 * MACs of the tower's linears, GELU MLPs, patch embeddings and convs (N = batch)."""
    total = 0
    for node in graph.nodes:
        if node.op not in ("linear", "mlp.gelu", "vision.patch_embed", "conv2d"):
            continue
        out = node.outputs[0].type.concrete({"N": batch})
        ws = [v.type.concrete({}) for v in node.inputs[1:] if len(v.type.shape) >= 2]
        if node.op == "conv2d":          # out [N, O, H, W], weight [O, C, k, k]
            total += 2 * math.prod(out) * math.prod(ws[0][1:])
        elif node.op == "mlp.gelu":      # rows x (fc1 [I, D] + fc2 [O, I])
            total += 2 * math.prod(out[:-1]) * sum(math.prod(w) for w in ws)
        else:                            # linear [O, K], patch_embed [D, C, p, p]: rows x O x K
            total += 2 * math.prod(out[:-1]) * math.prod(ws[0])
    return float(total)


def timed(fn, device: str, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="deepseek-vl-1.3b,deepseek-vl-7b,janus-pro-7b")
    ap.add_argument("--backends", default="eager,triton")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--image-gen", action=argparse.BooleanOptionalAction, default=True,
                    help="time Janus image generation (the whole code grid with CFG, then the VQ decoder), once")
    args = ap.parse_args()
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(args.dtype, args.dtype)
    rows = []
    for preset in args.presets.split(","):
        model = models.build_model(preset, dtype=dtype, weights_device=args.device)
        vl = model.vision.config
        gen = torch.Generator().manual_seed(0)
        if "image_layout" in model.vision.graph.inputs:   # DeepSeek-VL2: tiles and their token layout
            cfg = model.vision.image
            img = torch.randint(0, 256, (2 * cfg.size, 3 * cfg.size, 3), generator=gen, dtype=torch.uint8).numpy()
            inputs, (count,) = models.vision.preprocess_tiled([img], cfg)
            images = {k: v.to(args.device) for k, v in inputs.items()}
            tiles = images["pixel_values"].shape[0]
        else:
            pixels = {k: torch.randn(1, *v.type.shape[1:], generator=gen).to(args.device)
                      for k, v in model.vision.graph.inputs.items() if v.kind == "activation"}
            images = pixels if len(pixels) > 1 else pixels["pixel_values"]
            count, tiles = model.vision.graph.meta["image_tokens"], 1
        text = torch.randint(0, min(1000, vl.text.vocab_size - 1), (1, args.text_tokens), generator=gen)
        ids = torch.cat([text[:, :1], torch.full((1, count), vl.image_token_id), text[:, 1:]], 1).to(args.device)
        floor = tower_flops(model.vision.graph, tiles) / (PEAK_TFLOPS[args.device] * 1e12)
        for backend in args.backends.split(","):
            exe = dsgraph.compile(model, backend=backend, device=args.device)
            enc = timed(lambda: exe.encode_images(images), args.device, args.reps)
            ttft = timed(lambda: exe(ids, images=images), args.device, args.reps)
            row = {"preset": preset, "backend": backend, "encoder_s": enc, "encoder_floor_s": floor,
                   "ttft_s": ttft, "prompt_tokens": ids.shape[1]}
            drawn = ""
            if getattr(exe, "generation", None) is not None and args.image_gen:   # Janus: text -> image with CFG
                cond, uncond = text.to(args.device), torch.zeros_like(text, device=args.device)
                exe.generate_image_tokens(cond, uncond, 2)   # compile / tune outside the timed call
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                exe.generate_image(cond, uncond, guidance=5.0)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                row["image_s"] = time.perf_counter() - t0
                drawn = f"  image {row['image_s']:.2f} s"
            rows.append(row)
            print(f"{preset:24s} {backend:7s} encoder {enc * 1e3:8.2f} ms (floor {floor * 1e3:.2f} ms)  "
                  f"ttft {ttft * 1e3:8.2f} ms  ({ids.shape[1]} tokens){drawn}", flush=True)
        del model
    out = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vl_gpu.json"), "w") as f:
        json.dump({"device": args.device, "dtype": dtype, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
