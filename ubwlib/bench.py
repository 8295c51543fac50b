"""Benchmark: ubwlib's trainer against a plain PyTorch loop, side by side in one run.

    python -m ubwlib.bench            # or: make bench

The plain loop is what most tutorials write: a torchvision-style dataset of PIL images with per-sample
transforms (the same crop/flip as the profile), a ``torch.utils.data.DataLoader``, float32, and the model and
tensors in PyTorch's default memory layout, as a model built the usual way has them (ubwlib builds its models
channels-last, :mod:`ubwlib.models`; the plain loop moves its copy to the default layout). ubwlib's trainer
keeps the uint8 data as one tensor on the device, augments whole batches there, runs channels-last on a CPU and
uses bfloat16 autocast where the hardware supports it. Both train the same model
(same architecture, same initial weights) on the same images for the same number of steps; the first
steps of each are a warm-up and are not timed. The profile's rows take turns for ``--rounds`` rounds and the table
prints each one's median images/s and the ratio (the speed of a shared virtual machine drifts by 10-30% over
minutes, more than rows timed one after the other can tell apart). Below it, the model's own
training step alone, float32 on batches kept on the device, in the default layout and channels-last
(:func:`bench_model_alone`), says where the plain loop's time goes: the share its data pipeline takes, and the
ratio a trainer running the same kernels with no data cost at all would reach. Both loops run in one
process and so both get ubwlib's allocator settings (:func:`ubwlib.train.keep_freed_memory`, applied on import);
``UBW_MALLOC=system python -m ubwlib.bench`` runs both with glibc's defaults.

A second table, printed a row at a time as each is measured (a failing row is printed as such and the others
still run), times the two other hot loops of the book on the same model: the crafting step of gradient
matching (poisons/s: augment, per-batch parameter gradient with ``create_graph``, passenger loss against a target
gradient, gradient with respect to the perturbation: a double backward) and the per-sample gradient norms that
select the poisons (images/s). With a GPU, the CIFAR-shape ResNet-18 rows add ubwlib at batch 128 and 512 (eager,
and compiled as CUDA graphs with the compilation's seconds), in float32, the plain loop with 0 and 8 DataLoader
workers, and the crafting step eager and compiled (the figures of issue 11); ``--compile`` times the compiled
trainer and crafting step on a CPU too. Where the profile trains
several models side by side (``Profile.stack``), a row times :func:`ubwlib.train.train_many` with that many.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .data import DataNotFoundError, ImageDataset, load_dataset
from .experiments.profiles import get_profile
from .experiments.provenance import machine
from .models import build_model
from .train import TrainConfig, cpu_features, resolve_device, resolve_precision, train, train_many
from .watermarks.gradient_matching import (
    GradientMatchingSettings,
    CompiledPassengerGrad,
    crafting_augment,
    per_sample_grad_norms,
    perturbation_grad,
)

__all__ = ["bench_ubwlib", "bench_compiled", "bench_ubwlib_many", "bench_plain", "bench_model_alone", "bench_crafting",
           "bench_grad_norms", "relabelled_target", "main"]


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


class _PILDataset(Dataset):
    """The usual per-sample pipeline: uint8 array -> PIL image -> torchvision transforms -> tensor."""

    def __init__(self, data: ImageDataset, padding: int, flip: bool) -> None:
        from torchvision import transforms

        self.images = data.images.permute(0, 2, 3, 1).numpy()  # N x H x W x C
        self.labels = data.labels.tolist()
        size = data.image_shape[1:]
        tf = []
        if padding:
            tf.append(transforms.RandomCrop(size, padding=padding))
        if flip:
            tf.append(transforms.RandomHorizontalFlip())
        tf.append(transforms.ToTensor())
        self.transform = transforms.Compose(tf)
        self.gray = data.image_shape[0] == 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        arr = self.images[i]
        img = Image.fromarray(arr[..., 0] if self.gray else arr)
        return self.transform(img), self.labels[i]


def bench_plain(model: torch.nn.Module, data: ImageDataset, cfg: TrainConfig, steps: int, warmup: int,
                device: torch.device, num_workers: int = 0) -> float:
    """images/s of a plain float32 DataLoader loop (timed after ``warmup`` steps), with the model in PyTorch's
    default memory layout, as a model built the usual way has it (ubwlib's models are built channels-last)."""
    model = model.to(device, memory_format=torch.contiguous_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = DataLoader(_PILDataset(data, cfg.crop_padding, cfg.flip), batch_size=cfg.batch_size, shuffle=True,
                        num_workers=num_workers, drop_last=True)
    seen, t0 = 0, None
    it = iter(loader)
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= warmup:
            seen += len(y)
    _sync(device)
    return seen / (time.perf_counter() - t0)


def bench_model_alone(model: torch.nn.Module, data: ImageDataset, cfg: TrainConfig, steps: int, warmup: int,
                      device: torch.device, memory_format: torch.memory_format) -> float:
    """images/s of the model's own training step alone, in float32: forward, loss, backward and SGD step on batches
    already converted to float and kept on the device (``data``'s batches of ``cfg.batch_size`` in turn, no
    augmentation, no shuffling), the model and the batches in ``memory_format``. No data pipeline at all, so the
    plain loop's rate over this rate in the default layout is the share of its time that its DataLoader and
    per-sample transforms take, and this rate channels-last over the plain loop's is the most ubwlib's trainer can
    gain on it with the same kernels. The batches take turns as in training (one batch over and over would be fitted
    within 30 steps, a loss of 1e-3, no longer a training step's numbers; its speed, measured, was the same)."""
    model = model.to(device, memory_format=memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(data) // cfg.batch_size * cfg.batch_size
    if n == 0:
        raise ValueError(f"bench_model_alone needs at least one batch of {cfg.batch_size} images, got {len(data)}")
    xs = (data.images[:n].to(device).float() / 255).contiguous(memory_format=memory_format).split(cfg.batch_size)
    ys = data.labels[:n].to(device).split(cfg.batch_size)
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        b = step % len(xs)
        loss = F.cross_entropy(model(xs[b]), ys[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def bench_ubwlib(model: torch.nn.Module, data: ImageDataset, cfg: TrainConfig, steps: int, warmup: int,
                 device: torch.device, compile: str = "off") -> float:
    """images/s of ubwlib.train (a warm-up run of ``warmup`` steps, then a timed run of ``steps`` steps);
    ``compile`` as :func:`ubwlib.train.train` takes it (the warm-up pays the compilation)."""
    return bench_compiled(model, data, cfg, steps, warmup, device, compile)[0]


def bench_compiled(model: torch.nn.Module, data: ImageDataset, cfg: TrainConfig, steps: int, warmup: int,
                   device: torch.device, compile: str = "on") -> tuple[float, float]:
    """``(images/s, compilation seconds)`` of ubwlib.train with ``compile``: the rate of a timed run of ``steps``
    steps after a warm-up run of ``warmup`` steps, and the warm-up's time beyond what its steps take at that rate
    (the compilation and first-call costs: 0 when nothing is compiled, but for noise)."""
    def subset(n_batches: int) -> ImageDataset:
        n = min(len(data), n_batches * cfg.batch_size)
        return data.subset(torch.arange(n))

    one = cfg.replace(epochs=1, drop_last=True, schedule="constant")
    first = subset(warmup)
    _sync(device)
    t0 = time.perf_counter()
    train(model, first, one, device=device, progress=False, compile=compile)
    _sync(device)
    warm_seconds = time.perf_counter() - t0
    timed = subset(steps)
    t0 = time.perf_counter()
    train(model, timed, one, device=device, progress=False, compile=compile)
    _sync(device)
    rate = (len(timed) // cfg.batch_size * cfg.batch_size) / (time.perf_counter() - t0)
    return rate, max(0.0, warm_seconds - len(first) // cfg.batch_size * cfg.batch_size / rate)


def bench_ubwlib_many(build, data: ImageDataset, cfg: TrainConfig, count: int, steps: int, warmup: int,
                      device: torch.device) -> float:
    """images/s of :func:`ubwlib.train.train_many` with ``count`` models (``build(i)``) side by side, each on its own
    copy of the data with its own seed: images seen by all the models together per second."""
    def subset(n_batches: int) -> ImageDataset:
        n = min(len(data), n_batches * cfg.batch_size)
        return data.subset(torch.arange(n))

    one = cfg.replace(epochs=1, drop_last=True, schedule="constant")
    configs = [one.replace(seed=one.seed + i) for i in range(count)]
    train_many([build(i) for i in range(count)], [subset(warmup)] * count, configs, device=device, progress=False)
    timed = subset(steps)
    models = [build(i) for i in range(count)]
    _sync(device)
    t0 = time.perf_counter()
    train_many(models, [timed] * count, configs, device=device, progress=False)
    _sync(device)
    return count * (len(timed) // cfg.batch_size * cfg.batch_size) / (time.perf_counter() - t0)


def relabelled_target(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A target gradient for timing or checking the crafting step, and its norm: the parameters' gradient of the
    loss of ``images`` (float, on the model's device) relabelled ``label + 1`` (the passenger loss only needs a
    fixed direction)."""
    loss = F.cross_entropy(model(images).float(), (labels + 1) % num_classes)
    target = [g.detach() for g in torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])]
    return target, torch.sqrt(sum((t * t).sum() for t in target))


def bench_crafting(model: torch.nn.Module, data: ImageDataset, batch_size: int, steps: int, warmup: int,
                   device: torch.device, precision: str = "fp32", compile: bool = False) -> float:
    """poisons/s of gradient matching's crafting step (the inner loop of
    :func:`ubwlib.watermarks.gradient_matching.craft`: crafting augmentation, passenger loss with a double
    backward, gradient with respect to the perturbation), one surrogate, batches of ``batch_size`` poisons;
    ``compile``: the compiled :func:`~ubwlib.watermarks.gradient_matching.passenger_input_grad` that ``craft``
    takes with ``compile="on"`` (the warm-up steps pay the compilation)."""
    model = model.to(device).eval()
    settings = GradientMatchingSettings()
    gen = torch.Generator(device="cpu").manual_seed(0)
    n = len(data)
    base = data.images.to(device).float() / 255
    labels = data.labels.to(device)
    target, target_norm = relabelled_target(model, base[:batch_size], labels[:batch_size], data.num_classes)
    delta = torch.zeros_like(base)
    compiled = CompiledPassengerGrad(device) if compile else None
    seen, t0 = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        b = (step * batch_size) % max(1, n - batch_size + 1)
        d = delta[b : b + batch_size].detach().requires_grad_(True)
        x = crafting_augment(base[b : b + batch_size] + d, settings, gen)
        g, _ = perturbation_grad([model], [(target, target_norm)], x, d, labels[b : b + batch_size], precision,
                                 compiled=compiled)
        delta[b : b + batch_size] -= 1e-3 * g.sign()
        if step >= warmup:
            seen += len(d)
    _sync(device)
    return seen / (time.perf_counter() - t0)


def bench_grad_norms(model: torch.nn.Module, data: ImageDataset, device: torch.device, warmup: int = 256) -> float:
    """images/s of :func:`~ubwlib.watermarks.gradient_matching.per_sample_grad_norms` over ``data`` (after a
    warm-up on its first ``warmup`` images)."""
    model = model.to(device)
    per_sample_grad_norms(model, data.images[:warmup], data.labels[:warmup], device=device)
    _sync(device)
    t0 = time.perf_counter()
    per_sample_grad_norms(model, data.images, data.labels, device=device)
    _sync(device)
    return len(data) / (time.perf_counter() - t0)


def _data_for(profile, n_needed: int) -> tuple[ImageDataset, str]:
    try:
        d = load_dataset(profile.dataset, root=profile.data_root).train
        return d.subset(torch.arange(min(len(d), n_needed))), f"{profile.dataset} (real)"
    except DataNotFoundError:
        g = torch.Generator().manual_seed(0)
        c, h, w = (1, 28, 28) if "mnist" in profile.dataset else (3, 32, 32)
        imgs = torch.randint(0, 256, (n_needed, c, h, w), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (n_needed,), generator=g)
        return ImageDataset(imgs, labels, tuple(str(i) for i in range(10)), "random"), "random uint8 (dataset missing)"


def _cifar_shape(n: int) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageDataset(imgs, torch.randint(0, 10, (n,), generator=g), tuple(str(i) for i in range(10)), "cifar-shape")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ubwlib.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default", help="profile whose model/data/batch size to use")
    ap.add_argument("--steps", type=int, default=40, help="timed steps of ubwlib's trainer (default-profile model)")
    ap.add_argument("--plain-steps", type=int, default=15, help="timed steps of the plain loop")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the profile's rows, taken in turn; the table shows medians (default 3)")
    ap.add_argument("--cifar-steps", type=int, default=6, help="timed steps for CIFAR-shape ResNet-18 (0: skip)")
    ap.add_argument("--craft-steps", type=int, default=4, help="timed crafting steps (0: skip)")
    ap.add_argument("--norm-images", type=int, default=2048, help="images for the gradient-norm pass (0: skip)")
    ap.add_argument("--compile", action="store_true",
                    help="on a CPU, also time the trainer through torch.compile (tens of seconds of compilation; "
                         "always timed on a GPU)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")

    dev = resolve_device(args.device)
    prof = get_profile(args.profile)
    cfg = prof.train
    prec = resolve_precision(cfg.precision, dev)
    cpu = f" ({cpu_features()})" if dev.type == "cpu" else ""
    print(f"ubwlib bench: {machine()}{cpu}, torch {torch.__version__}, device {dev}, ubwlib precision {prec}")
    need = (max(args.steps, args.plain_steps) + 3) * cfg.batch_size
    data, origin = _data_for(prof, need)
    k, c = data.num_classes, data.image_shape[0]
    rows = []

    def model(name: str, width: float, kk: int, cc: int):
        return build_model(name, kk, cc, width, seed=0)

    fp32 = cfg.replace(precision="fp32")

    def build(i: int):
        return build_model(prof.model, k, c, prof.width, seed=i)

    # The main rows take turns, round after round, and the table shows each one's median: this machine's speed
    # drifts by 10-30% over minutes, and rows timed minutes apart compared that drift more than the loops.
    timings: dict[str, list[float]] = {}

    def take(key: str, rate: float) -> None:
        timings.setdefault(key, []).append(rate)

    for _ in range(args.rounds):
        take("ours", bench_ubwlib(build(0), data, cfg, args.steps, 3, dev))
        take("ours32", bench_ubwlib(build(0), data, fp32, args.steps, 3, dev))
        take("plain", bench_plain(build(0), data, cfg, args.plain_steps, 2, dev))
        if args.plain_steps > 0:  # where the plain loop's time goes: its model's kernels or its data pipeline
            for fmt in (torch.contiguous_format, torch.channels_last):
                take(str(fmt), bench_model_alone(build(0), data, cfg, args.steps, 2, dev, fmt))
        if prof.stack > 1:  # the profile's recipes train several models side by side: all of them per second
            take("many", bench_ubwlib_many(build, data, cfg, prof.stack, args.steps, 3, dev))
            take("many32", bench_ubwlib_many(build, data, fp32, prof.stack, args.steps, 3, dev))
    med = {key: statistics.median(v) for key, v in timings.items()}
    plain = med["plain"]
    alone = {fmt: med[str(fmt)] for fmt in (torch.contiguous_format, torch.channels_last) if str(fmt) in med}
    rows.append((f"{prof.name}: {prof.model} x{prof.width}, {tuple(data.image_shape)}, batch {cfg.batch_size}",
                 med["ours"], med["ours32"], plain))
    if prof.stack > 1:
        rows.append((f"  the same, {prof.stack} models side by side (train_many; images of all models)", med["many"],
                     med["many32"], plain))
    if args.cifar_steps > 0:
        ccfg = get_profile("paper").train
        cdata = _cifar_shape((args.cifar_steps + 2) * ccfg.batch_size)
        cm = lambda: model("resnet18-cifar", 1.0, 10, 3)  # noqa: E731
        ours_c = bench_ubwlib(cm(), cdata, ccfg, args.cifar_steps, 1, dev)
        ours_c32 = bench_ubwlib(cm(), cdata, ccfg.replace(precision="fp32"), max(2, args.cifar_steps // 2), 1, dev)
        plain_c = bench_plain(cm(), cdata, ccfg, max(2, args.cifar_steps // 2), 1, dev)
        rows.append((f"paper: resnet18-cifar x1.0, (3, 32, 32), batch {ccfg.batch_size}", ours_c, ours_c32, plain_c))

    print(f"data: {origin}")
    w = max(len(r[0]) for r in rows)
    print(f"{'model / data':<{w}}  {'ubwlib img/s':>13}  {'ubwlib fp32':>12}  {'plain img/s':>12}  {'ratio':>6}")
    for name, o, o32, p in rows:
        print(f"{name:<{w}}  {o:>13,.0f}  {o32:>12,.0f}  {p:>12,.0f}  {o / p:>5.1f}x")
    print("ratio = ubwlib (auto precision) / plain loop; 'ubwlib fp32' is ubwlib's trainer forced to float32"
          + (f"; {prof.name} rows: medians of {args.rounds} interleaved rounds" if args.rounds > 1 else ""))
    if alone:  # where the plain loop's time goes: its model's kernels or its data pipeline
        cf, cl = alone[torch.contiguous_format], alone[torch.channels_last]
        print(f"{prof.model} x{prof.width} alone (fp32, batches kept on the device, no data pipeline): "
              f"{cf:,.0f} img/s in the default layout, {cl:,.0f} channels-last")
        print(f"  so the plain loop's data pipeline takes {max(0.0, 1 - plain / cf):.0%} of its time, and the model "
              f"alone channels-last runs {cl / plain:.1f}x the plain loop (what a trainer with these kernels and no "
              "data cost would reach)")

    loops = _Loops()
    gm = GradientMatchingSettings()
    crafting_data = data.subset(torch.arange(min(len(data), (args.craft_steps + 1) * gm.batch_size)))
    if args.compile and dev.type == "cpu":
        loops.add(f"ubwlib fp32 compiled (torch.compile), {prof.model} x{prof.width}, batch {cfg.batch_size}",
                  "images/s", lambda: bench_compiled(build(0), data, fp32, args.steps, 3, dev))
        if args.craft_steps > 0:
            loops.add(f"crafting step compiled, {prof.model} x{prof.width}, batch {gm.batch_size}", "poisons/s",
                      lambda: bench_crafting(build(0), crafting_data, gm.batch_size, args.craft_steps, 2, dev, prec,
                                             compile=True))
    if args.craft_steps > 0:
        loops.add(f"gradient-matching crafting step, {prof.model} x{prof.width}, batch {gm.batch_size}", "poisons/s",
                  lambda: bench_crafting(build(0), crafting_data, gm.batch_size, args.craft_steps, 1, dev, prec))
    if args.norm_images > 0:
        loops.add(f"per-sample gradient norms, {prof.model} x{prof.width}", "images/s",
                  lambda: bench_grad_norms(build(0), data.subset(torch.arange(min(len(data), args.norm_images))),
                                           dev))
    if dev.type == "cuda" and args.cifar_steps > 0:
        _gpu_rows(args, dev, model, loops)
    return 0


class _Loops:
    """The second table, printed a row at a time as each is measured: a run stopped at a time limit (a lent GPU
    machine's call) keeps the rows before, and a row that fails is printed as failed while the others still run."""

    WIDTH = 72

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []

    def _print(self, name: str, unit: str, rate: float) -> None:
        if not self.rows:
            print(f"{'loop':<{self.WIDTH}}  {'rate':>12}", flush=True)
        self.rows.append((name, unit, rate))
        print(f"{name:<{self.WIDTH}}  {rate:>12,.0f} {unit}", flush=True)

    def add(self, name: str, unit: str, measure: Callable[[], float | tuple[float, float]]) -> None:
        """Run ``measure()`` (a rate, or ``(rate, compilation seconds)``, printed as a second row) and print it."""
        try:
            value = measure()
        except Exception as err:  # noqa: BLE001 (one failed loop must not cost the others' figures)
            first = (str(err).splitlines() or [""])[0][:160]
            self._print(name, unit, float("nan"))
            print(f"{'':<{self.WIDTH}}  FAILED ({type(err).__name__}: {first})", flush=True)
            return
        rate, seconds = value if isinstance(value, tuple) else (value, None)
        self._print(name, unit, rate)
        if seconds is not None:
            self._print("  its compilation", "s", seconds)


def _gpu_rows(args: argparse.Namespace, dev: torch.device, model, loops: _Loops | None = None
              ) -> list[tuple[str, str, float]]:
    """The GPU figures of issue 11 (CIFAR-shape ResNet-18): ubwlib at batch 128 and 512 (auto precision; eager, then
    compiled with its compilation time) and float32, the plain loop with 0 and 8 workers, crafting poisons/s (eager
    and compiled) and gradient-norm images/s; each printed as soon as it is measured (into ``loops``)."""
    loops = loops if loops is not None else _Loops()
    first = len(loops.rows)
    ccfg = get_profile("paper").train
    steps = max(args.cifar_steps, 20)

    def resnet():
        return model("resnet18-cifar", 1.0, 10, 3)

    for batch in (128, 512):
        cdata = _cifar_shape((steps + 3) * batch)
        loops.add(f"GPU ubwlib, resnet18-cifar, batch {batch}", "images/s",
                  lambda: bench_ubwlib(resnet(), cdata, ccfg.replace(batch_size=batch), steps, 3, dev))
    for batch in (128, 512):
        cdata = _cifar_shape((steps + 3) * batch)
        loops.add(f"GPU ubwlib compiled (CUDA graphs), resnet18-cifar, batch {batch}", "images/s",
                  lambda: bench_compiled(resnet(), cdata, ccfg.replace(batch_size=batch), steps, 3, dev))
    cdata = _cifar_shape((steps + 3) * 128)
    loops.add("GPU ubwlib, resnet18-cifar, batch 128, fp32", "images/s",
              lambda: bench_ubwlib(resnet(), cdata, ccfg.replace(precision="fp32"), steps, 3, dev))
    for workers in (0, 8):
        loops.add(f"GPU plain loop, resnet18-cifar, batch 128, {workers} workers", "images/s",
                  lambda: bench_plain(resnet(), cdata, ccfg, steps, 3, dev, workers))
    for compiled in (False, True):
        loops.add(f"GPU crafting step{' compiled' if compiled else ''}, resnet18-cifar, batch 128", "poisons/s",
                  lambda: bench_crafting(resnet(), cdata, 128, steps, 3, dev, resolve_precision("auto", dev),
                                         compile=compiled))
    loops.add("GPU per-sample gradient norms, resnet18-cifar", "images/s",
              lambda: bench_grad_norms(resnet(), cdata, dev))
    return loops.rows[first:]


if __name__ == "__main__":
    sys.exit(main())
