"""The benchmark runs end to end on the CPU with tiny step counts and prints every row (speed itself is never
asserted: timings are not tests)."""

from __future__ import annotations

import re

import torch

from ubwlib.bench import bench_crafting, bench_grad_norms, main
from ubwlib.data import ImageDataset
from ubwlib.models import build_model


def _random(n: int) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=g),
                        torch.randint(0, 3, (n,), generator=g), ("a", "b", "c"), "random")


def test_crafting_and_gradient_norm_rates_are_positive_and_leave_the_model_alone():
    model = build_model("smallcnn", 3, 1, 0.25, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _random(40)
    assert bench_crafting(model, data, batch_size=8, steps=2, warmup=1, device=torch.device("cpu")) > 0
    assert bench_grad_norms(model, data, torch.device("cpu"), warmup=8) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # timing trains nothing


def test_main_prints_the_trainer_and_the_loop_rows(capsys):
    assert main(["--profile", "smoke", "--steps", "2", "--plain-steps", "2", "--cifar-steps", "0",
                 "--craft-steps", "1", "--norm-images", "64"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ubwlib bench: .+, \d+ threads, (fp32|bf16) \(.+\), torch .+, device cpu, ubwlib precision "
                     r"(fp32|bf16)$", out, re.M)
    assert re.search(r"smoke: smallcnn x0\.5, \(1, 28, 28\), batch \d+ +[\d,]+ +[\d,]+ +[\d,]+ +[\d.]+x", out)
    assert re.search(r"gradient-matching crafting step, smallcnn x0\.5, batch 128 +[\d,]+ poisons/s", out)
    assert re.search(r"per-sample gradient norms, smallcnn x0\.5 +[\d,]+ images/s", out)
    assert "GPU" not in out  # the GPU rows only where a GPU is
