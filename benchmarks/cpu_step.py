"""One training step of a timm model on the CPU in fp32 and under bf16 autocast, alternated.

Usage::

    python benchmarks/cpu_step.py [MODEL] [--batch-size 32] [--steps 4] [--rounds 2]

What ``train.amp = "bf16"`` (opt-in; ``auto`` is fp32, docs/precision.md) gains on a CPU with hardware
bf16: forward, backward and an SGD-momentum step at batch 32 and 224 px, random init, the patch embedding frozen as ``sgd-freeze-embed`` does. Prints
each step's seconds per precision and round; the first step of each round includes warm-up.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="vit_tiny_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    opts = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(opts.model, num_classes=3)
    if hasattr(model, "patch_embed"):
        model.patch_embed.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    x, y = torch.randn(opts.batch_size, 3, 224, 224), torch.randint(0, 3, (opts.batch_size,))
    print(f"{opts.model}, batch {opts.batch_size}, {torch.get_num_threads()} threads")
    for mode in ["fp32", "bf16"] * opts.rounds:
        times = []
        for _ in range(opts.steps):
            start = time.perf_counter()
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                logits = model(x)
            torch.nn.functional.cross_entropy(logits.float(), y).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        print(mode, " ".join(f"{t:.2f}" for t in times), "s", flush=True)


if __name__ == "__main__":
    main()
