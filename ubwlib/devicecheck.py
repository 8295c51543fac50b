"""One prepared run for a lent GPU machine: the CUDA code paths checked against eager, the bench, and the `full`
profile's stored tables, chapter by chapter, in one command that writes what it finishes as it goes.

    python -m ubwlib.devicecheck --out "$OUT" --budget 540

A lent machine comes for minutes, bare, with the working tree but not ``.git``, a Python with torch but no
jupyter-book, and no network. So everything it should measure is prepared
here and tested on the CPU (``tests/test_devicecheck.py`` runs this module end to end on the smoke profile), and
the machine's minutes go to one call of this module. It writes into ``--out``:

- ``env.txt``: the machine (:func:`ubwlib.experiments.provenance.machine`), torch, CUDA and the commit;
- ``checks.txt``: the CUDA paths that CI (CPU only) cannot run, each against its eager counterpart on the same
  inputs: a training through ``torch.compile`` as CUDA graphs against the eager one (the same seed: the losses
  of every epoch and the final accuracy side by side, which rounding alone may separate a little), the compiled
  crafting step against the eager double backward (cosine of the two gradients, relative loss gap) and
  ``predict_proba`` on the device against the CPU (largest probability gap). A failure is written down and the
  run goes on;
- ``bench.txt``: ``python -m ubwlib.bench`` (on a GPU with the GPU rows of issue 11);
- ``results.tar.gz``: ``results/<profile>/`` as ``python -m ubwlib.book --store --via recipes`` stores it,
  packed again after every chapter, so the chapters finished before a time-out come back;
- ``log.txt``: the time each part took, and why a part was skipped.

Chapters are run in the order of issue 12 (:data:`ubwlib.experiments.stored.CHAPTERS`, or ``--chapters``) while at
least ``--chapter-reserve`` seconds of ``--budget`` are left; a chapter that is still running when the machine's
call ends is lost, the ones before it are not. Give the commit with ``UBW_COMMIT``
(:data:`ubwlib.experiments.provenance.COMMIT_ENV`) so the stored tables record it, and the Fashion-MNIST files with
``UBW_DATA`` (a git-ignored folder named in the call's carry).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["check_compiled_training", "check_compiled_crafting", "check_predict_proba", "run_checks",
           "main"]


class _Tee(io.TextIOBase):
    """Writes to a file and to the console at once (a part's output is kept even if a later part hangs)."""

    def __init__(self, path: Path, console) -> None:
        self.file = path.open("a", buffering=1)
        self.console = console

    def write(self, s: str) -> int:
        self.file.write(s)
        self.console.write(s)
        return len(s)

    def flush(self) -> None:
        self.file.flush()
        self.console.flush()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes both first
            self.file.close()


def _data(n: int, shape: tuple[int, int, int] = (1, 28, 28), classes: int = 10, seed: int = 0):
    from .data import ImageDataset

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    # learnable images: a class-dependent bright square on noise, so a few epochs move the accuracy off chance
    images = torch.randint(0, 96, (n, *shape), dtype=torch.uint8, generator=g)
    side = shape[1] // 4
    for k in range(classes):
        r, c = divmod(k, 4)
        images[labels == k, :, r * side:(r + 1) * side, c * side:(c + 1) * side] = 255
    return ImageDataset(images, labels, tuple(str(k) for k in range(classes)), "device check")


def check_compiled_training(device: torch.device, *, model: str = "resnet18-cifar", width: float = 0.25,
                            n: int = 2048, epochs: int = 3) -> dict:
    """The same seeded training eager and through ``torch.compile`` (CUDA graphs on a GPU): per-epoch losses, the
    final training accuracy and the wall time of each, and the largest gap between the two loss curves."""
    from .models import build_model
    from .train import TrainConfig, accuracy, train

    data = _data(n)
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.05, schedule="onecycle", seed=0)
    out = {}
    for mode in ("off", "on"):
        net = build_model(model, 10, 1, width, seed=0)
        t0 = time.perf_counter()
        _, hist = train(net, data, cfg, device=device, progress=False, compile=mode)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[mode] = {"loss": [round(float(v), 4) for v in hist["loss"]], "seconds": round(time.perf_counter() - t0, 2),
                     "accuracy": round(accuracy(net, data, device=device), 4)}
    out["largest loss gap"] = round(max(abs(a - b) for a, b in zip(out["off"]["loss"], out["on"]["loss"])), 4)
    return out


def check_compiled_crafting(device: torch.device, *, model: str = "resnet18-cifar", width: float = 0.25,
                            batch: int = 64) -> dict:
    """The crafting step's gradient with respect to the perturbation, compiled against the eager double backward on
    the same batch: their cosine and the relative gap of the passenger losses."""
    from .bench import relabelled_target
    from .models import build_model
    from .train import resolve_precision
    from .watermarks.gradient_matching import CompiledPassengerGrad, perturbation_grad

    net = build_model(model, 10, 1, width, seed=0).to(device).eval()
    data = _data(batch)
    base = data.images.to(device).float() / 255
    labels = data.labels.to(device)
    targets = [relabelled_target(net, base, labels, data.num_classes)]
    prec = resolve_precision("auto", device)
    compiled = CompiledPassengerGrad(device)
    grads, losses = [], []
    for fast in (None, compiled):
        d = (torch.rand(base.shape, device=device, generator=torch.Generator(device=device).manual_seed(1)) - 0.5) / 32
        d.requires_grad_(True)
        for _ in range(3 if fast is not None else 1):  # a compiled graph is checked after its warm-up replays
            g, value = perturbation_grad([net], targets, base + d, d, labels, prec, compiled=fast)
        grads.append(g.detach().flatten().float())
        losses.append(float(value.detach()))
    cos = float(F.cosine_similarity(grads[0], grads[1], dim=0))
    return {"cosine": round(cos, 6), "loss eager": round(losses[0], 6), "loss compiled": round(losses[1], 6),
            "relative loss gap": round(abs(losses[0] - losses[1]) / max(abs(losses[0]), 1e-12), 6),
            "compiled path taken": not compiled.failed}


def check_predict_proba(device: torch.device, *, model: str = "resnet18-cifar", width: float = 0.25,
                        n: int = 1000) -> dict:
    """``predict_proba`` on ``device`` against the CPU in float32: the largest gap between the probabilities."""
    from .models import build_model
    from .train import predict_proba

    data = _data(n)
    net = build_model(model, 10, 1, width, seed=0)
    on_cpu = predict_proba(net, data, device="cpu", precision="fp32")
    on_dev = predict_proba(net, data, device=device, precision="fp32")
    return {"largest probability gap": float((on_cpu - on_dev).abs().max()), "shape": list(on_dev.shape)}


def run_checks(device: torch.device, write: Callable[[str], None], **sizes) -> dict[str, dict | str]:
    """Every check on ``device``; each result (or its error) is written as soon as it is known."""
    results: dict[str, dict | str] = {}
    for name, check in (("compiled training", check_compiled_training), ("compiled crafting", check_compiled_crafting),
                        ("predict_proba", check_predict_proba)):
        t0 = time.perf_counter()
        try:
            results[name] = check(device, **sizes)
        except Exception:  # noqa: BLE001 (a failed check is the finding: write it and go on)
            results[name] = "FAILED\n" + traceback.format_exc()
        write(f"{name} ({time.perf_counter() - t0:.1f} s): {results[name]}\n")
    return results


def _pack(src: Path, dest: Path) -> None:
    tmp = dest.with_suffix(".partial")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    tmp.replace(dest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ubwlib.devicecheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for env.txt, checks.txt, bench.txt, results.tar.gz, log.txt")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds this run may take (default 540)")
    ap.add_argument("--profile", default="full", help="profile of the stored tables (default: full)")
    ap.add_argument("--chapters", default=None,
                    help="chapters to store, in order, commas allowed ('' for none; default: every chapter with "
                         "tables, in issue 12's order)")
    ap.add_argument("--chapter-reserve", type=float, default=120.0,
                    help="start another chapter only while this many seconds of the budget are left (default 120)")
    ap.add_argument("--bench-args", default="", help="arguments for python -m ubwlib.bench ('skip' to skip it)")
    ap.add_argument("--no-checks", action="store_true", help="skip the CUDA-path checks")
    ap.add_argument("--device", default=None, help="default: CUDA when available")
    args = ap.parse_args(argv)

    from . import bench, book
    from .experiments import stored
    from .experiments.provenance import commit, machine
    from .train import resolve_device

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chapters = (list(stored.CHAPTERS) if args.chapters is None
                else [c for c in args.chapters.replace(",", " ").split() if c])
    for c in chapters:
        stored.chapter_tables(c)  # an unknown chapter fails here, before the machine's minutes go
    dev = resolve_device(args.device)
    console = sys.stdout
    log = _Tee(out / "log.txt", console)

    def note(msg: str) -> None:
        log.write(f"[{time.perf_counter() - start:7.1f} s] {msg}\n")

    (out / "env.txt").write_text(
        f"machine: {machine()}\ndevice: {dev}\ntorch: {torch.__version__}, CUDA {torch.version.cuda}\n"
        f"commit: {commit()}\npython: {sys.version.split()[0]}\n")
    note(f"device check on {dev} ({machine()}), budget {args.budget:.0f} s")

    if not args.no_checks:
        with _Tee(out / "checks.txt", console) as checks:
            run_checks(dev, checks.write)
        note("checks done")
    if args.bench_args.strip() != "skip":
        with _Tee(out / "bench.txt", console) as tee:
            try:
                with contextlib.redirect_stdout(tee):
                    bench.main(args.bench_args.split() + (["--device", str(dev)] if args.device else []))
            except Exception:  # noqa: BLE001 (the stored tables may still fit in the budget)
                tee.write("FAILED\n" + traceback.format_exc())
        note("bench done")
    with tempfile.TemporaryDirectory(prefix="ubw-results-") as tmp:
        root = Path(tmp)
        for chapter in chapters:
            left = args.budget - (time.perf_counter() - start)
            if left < args.chapter_reserve:
                note(f"{chapter} and after: skipped, {left:.0f} s left of the budget "
                     f"(reserve {args.chapter_reserve:.0f})")
                break
            t0 = time.perf_counter()
            try:
                book.store_results(args.profile, [chapter], root=root, via="recipes",
                                   command=f"python -m ubwlib.devicecheck --profile {args.profile} (chapter {chapter})")
                note(f"{chapter}: stored in {time.perf_counter() - t0:.1f} s")
            except Exception:  # noqa: BLE001
                note(f"{chapter}: FAILED after {time.perf_counter() - t0:.1f} s\n{traceback.format_exc()}")
            if (root / args.profile).is_dir():
                _pack(root / args.profile, out / "results.tar.gz")
    note("done")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
