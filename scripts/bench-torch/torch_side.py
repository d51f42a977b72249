"""The PyTorch side of `scripts/bench-torch/run.sh`: times diffusers' UNet step (classifier-free
guidance, batch 2) and VAE decode on the CPU, built from the same config files `sdrs bench` builds
its models from (crates/pipeline/configs/<model>/), with seeded random weights.

Prints one JSON line: {"runtime", "model", "size", "dtype", "threads", "results": [{"part",
"median_s", "min_s", "max_s", "runs", "gflop", "gflop_per_s"}]}; "gflop" is PyTorch's own count.
"""
import argparse
import json
import os
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", required=True, help="crates/pipeline/configs/<model>")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    parser.add_argument("--parts", default="unet,vae")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def read_config(folder, name):
    with open(os.path.join(folder, name, "config.json")) as file:
        return json.load(file)


def timed(part, runs, call):
    with FlopCounterMode(display=False) as counter:
        call()  # the warm-up run, which also counts the FLOPs
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    gflop = counter.get_total_flops() / 1e9
    return {"part": part, "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
            "runs": runs, "gflop": gflop, "gflop_per_s": gflop / median}


def main():
    args = parse_args()
    diffusers_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    dtype = DTYPES[args.dtype]
    unet_config = read_config(args.configs, "unet")
    vae_config = read_config(args.configs, "vae")
    size = args.size or vae_config.get("sample_size", 512)
    latent = size // 2 ** (len(vae_config["block_out_channels"]) - 1)
    parts = args.parts.split(",")
    results = []
    if "unet" in parts:
        unet = UNet2DConditionModel.from_config(unet_config).eval().to(dtype)
        channels = unet_config["in_channels"]
        sample = torch.randn(2, channels, latent, latent, dtype=dtype)
        timestep = torch.tensor([500, 500])
        context = torch.randn(2, 77, unet_config["cross_attention_dim"], dtype=dtype)
        extra = {}
        if unet_config.get("addition_embed_type") == "text_time":
            # The pooled text embedding takes what the time ids leave of the projection's input.
            time_dim = unet_config["addition_time_embed_dim"]
            pooled = 1280
            ids = (unet_config["projection_class_embeddings_input_dim"] - pooled) // time_dim
            time_ids = [size, size, 0, 0, size, size] if ids == 6 else [size, size, 0, 0, 6.0]
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.randn(2, pooled, dtype=dtype),
                "time_ids": torch.tensor([time_ids] * 2, dtype=dtype),
            }
        results.append(timed("UNet step", args.runs, lambda: unet(sample, timestep, context, **extra)))
        del unet
    if "vae" in parts:
        vae = AutoencoderKL.from_config(vae_config).eval().to(dtype)
        z = torch.randn(1, vae_config["latent_channels"], latent, latent, dtype=dtype)
        results.append(timed("VAE decode", args.runs, lambda: vae.decode(z)))
    print(json.dumps({"runtime": f"torch {torch.__version__}", "model": os.path.basename(args.configs.rstrip("/")),
                      "size": size, "dtype": args.dtype, "threads": torch.get_num_threads(),
                      "results": results}))


if __name__ == "__main__":
    main()
