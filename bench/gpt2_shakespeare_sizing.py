"""Choose the size of the self-trained gpt2-shakespeare reference model by measurement.

Phase 1 times a training step of each candidate on this CPU and turns the build budget into a step
count. Phase 2 trains each candidate for a fraction of its budgeted steps (a proxy: the full budget for
every candidate would take an hour) and prints its held-out cross-entropy; the best goes into
`normsurgery.reference.gpt2_shakespeare.TrainConfig`, and the real build measures it at full budget.

    python bench/gpt2_shakespeare_sizing.py [--budget-s 660] [--proxy 0.25]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from normsurgery.reference.gpt2_shakespeare import TrainConfig, train

CANDIDATES = {
    "L4-d128-h4": dict(n_layer=4, n_embd=128, n_head=4),
    "L4-d192-h6": dict(n_layer=4, n_embd=192, n_head=6),
    "L6-d192-h6": dict(n_layer=6, n_embd=192, n_head=6),
    "L4-d256-h8": dict(n_layer=4, n_embd=256, n_head=8),
}


def seconds_per_step(cfg: TrainConfig, steps: int = 12) -> float:
    """Median wall time of a training step (the first two steps are warm-up)."""
    stamps: list[float] = []
    train(replace(cfg, steps=steps, warmup=1, eval_tokens=cfg.n_positions), on_step=lambda s, l: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=660.0, help="training seconds the build may spend")
    parser.add_argument("--proxy", type=float, default=0.25, help="fraction of the budgeted steps to train in phase 2")
    args = parser.parse_args()
    base = TrainConfig()
    rows = []
    for name, dims in CANDIDATES.items():
        cfg = replace(base, **dims)
        sps = seconds_per_step(cfg)
        budget_steps = int(args.budget_s / sps)
        proxy = replace(cfg, steps=int(budget_steps * args.proxy), warmup=max(1, int(budget_steps * args.proxy * 0.07)))
        _, _, facts = train(proxy)
        rows.append((name, facts["parameters"], sps, budget_steps, proxy.steps, facts["train_seconds"], facts["heldout_ce_nats_per_token"]))
        print(f"{name}: {facts['parameters']:,} params, {sps:.3f} s/step, {budget_steps} steps in budget, "
              f"proxy {proxy.steps} steps in {facts['train_seconds']} s -> held-out CE {facts['heldout_ce_nats_per_token']}", flush=True)
    print("\n| candidate | parameters | s/step | steps in budget | proxy steps | proxy s | held-out CE (nats/token) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]:,} | {row[2]:.3f} | {row[3]} | {row[4]} | {row[5]} | {row[6]} |")


if __name__ == "__main__":
    main()
