"""The ``ubw`` command.

    ubw --version
    ubw data [fashion-mnist|cifar10|imagefolder:PATH|imagenet50:PATH] [--root DIR] [--download] [--check]
    ubw cache [info|clear] [--namespace NS]
    ubw watermark METHOD --out FILE [--data SPEC] [--root DIR] [--rate G] [--seed S] [--target T]
    ubw verify KEY WEIGHTS --arch NAME [--width W] [--data SPEC] [--root DIR] [--m M] [--tau T] [--alpha A]
               [--seed S] [--classes C ...]
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _cmd_data(args: argparse.Namespace) -> int:
    from .data import DataIntegrityError, DataNotFoundError, describe_sources, load_dataset

    if args.spec == "fashion-mnist" and not args.check:
        print("Where ubwlib looks for Fashion-MNIST, in order:")
        for label, path, exists in describe_sources(args.spec, args.root):
            print(f"  {'found  ' if exists else 'missing'}  {label}: {path}")
    try:
        splits = load_dataset(args.spec, root=args.root, download=args.download)
    except (DataNotFoundError, DataIntegrityError) as exc:
        print(f"ubw data: {exc}", file=sys.stderr)
        return 1
    for part in (splits.train, splits.test):
        counts = part.class_counts().tolist()
        print(f"{part.name}: {len(part)} images of shape {tuple(part.image_shape)}, {part.num_classes} classes, "
              f"per class {min(counts)}..{max(counts)}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .cache import Cache

    cache = Cache()
    if args.action == "clear":
        try:
            n = cache.clear(args.namespace)
        except ValueError as exc:
            print(f"ubw cache: {exc}", file=sys.stderr)
            return 1
        print(f"removed {n} cache entr{'y' if n == 1 else 'ies'} from {cache.root}")
        return 0
    entries = cache.entries()
    plural = "entry" if len(entries) == 1 else "entries"
    print(f"cache: {cache.root} ({len(entries)} {plural}, {cache.size_bytes() / 2**20:.1f} MiB)")
    by_ns: dict[str, list] = {}
    for e in entries:
        by_ns.setdefault(e.namespace, []).append(e)
    for ns, items in sorted(by_ns.items()):
        word = "entry" if len(items) == 1 else "entries"
        print(f"  {ns}: {len(items)} {word}, {sum(e.size_bytes for e in items) / 2**20:.1f} MiB")
    return 0


def _cmd_watermark(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data import DataIntegrityError, DataNotFoundError, load_dataset
    from .watermarks import REGISTRY, get_watermark

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"ubw watermark: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    settings = {"poisoning_rate": args.rate}
    if args.target is not None:
        if not REGISTRY[args.method].targeted:
            print(f"ubw watermark: {args.method} is untargeted and takes no --target", file=sys.stderr)
            return 1
        settings["target"] = args.target
    try:
        wm = get_watermark(args.method, **settings)
        data = load_dataset(args.data, root=args.root)
        released = wm.watermark(data.train, seed=args.seed)
    except (DataNotFoundError, DataIntegrityError, ValueError) as exc:
        print(f"ubw watermark: {exc}", file=sys.stderr)
        return 1
    released.save(out)
    print(f"{args.method}: {len(released.indices)} of {len(released)} training samples watermarked "
          f"(gamma = {released.poisoning_rate:.4f}, seed {args.seed})")
    print(f"released dataset: {out}\nkey (keep it private, needed to verify): {out}.key")
    return 0


def _load_suspect(path: str, arch: str, width: float, num_classes: int, channels: int):
    """The suspicious model: ``arch`` built for the key's dataset, weights from a state_dict file read with
    ``weights_only=True`` (no pickled code runs)."""
    import torch

    from .models import build_model

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no model weights at {path}") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure: say what is expected
        raise ValueError(f"{path} is not a weights-only state_dict file ({type(exc).__name__}: {exc}); save the "
                         "model with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors); save the model with "
                         "torch.save(model.state_dict(), path)")
    model = build_model(arch, num_classes, channels, width)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"the weights in {path} do not fit {arch} (width {width}, {num_classes} classes, "
                         f"{channels} channels): {str(exc).splitlines()[0]}; check --arch and --width") from None
    return model.eval()


def _cmd_verify(args: argparse.Namespace) -> int:
    from .data import DataIntegrityError, DataNotFoundError, load_dataset
    from .verify import verify
    from .watermarks import WatermarkKey

    try:
        key = WatermarkKey.load(args.key)
        model = _load_suspect(args.weights, args.arch, args.width, key.num_classes, key.image_shape[0])
        test = load_dataset(args.data, root=args.root).test
        result = verify(model, test, key, m=args.m, tau=args.tau, alpha=args.alpha, seed=args.seed,
                        classes=args.classes)
    except FileNotFoundError as exc:
        print(f"ubw verify: {exc}", file=sys.stderr)
        return 1
    except (DataNotFoundError, DataIntegrityError, ValueError, TypeError) as exc:
        print(f"ubw verify: {exc}", file=sys.stderr)
        return 1
    print(f"{key.method} watermark, {result.m} correctly classified test images of {test.name}"
          f"{' (classes ' + str(args.classes) + ')' if args.classes else ''}")
    print(f"Delta P = {result.delta_p:.4f}  (mean P_b - P_p; tau = {result.tau})")
    print(f"p-value = {result.p_value:.3g}  (paired one-sided t-test, alpha = {result.alpha})")
    print(f"verdict: {result.verdict}"
          + (" - the model was trained on the protected dataset" if result.watermarked else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ubw", description="Untargeted Backdoor Watermarks (ubwlib).")
    ap.add_argument("--version", action="version", version=f"ubwlib {__version__}")
    sub = ap.add_subparsers(dest="command")

    d = sub.add_parser("data", help="find (or download) a dataset and describe it")
    d.add_argument("spec", nargs="?", default="fashion-mnist",
                   help="fashion-mnist (default), cifar10, imagefolder:PATH or imagenet50:PATH")
    d.add_argument("--root", default=None, help="look here first")
    d.add_argument("--download", action="store_true", help="allow torchvision to download (needs internet)")
    d.add_argument("--check", action="store_true", help="only report whether the dataset loads (exit 1 if not)")
    d.set_defaults(func=_cmd_data)

    c = sub.add_parser("cache", help="show or clear the cache of trained models and results")
    c.add_argument("action", nargs="?", choices=["info", "clear"], default="info")
    c.add_argument("--namespace", default=None, help="only this namespace (with clear)")
    c.set_defaults(func=_cmd_cache)

    from .watermarks import REGISTRY

    w = sub.add_parser("watermark", help="watermark a dataset's training split and save the release and its key")
    # clean-label watermarks train a surrogate first (hours on a CPU with the paper's schedule): Python API only
    w.add_argument("method", choices=sorted(k for k, v in REGISTRY.items() if v.label_type == "poisoned"),
                   help="the watermark (poisoned-label methods; the clean-label ones need a trained surrogate: "
                        "use ubwlib.watermarks from Python)")
    w.add_argument("--out", required=True, help="file for the released dataset (the key goes to FILE.key)")
    w.add_argument("--data", default="fashion-mnist", help="dataset spec (default: %(default)s)")
    w.add_argument("--root", default=None, help="dataset folder")
    w.add_argument("--rate", type=float, default=0.1, help="poisoning rate gamma (default: %(default)s)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--target", type=int, default=None, help="target label of targeted watermarks (default 1)")
    w.add_argument("--force", action="store_true", help="overwrite --out")
    w.set_defaults(func=_cmd_watermark)

    from .models import MODEL_NAMES

    v = sub.add_parser("verify", help="test whether a suspicious model was trained on the watermarked dataset "
                                      "(Proposition 1: paired one-sided t-test)")
    v.add_argument("key", help="the watermark key (FILE.key written by `ubw watermark`)")
    v.add_argument("weights", help="the suspicious model's state_dict (torch.save(model.state_dict(), path)); "
                                   "read with weights_only=True")
    v.add_argument("--arch", required=True, choices=sorted(MODEL_NAMES), help="the model's architecture")
    v.add_argument("--width", type=float, default=1.0, help="width multiplier (default: %(default)s)")
    v.add_argument("--data", default="fashion-mnist", help="dataset spec whose test split is queried")
    v.add_argument("--root", default=None, help="dataset folder")
    v.add_argument("--m", type=int, default=100, help="test images queried (default: %(default)s)")
    v.add_argument("--tau", type=float, default=0.25, help="margin tau (default: %(default)s)")
    v.add_argument("--alpha", type=float, default=0.01, help="significance level (default: %(default)s)")
    v.add_argument("--seed", type=int, default=0, help="seed of the sampled test images")
    v.add_argument("--classes", type=int, nargs="+", default=None,
                   help="only query test images of these classes (e.g. UBW-C's source class 0)")
    v.set_defaults(func=_cmd_verify)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
