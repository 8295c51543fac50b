"""The ``ubw`` command.

    ubw --version
    ubw data [fashion-mnist|cifar10|imagefolder:PATH|imagenet50:PATH] [--root DIR] [--download] [--check]
    ubw cache [info|clear] [--namespace NS]
    ubw export SPEC --out DIR                   a dataset (train and test) as an image folder of PNG files
    ubw watermark METHOD --data SPEC --out DIR [--key FILE] [--commitment-file FILE] [--rate G] [--seed S]
                  [--target T] [--profile P]     a publishable watermarked copy, the key, and a commitment
    ubw verify KEY (WEIGHTS --arch NAME [--width W] | --url URL | --onnx FILE) [--labels-only]
               [--commitment HEX [--opening FILE]] [--data SPEC] [--m M] [--tau T] [--alpha A] [--seed S]
               [--classes C ...] [--max-queries Q]
    ubw serve WEIGHTS --arch NAME [--width W] (--key KEY | --classes K --shape C H W) [--labels-only] [--port P]
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


def _cmd_profile(args: argparse.Namespace) -> int:
    from .experiments.choice import CANDIDATES, REFERENCES, choose, record_path

    try:
        c = choose(args.budget, measure=args.measure)
    except ValueError as exc:
        print(f"ubw profile: {exc}", file=sys.stderr)
        return 1
    if args.name:
        print(c.profile)
        return 0
    print(f"profile: {c.profile}")
    print(c.reason())
    for name in CANDIDATES:
        if name in c.rates:
            ref = REFERENCES[name]
            print(f"  {name}: {c.rates[name]:,.0f} images/s here -> about {c.predicted_minutes[name]:.0f} min "
                  f"(reference: {ref.seconds / 60:.0f} min at {ref.rate:,.0f} images/s on {ref.machine})")
    print(f"recorded in {record_path()} (--measure measures again)")
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
        timed = [e.seconds_own for e in items if e.seconds_own is not None]
        took = f", computed in {sum(timed):.0f} s" + (f" ({len(timed)} timed)" if len(timed) < len(items) else "")
        print(f"  {ns}: {len(items)} {word}, {sum(e.size_bytes for e in items) / 2**20:.1f} MiB"
              + (took if timed else ""))
    timed = [e.seconds_own for e in entries if e.seconds_own is not None]
    untimed = sum(1 for e in entries if e.seconds_own is None and e.namespace != "data")
    if timed:
        print(f"computed in {sum(timed):.0f} s in all (each entry's own time, without the cached parts it reused)"
              + (f"; {untimed} entr{'y' if untimed == 1 else 'ies'} without a recorded time (stored by an older "
                 "ubwlib or by hand)" if untimed else ""))
    return 0


def _load(spec: str, root, image_size: int | None = None):
    """``load_dataset``; an image folder without ``image_size`` is read at its own size (that of its first
    training image, which must be square), not resized, so that a release can be written back at that size."""
    from pathlib import Path

    from .data import load_dataset

    if spec.startswith("imagefolder:") and image_size is None and spec.split(":", 1)[1]:
        from PIL import Image, UnidentifiedImageError

        train = Path(spec.split(":", 1)[1]).expanduser() / "train"
        first = next((f for d in sorted(train.iterdir()) if d.is_dir() for f in sorted(d.iterdir()) if f.is_file()),
                     None) if train.is_dir() else None
        if first is not None:
            try:
                with Image.open(first) as im:
                    w, h = im.size
            except (OSError, UnidentifiedImageError) as exc:
                raise ValueError(f"cannot read {first} ({exc}); fix or remove it") from None
            if w != h:
                raise ValueError(f"{first} is {w} x {h} pixels, not square: pass --image-size S to load the folder "
                                 "resized to S x S")
            image_size = w
    return load_dataset(spec, root=root, **({"image_size": image_size} if image_size else {}))


def _side_files(out, key: str | None, commitment: str | None):
    """Default paths of the key and the commitment file: siblings of the output folder, never inside it."""
    from pathlib import Path

    out = Path(out).expanduser()
    key_path = Path(key).expanduser() if key else out.with_name(out.name + ".key")
    commit_path = Path(commitment).expanduser() if commitment else _commitment_beside(key_path)
    return out, key_path, commit_path


def _commitment_beside(key_path):
    """The default commitment file of a key: ``NAME.commitment.json`` beside ``NAME.key``."""
    return key_path.with_suffix(".commitment.json")


def _watermark_settings(method: str, args: argparse.Namespace, splits) -> dict:
    """A method's settings for the command: the poisoning rate and target, and for the clean-label methods the
    surrogate's model, schedule and crafting budget of a ubwlib profile (``--profile``)."""
    import dataclasses

    from .watermarks import REGISTRY

    settings: dict = {"poisoning_rate": args.rate}
    if args.target is not None:
        if not REGISTRY[method].targeted:
            raise ValueError(f"{method} is untargeted and takes no --target")
        settings["target"] = args.target
    if REGISTRY[method].label_type == "clean":
        from .experiments.profiles import get_profile
        from .experiments.runs import method_settings

        extra = method_settings(get_profile(args.profile), method)
        if "source" in {f.name for f in dataclasses.fields(REGISTRY[method].Settings)}:
            extra["source"] = args.source
        if args.surrogate and "crafting" in extra:  # retrainings use the given surrogate's architecture
            extra["crafting"] = dataclasses.replace(extra["crafting"], model=args.arch, width=args.width)
        settings.update(extra)
    elif args.surrogate:
        raise ValueError(f"{method} takes no surrogate (--surrogate is for ubw-c and sleeper-agent)")
    return settings


def _surrogate(method: str, args: argparse.Namespace, splits) -> dict:
    """``{"surrogate": model}`` for a gradient-matching method given ``--surrogate WEIGHTS --arch``, else {}."""
    if not args.surrogate:
        return {}
    import dataclasses

    from .watermarks import REGISTRY

    if "crafting" not in {f.name for f in dataclasses.fields(REGISTRY[method].Settings)}:  # gradient matching
        raise ValueError(f"{method} takes no surrogate (--surrogate is for ubw-c and sleeper-agent)")
    if not args.arch:
        raise ValueError("--surrogate needs --arch (and --width) to build the model")
    from .models import load_weights

    return {"surrogate": load_weights(args.surrogate, args.arch, args.width, splits.train.num_classes,
                                      splits.train.image_shape[0])}


def _cmd_watermark(args: argparse.Namespace) -> int:
    import dataclasses

    from .data import DataIntegrityError, DataNotFoundError, DatasetSplits, load_dataset
    from .publish import commit, export_imagefolder, publish_imagefolder, save_commitment
    from .watermarks import get_watermark

    out, key_path, commit_path = _side_files(args.out, args.key, args.commitment_file)
    for path, what in ((out, "output folder"), (key_path, "key file"), (commit_path, "commitment file")):
        if path.exists() or path.is_symlink():
            print(f"ubw watermark: the {what} {path} exists; ubw never overwrites a release, a key or a commitment "
                  "(choose another --out, --key or --commitment-file)", file=sys.stderr)
            return 1
    try:
        splits = _load(args.data, args.root, args.image_size)
        wm = get_watermark(args.method, **_watermark_settings(args.method, args, splits))
        kwargs = {"progress": True} if _takes_progress(wm) else {}
        released = wm.watermark(splits.train, seed=args.seed, **kwargs, **_surrogate(args.method, args, splits))
        released = dataclasses.replace(released, key=released.key.bind_test_split(splits.test))
        if args.data.startswith("imagefolder:"):
            result = publish_imagefolder(args.data.split(":", 1)[1], released, out, key_path,
                                         commitment_path=commit_path)
            commitment = result.commitment
        else:  # a dataset in another format: published as an image folder of lossless PNG files
            export_imagefolder(DatasetSplits(train=released.dataset, test=splits.test), out, progress=True)
            released.key.save(key_path)
            commitment, salt = commit(released.key)
            save_commitment(commit_path, commitment, salt)
    except (DataNotFoundError, DataIntegrityError, ValueError, TypeError, FileExistsError,
            FileNotFoundError, NotImplementedError) as exc:
        print(f"ubw watermark: {exc}", file=sys.stderr)
        return 1
    print(f"{args.method}: {len(released.indices)} of {len(released)} training samples watermarked "
          f"(gamma = {released.poisoning_rate:.4f}, seed {args.seed})")
    print(f"released dataset (publish it): {out}")
    print(f"key (private, needed to verify): {key_path}")
    print(f"commitment file (private: it holds the salt that opens the commitment): {commit_path}")
    print(f"commitment (publish it with the dataset, before any dispute): {commitment}")
    return 0


def _takes_progress(wm) -> bool:
    import inspect

    return "progress" in inspect.signature(wm.watermark).parameters


def _cmd_export(args: argparse.Namespace) -> int:
    from .data import DataIntegrityError, DataNotFoundError, load_dataset
    from .publish import export_imagefolder

    try:
        splits = _load(args.spec, args.root, args.image_size)
        out = export_imagefolder(splits, args.out, progress=True)
    except (DataNotFoundError, DataIntegrityError, ValueError, TypeError, FileExistsError) as exc:
        print(f"ubw export: {exc}", file=sys.stderr)
        return 1
    print(f"{splits.train.name}: {len(splits.train)} training and {len(splits.test)} test images written to {out} "
          f"(read it back with --data imagefolder:{out})")
    return 0


def _predictor(args: argparse.Namespace, key):
    """(probabilities predictor or None, labels predictor, closer, description) of the suspicious model."""
    sources = [bool(args.weights), bool(args.url), bool(args.onnx)]
    if sum(sources) != 1:
        raise ValueError("give the suspicious model exactly one way: WEIGHTS with --arch, --url URL, or --onnx FILE")
    if args.url:
        from .remote import HTTPPredictor

        pred = HTTPPredictor(args.url, num_classes=key.num_classes, max_queries=args.max_queries,
                             timeout=args.timeout)
        labels_only = args.labels_only
        if not labels_only:  # an endpoint that says it answers labels only gets the label-only test
            try:
                labels_only = pred.info().get("outputs") == "labels"
            except RuntimeError:  # /info is optional in the protocol
                pass
        return (None if labels_only else pred), pred.labels, pred.close, f"the model at {args.url}"
    if args.onnx:
        from .onnx_model import onnx_predictor

        pred = onnx_predictor(args.onnx, image_shape=key.image_shape, num_classes=key.num_classes)
        return pred, (lambda x: pred(x).argmax(1)), (lambda: None), f"the ONNX model {args.onnx}"
    if not args.arch:
        raise ValueError("WEIGHTS needs --arch (and --width) to build the model; or use --url or --onnx")
    from .models import load_weights
    from .verify import model_predictor

    model = load_weights(args.weights, args.arch, args.width, key.num_classes, key.image_shape[0])
    pred = model_predictor(model, precision="fp32")  # float32: the same verdict on every machine
    return pred, (lambda x: pred(x).argmax(1)), (lambda: None), f"{args.arch} weights {args.weights}"


def _check_opening(args: argparse.Namespace, key) -> None:
    """Refuse a key that does not open the commitment published with the dataset (``--commitment``)."""
    from pathlib import Path

    from .publish import check_commitment, load_commitment

    opening = Path(args.opening) if args.opening else _commitment_beside(Path(args.key))
    if not opening.exists():
        raise FileNotFoundError(f"--commitment needs the key's salt: no commitment file at {opening} (written by "
                                "ubw watermark beside the key); pass it with --opening FILE")
    _, salt = load_commitment(opening)
    if not check_commitment(key, salt, args.commitment):
        raise ValueError(f"the key {args.key} (with the salt in {opening}) does not open the published commitment "
                         f"{args.commitment}: it is not the key committed to at release time; refusing to verify")


def _cmd_verify(args: argparse.Namespace) -> int:
    from .data import DataIntegrityError, DataNotFoundError, load_dataset
    from .verify import verify, verify_labels
    from .watermarks import WatermarkKey

    close = None
    try:
        key = WatermarkKey.load(args.key)
        if args.commitment:
            _check_opening(args, key)
            print(f"the key opens the published commitment {args.commitment}")
        test = _load(args.data, args.root, args.image_size).test
        probs, labels, close, what = _predictor(args, key)
        if probs is None or args.labels_only:
            result = verify_labels(labels, test, key, m=args.m, alpha=args.alpha, seed=args.seed,
                                   classes=args.classes, p0=args.p0)
        else:
            result = verify(probs, test, key, m=args.m, tau=args.tau, alpha=args.alpha, seed=args.seed,
                            classes=args.classes)
    except (FileNotFoundError, FileExistsError) as exc:
        print(f"ubw verify: {exc}", file=sys.stderr)
        return 1
    except (DataNotFoundError, DataIntegrityError, ValueError, TypeError, RuntimeError) as exc:
        print(f"ubw verify: {exc}", file=sys.stderr)
        return 1
    finally:
        if close is not None:
            close()
    print(f"{key.method} watermark, {what}, {result.m} correctly classified test images of {test.name}"
          f"{' (classes ' + str(args.classes) + ')' if args.classes else ''}; {result.queries} images queried")
    if hasattr(result, "flips"):
        print(f"flips = {result.flips} of {result.m}  (triggered prediction != true label; p0 = {result.p0})")
        print(f"p-value = {result.p_value:.3g}  (exact one-sided binomial test, alpha = {result.alpha})")
    else:
        print(f"Delta P = {result.delta_p:.4f}  (mean P_b - P_p; tau = {result.tau})")
        print(f"p-value = {result.p_value:.3g}  (paired one-sided t-test, alpha = {result.alpha})")
    print(f"verdict: {result.verdict}"
          + (" - the model was trained on the protected dataset" if result.watermarked else ""))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .models import load_weights
    from .serve import make_app, serve
    from .watermarks import WatermarkKey

    try:
        if args.key:
            key = WatermarkKey.load(args.key)
            classes, shape = key.num_classes, tuple(key.image_shape)
        elif args.classes and args.shape:
            classes, shape = args.classes, tuple(args.shape)
        else:
            raise ValueError("give the served model's data: --key KEY, or --classes K --shape C H W")
        model = load_weights(args.weights, args.arch, args.width, classes, shape[0])
        app = make_app(model, num_classes=classes, image_shape=shape,
                       outputs="labels" if args.labels_only else "probabilities", max_batch=args.max_batch)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"ubw serve: {exc}", file=sys.stderr)
        return 1
    print(f"serving {args.arch} ({classes} classes, images {shape}) at http://{args.host}:{args.port} "
          f"({'labels only' if args.labels_only else 'probabilities'}; protocol: ubwlib.remote)", flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
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

    p = sub.add_parser("profile", help="the profile `make book` (UBW_PROFILE=auto) builds on this machine, chosen by "
                                       "its measured speed")
    p.add_argument("--budget", type=float, default=None,
                   help="minutes a cold build of the book may take (default: $UBW_BUILD_MINUTES, else 20)")
    p.add_argument("--measure", action="store_true", help="measure again instead of reading the recorded choice")
    p.add_argument("--name", action="store_true", help="print only the profile's name")
    p.set_defaults(func=_cmd_profile)

    from .experiments.profiles import profile_names
    from .models import MODEL_NAMES
    from .watermarks import REGISTRY

    e = sub.add_parser("export", help="write a dataset (train and test splits) as an image folder of PNG files")
    e.add_argument("spec", help="fashion-mnist, cifar10, imagefolder:PATH or imagenet50:PATH")
    e.add_argument("--out", required=True, help="the folder to create (must not exist)")
    e.add_argument("--root", default=None, help="dataset folder")
    e.add_argument("--image-size", type=int, default=None,
                   help="image folders: resize to S x S (default: the folder's own size)")
    e.set_defaults(func=_cmd_export)

    w = sub.add_parser("watermark", help="watermark a dataset's training split into a publishable folder, with its "
                                         "key and a commitment to the key")
    w.add_argument("method", choices=sorted(REGISTRY), help="the watermark")
    w.add_argument("--out", required=True,
                   help="the released dataset, a folder in the input's layout (image folders) or of PNG files "
                        "(other formats); must not exist")
    w.add_argument("--data", default="fashion-mnist", help="dataset spec, e.g. imagefolder:PATH (default: %(default)s)")
    w.add_argument("--root", default=None, help="dataset folder")
    w.add_argument("--image-size", type=int, default=None,
                   help="image folders: resize to S x S (default: the folder's own size)")
    w.add_argument("--key", default=None, help="where the private key goes (default: OUT.key; never inside OUT, "
                                               "never overwritten)")
    w.add_argument("--commitment-file", default=None,
                   help="where the commitment and its salt go (default: OUT.commitment.json; private)")
    w.add_argument("--rate", type=float, default=0.1, help="poisoning rate gamma (default: %(default)s)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--target", type=int, default=None, help="target label of targeted watermarks (default 1)")
    w.add_argument("--profile", default="default", choices=profile_names(),
                   help="clean-label methods: the surrogate's model and schedule and the crafting budget of this "
                        "ubwlib profile (default: %(default)s)")
    w.add_argument("--source", type=int, default=0, help="UBW-C / Sleeper Agent: the source class (default 0)")
    w.add_argument("--surrogate", default=None, help="UBW-C / Sleeper Agent: a trained benign model's state_dict "
                                                     "to craft against (else one is trained); needs --arch")
    w.add_argument("--arch", default=None, choices=sorted(MODEL_NAMES), help="the architecture of --surrogate")
    w.add_argument("--width", type=float, default=1.0, help="the width of --surrogate (default: %(default)s)")
    w.set_defaults(func=_cmd_watermark)

    v = sub.add_parser("verify", help="test whether a suspicious model was trained on the watermarked dataset "
                                      "(Proposition 1: paired one-sided t-test; or a label-only test)")
    v.add_argument("key", help="the watermark key (written by `ubw watermark`)")
    v.add_argument("weights", nargs="?", default=None,
                   help="the suspicious model's state_dict (read with weights_only=True); or use --url / --onnx")
    v.add_argument("--arch", default=None, choices=sorted(MODEL_NAMES), help="the architecture of WEIGHTS")
    v.add_argument("--width", type=float, default=1.0, help="width multiplier of WEIGHTS (default: %(default)s)")
    v.add_argument("--url", default=None, help="an HTTP endpoint speaking ubwlib's protocol (see ubwlib.remote)")
    v.add_argument("--onnx", default=None, help="an ONNX file (run by onnxruntime; no code is executed)")
    v.add_argument("--labels-only", action="store_true",
                   help="use only the predicted labels (exact binomial test on the flips); automatic for "
                        "label-only endpoints")
    v.add_argument("--p0", type=float, default=0.5, help="label-only test: flip rate allowed to an innocent model")
    v.add_argument("--commitment", default=None, help="the commitment published with the dataset: a key that "
                                                      "does not open it is refused")
    v.add_argument("--opening", default=None, help="the commitment file holding the key's salt (default: the "
                                                   "key's .commitment.json sibling)")
    v.add_argument("--max-queries", type=int, default=None, help="--url: most images sent to the endpoint")
    v.add_argument("--timeout", type=float, default=10.0, help="--url: seconds per request (default: %(default)s)")
    v.add_argument("--data", default="fashion-mnist", help="dataset spec whose test split is queried")
    v.add_argument("--root", default=None, help="dataset folder")
    v.add_argument("--image-size", type=int, default=None,
                   help="image folders: resize to S x S (default: the folder's own size)")
    v.add_argument("--m", type=int, default=100, help="test images queried (default: %(default)s)")
    v.add_argument("--tau", type=float, default=0.25, help="margin tau (default: %(default)s)")
    v.add_argument("--alpha", type=float, default=0.01, help="significance level (default: %(default)s)")
    v.add_argument("--seed", type=int, default=0, help="seed of the sampled test images")
    v.add_argument("--classes", type=int, nargs="+", default=None,
                   help="only query test images of these classes (e.g. UBW-C's source class 0)")
    v.set_defaults(func=_cmd_verify)

    s = sub.add_parser("serve", help="serve a model over HTTP with ubwlib's protocol (a real ASGI server)")
    s.add_argument("weights", help="the model's state_dict (read with weights_only=True)")
    s.add_argument("--arch", required=True, choices=sorted(MODEL_NAMES))
    s.add_argument("--width", type=float, default=1.0)
    s.add_argument("--key", default=None, help="take the classes and image shape from this watermark key")
    s.add_argument("--classes", type=int, default=None, help="number of classes (without --key)")
    s.add_argument("--shape", type=int, nargs=3, default=None, metavar=("C", "H", "W"), help="image shape (without --key)")
    s.add_argument("--labels-only", action="store_true", help="answer the top label only")
    s.add_argument("--max-batch", type=int, default=1024)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=_cmd_serve)
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
