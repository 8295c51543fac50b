"""The benchmark runs end to end on the CPU with tiny step counts and prints every row (speed itself is never
asserted: timings are not tests)."""

from __future__ import annotations

import re

import pytest
import torch

from ubwlib.bench import bench_crafting, bench_grad_norms, bench_plain, main
from ubwlib.data import ImageDataset
from ubwlib.models import build_model
from ubwlib.train import TrainConfig


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


def test_the_plain_loop_trains_its_model_in_the_default_layout():
    """The plain loop stands for a model built the usual way: ubwlib's channels-last weights are moved to PyTorch's
    default layout for it, and it trains them."""
    model = build_model("resnet18-cifar", 3, 1, 0.0625, seed=0)
    assert not model.layer1[0].conv1.weight.is_contiguous()  # built channels-last
    before = model.conv1.weight.detach().clone()
    assert bench_plain(model, _random(24), TrainConfig(batch_size=8), steps=1, warmup=1,
                       device=torch.device("cpu")) > 0
    assert all(p.is_contiguous() for p in model.parameters())
    assert not torch.equal(model.conv1.weight, before)


def test_main_prints_the_trainer_and_the_loop_rows(capsys):
    assert main(["--profile", "smoke", "--steps", "2", "--plain-steps", "2", "--cifar-steps", "0",
                 "--craft-steps", "1", "--norm-images", "64", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "; smoke rows: medians of 2 interleaved rounds" in out
    assert re.search(r"^ubwlib bench: .+, \d+ threads, (fp32|bf16) \(.+\), torch .+, device cpu, ubwlib precision "
                     r"(fp32|bf16)$", out, re.M)
    assert re.search(r"smoke: smallcnn x0\.5, \(1, 28, 28\), batch \d+ +[\d,]+ +[\d,]+ +[\d,]+ +[\d.]+x", out)
    assert re.search(r"gradient-matching crafting step, smallcnn x0\.5, batch 128 +[\d,]+ poisons/s", out)
    assert re.search(r"per-sample gradient norms, smallcnn x0\.5 +[\d,]+ images/s", out)
    assert re.search(r"^smallcnn x0\.5 alone \(fp32, batches kept on the device, no data pipeline\): [\d,]+ img/s in "
                     r"the default layout, [\d,]+ channels-last$", out, re.M)
    assert re.search(r"data pipeline takes \d+% of its time, and the model alone channels-last runs [\d.]+x the plain "
                     r"loop", out)
    assert "GPU" not in out  # the GPU rows only where a GPU is


@pytest.mark.filterwarnings("ignore:This DataLoader will create 8 worker processes")
def test_the_gpu_rows_run_end_to_end_on_the_cpu_with_a_tiny_model(monkeypatch):
    """The GPU table's code path (eager and compiled trainer rows with their compilation time, plain loops with 0
    and 8 workers, crafting, gradient norms), here on the CPU with a tiny model in place of ResNet-18 and
    torch.compile as the identity (no GPU, and no C++ compilation in a test)."""
    import argparse

    from ubwlib.bench import _gpu_rows

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    rows = _gpu_rows(argparse.Namespace(cifar_steps=1), torch.device("cpu"),
                     lambda name, width, k, c: build_model("smallcnn", k, c, 0.125, seed=0))
    assert [(name, unit) for name, unit, _ in rows] == [
        ("GPU ubwlib, resnet18-cifar, batch 128", "images/s"),
        ("GPU ubwlib, resnet18-cifar, batch 512", "images/s"),
        ("GPU ubwlib compiled (CUDA graphs), resnet18-cifar, batch 128", "images/s"),
        ("  its compilation", "s"),
        ("GPU ubwlib compiled (CUDA graphs), resnet18-cifar, batch 512", "images/s"),
        ("  its compilation", "s"),
        ("GPU ubwlib, resnet18-cifar, batch 128, fp32", "images/s"),
        ("GPU plain loop, resnet18-cifar, batch 128, 0 workers", "images/s"),
        ("GPU plain loop, resnet18-cifar, batch 128, 8 workers", "images/s"),
        ("GPU crafting step, resnet18-cifar, batch 128", "poisons/s"),
        ("GPU crafting step compiled, resnet18-cifar, batch 128", "poisons/s"),
        ("GPU per-sample gradient norms, resnet18-cifar", "images/s"),
    ]
    assert all(rate > 0 for _, unit, rate in rows if unit != "s")
    assert all(seconds >= 0 for _, unit, seconds in rows if unit == "s")


def test_the_model_alone_trains_one_resident_batch_in_the_layout_asked():
    """The ceiling rows: the model's own step on resident batches, no DataLoader; it trains the model in the layout
    asked, and needs a whole batch."""
    from ubwlib.bench import bench_model_alone

    for fmt in (torch.contiguous_format, torch.channels_last):
        model = build_model("resnet18-cifar", 3, 1, 0.0625, seed=0)
        before = model.conv1.weight.detach().clone()
        assert bench_model_alone(model, _random(24), TrainConfig(batch_size=8), steps=2, warmup=1,
                                 device=torch.device("cpu"), memory_format=fmt) > 0
        assert all(p.is_contiguous(memory_format=fmt) for p in model.parameters() if p.dim() == 4)
        assert not torch.equal(model.conv1.weight, before)


def test_loop_rows_print_as_measured_and_a_failure_does_not_stop_the_others(capsys):
    """On a lent GPU machine a call can end at its time limit or one compiled loop can fail: each row is printed as
    soon as it is measured, a failing one as FAILED (rate nan), and the rows after it still run."""
    from ubwlib.bench import _Loops

    loops = _Loops()
    loops.add("first", "images/s", lambda: 1234.4)
    assert capsys.readouterr().out.splitlines()[-1].split() == ["first", "1,234", "images/s"]  # printed already

    def broken():
        raise RuntimeError("graph capture failed\nmore detail")

    loops.add("second", "poisons/s", broken)
    loops.add("compiled", "images/s", lambda: (2000.0, 12.6))
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["second", "nan", "poisons/s"]
    assert out[1].strip() == "FAILED (RuntimeError: graph capture failed)"
    assert [line.split() for line in out[2:]] == [["compiled", "2,000", "images/s"], ["its", "compilation", "13", "s"]]
    assert [(n, u) for n, u, _ in loops.rows] == [("first", "images/s"), ("second", "poisons/s"),
                                                   ("compiled", "images/s"), ("  its compilation", "s")]


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        main(["--rounds", "0"])


def test_the_model_alone_needs_a_whole_batch():
    from ubwlib.bench import bench_model_alone

    with pytest.raises(ValueError, match="at least one batch of 8 images, got 5"):
        bench_model_alone(build_model("smallcnn", 3, 1, 0.25, seed=0), _random(5), TrainConfig(batch_size=8), steps=1,
                          warmup=0, device=torch.device("cpu"), memory_format=torch.channels_last)
