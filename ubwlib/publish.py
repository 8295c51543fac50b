"""Publishing a watermarked dataset as an image folder, and committing to its key.

A watermark protects a dataset only once the watermarked release is what the public downloads. This module
writes releases as image folders (the ``imagefolder:<path>`` layout of :func:`ubwlib.data.load_dataset`) and
lets the owner commit to the watermark key before any dispute.

* :func:`export_imagefolder` writes an in-memory dataset (e.g. Fashion-MNIST, CIFAR-10) as an image folder:
  lossless PNG files, one folder per class, so the whole path (folder -> watermark -> folder) runs offline.
* :func:`publish_imagefolder` writes the release of a folder's training split as a complete copy of that
  folder: every file that the watermark did not change is copied byte for byte, every changed image is
  written losslessly as PNG next to where its original was (or in its new class folder when the watermark
  changed its label). The key and a private manifest go elsewhere.
* :func:`commit`, :func:`check_commitment`, :func:`save_commitment`, :func:`load_commitment`: a salted hash
  commitment to the key.

Commitment protocol
-------------------
1. When publishing, the owner computes ``commitment, salt = commit(key)`` and publishes the commitment (64 hex
   digits) together with the dataset (its README or dataset card, or a timestamping service), before any
   dispute. The salt stays private with the key (:func:`save_commitment` writes both to a ``0600`` file
   outside the dataset folder). The commitment reveals nothing about the key: the salt is 32 random bytes.
2. At verification, the owner reveals the key and the salt. The verifier recomputes
   ``check_commitment(key, salt, published_commitment)`` and refuses a key that does not match, so the owner
   cannot choose a trigger after seeing the suspicious model (e.g. one it happens to misclassify).

The commitment is ``SHA-256(b"ubw-commitment/1" || salt || canonical_key_bytes(key))`` in hex; the salt is
exactly 32 bytes (a fixed length keeps the concatenation unambiguous). :func:`canonical_key_bytes` documents
the encoding; a key read back with :meth:`~ubwlib.watermarks.WatermarkKey.load` encodes to the same bytes as
the key that was saved.

What a published folder reveals
-------------------------------
A watermark is only useful while nobody can tell which samples carry it. :func:`publish_imagefolder`
therefore gives every output file the same timestamp and default permissions (copied files are copied with
:func:`shutil.copyfile`, content only), and it never writes the list of changed or relabelled files into the
folder: that list is the private manifest. Some traces remain and are the caller's to avoid: a changed image
whose original was not a PNG becomes a ``.png`` file among, say, ``.jpg`` files; a re-encoded PNG may differ
in size from PNGs that another encoder wrote; a grayscale image that gets a coloured trigger becomes an RGB
file. Publishing from a folder written by :func:`export_imagefolder` (same encoder and ``compress_level``)
avoids all three.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import shutil
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image
from ._progress import progress_bar

from . import data as _data
from .cache import atomic_path
from .data import DatasetSplits, ImageDataset, load_dataset
from .watermarks import WatermarkedDataset, WatermarkKey

__all__ = [
    "PNG_COMPRESS_LEVEL",
    "DEFAULT_WORKERS",
    "COMMITMENT_PREFIX",
    "SALT_BYTES",
    "PublishResult",
    "export_imagefolder",
    "publish_imagefolder",
    "class_folder_names",
    "canonical_key_bytes",
    "commit",
    "check_commitment",
    "save_commitment",
    "load_commitment",
]

#: zlib level of every PNG this module writes (0-9). Both writers use the same level, so a rewritten image
#: is encoded like its neighbours in a folder that :func:`export_imagefolder` wrote.
PNG_COMPRESS_LEVEL = 1

#: Threads that copy and write files. Creating small files mostly waits on the file system, so more threads
#: than cores help (Fashion-MNIST, 70,000 files on 2 cores: 8 threads about twice as fast as 2).
DEFAULT_WORKERS = 8

#: Domain separator hashed before the salt (the version of the commitment scheme).
COMMITMENT_PREFIX = b"ubw-commitment/1"

#: Length of the commitment's salt in bytes.
SALT_BYTES = 32

_COMMITMENT_FORMAT = "ubw-commitment/1"
_MANIFEST_FORMAT = "ubwlib.publish-manifest/1"
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_UNSAFE = re.compile(r"[^\w .+-]+")
_UTIME_FD = os.utime in os.supports_fd


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def _workers(workers: int | None) -> int:
    if workers is None:
        return DEFAULT_WORKERS
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    return workers


def _check_compress_level(level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise ValueError(f"compress_level must be an int in [0, 9] (zlib level), got {level!r}")
    return level


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both resolved, symlinks followed)."""
    p, f = path.resolve(), folder.resolve()
    return p == f or f in p.parents


def _new_tmp_dir(out: Path) -> Path:
    """An empty hidden sibling folder of ``out`` (mode from the umask, like any new folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.mkdir(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary folder next to {out}")


def _refuse_existing_dir(out: Path, what: str) -> None:
    if out.exists() or out.is_symlink():
        raise FileExistsError(
            f"{out} exists; {what} never writes into or over an existing folder: remove it or choose a new "
            "folder name"
        )


def _finish_dir(tmp: Path, out: Path, what: str) -> None:
    """``os.replace(tmp, out)``, refusing an ``out`` that appeared meanwhile (rename would replace an empty
    folder silently)."""
    _refuse_existing_dir(out, what)
    os.replace(tmp, out)


def _png_mode_array(chw: np.ndarray, gray: bool) -> np.ndarray:
    """A C x H x W uint8 array as the 2-D (grayscale) or H x W x 3 (RGB) array that PIL writes."""
    c = chw.shape[0]
    if c == 1:
        return chw[0]
    if c != 3:
        raise ValueError(f"only 1-channel (grayscale) and 3-channel (RGB) images can be written as PNG, got {c} "
                         "channels")
    if gray:
        return chw[0]
    return np.ascontiguousarray(chw.transpose(1, 2, 0))


def _set_mtime(fh: Any, path: str | Path, stamp: int | None) -> None:
    """Give an open, flushed output file the timestamp ``stamp`` (ns), through its descriptor where possible."""
    if stamp is None:
        return
    fh.flush()
    os.utime(fh.fileno() if _UTIME_FD else path, ns=(stamp, stamp))


def _write_png(path: str | Path, array: np.ndarray, compress_level: int, stamp: int | None = None,
               verify: bool = False) -> None:
    """Write a 2-D (mode L) or H x W x 3 (mode RGB) uint8 array as a new PNG file (an existing file is refused).

    ``verify``: decode the encoded bytes before writing them and raise ``RuntimeError`` unless they give
    ``array`` back. ``stamp``: the file's modification time (ns)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    data = buf.getvalue()
    if verify:
        with Image.open(io.BytesIO(data)) as im:
            back = np.asarray(im)
        if back.shape != array.shape or not np.array_equal(back, array):
            raise RuntimeError(f"the PNG encoding of {path} does not decode to the image (round trip failed)")
    with open(path, "xb") as fh:
        fh.write(data)
        _set_mtime(fh, path, stamp)


def _copy_file(src: str | Path, dst: str | Path, stamp: int | None = None) -> None:
    """Copy the content only into a new file (default permissions; timestamp ``stamp`` in ns, or now)."""
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        _set_mtime(fo, dst, stamp)


def _write_new_file(path: Path, write: Callable[[Path], Any]) -> None:
    """Create the private file ``path`` (mode ``0o600``) with ``write(tmp)``; never replaces an existing file
    (:func:`ubwlib.cache.atomic_path` with ``overwrite=False``: FileExistsError, also for one created
    meanwhile)."""
    with atomic_path(path, overwrite=False, mode=0o600) as tmp:
        write(tmp)


def _write_private_json(obj: Any, tmp: Path) -> None:
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, ensure_ascii=False)
        fh.write("\n")


def _map(fn: Callable[[Any], Any], items: list, workers: int, progress: bool, desc: str) -> None:
    """Run ``fn`` on every item (a thread pool when ``workers > 1``); the first exception propagates after
    the running tasks finish and the queued ones are cancelled."""
    bar = progress_bar(total=len(items), desc=desc, progress=progress, unit="file", leave=False)
    try:
        if workers == 1 or len(items) < 64:
            for item in items:
                fn(item)
                bar.update(1)
            return
        chunk = 256
        with ThreadPoolExecutor(max_workers=workers) as pool:
            def run(start: int) -> int:
                for item in items[start : start + chunk]:
                    fn(item)
                return len(items[start : start + chunk])

            futures = [pool.submit(run, s) for s in range(0, len(items), chunk)]
            try:
                for fut in futures:
                    bar.update(fut.result())
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------------
# export_imagefolder
# --------------------------------------------------------------------------------------------------


def class_folder_names(classes: Iterable[str]) -> tuple[str, ...]:
    """The folder names :func:`export_imagefolder` gives to ``classes``.

    An image folder's class index is the position of its folder name in sorted order
    (:func:`ubwlib.data.load_dataset`, like torchvision's ``ImageFolder``). When every class name is a safe
    folder name (letters, digits, ``_``, space, ``.``, ``+``, ``-``; not starting or ending with a space or a
    dot) and the names are already in sorted order, the names are used as they are (CIFAR-10). Otherwise every
    folder is ``<index>-<name>`` with the index zero-padded and unsafe characters replaced by ``_``
    (Fashion-MNIST: ``0-T-shirt_top``, ``1-Trouser``, ...), so a reload keeps every label.
    """
    names = tuple(classes)

    def safe(name: str) -> str:
        return _UNSAFE.sub("_", name).strip(" .")

    if names and all(n and safe(n) == n for n in names) and list(names) == sorted(names):
        return names
    width = len(str(max(len(names) - 1, 0)))
    return tuple(f"{k:0{width}d}-{safe(n) or 'class'}" for k, n in enumerate(names))


def _plan_split(ds: ImageDataset, prefix: str) -> tuple[list[str], list[tuple[str, int]]]:
    folders = class_folder_names(ds.classes)
    width = len(str(max(len(ds) - 1, 0)))
    labels = ds.labels.cpu().tolist()
    dirs = [f"{prefix}{f}" for f in folders]
    files = [(f"{prefix}{folders[y]}/{i:0{width}d}.png", i) for i, y in enumerate(labels)]
    return dirs, files


def export_imagefolder(
    dataset: ImageDataset | DatasetSplits,
    out_dir: str | Path,
    *,
    fmt: str = "png",
    compress_level: int = PNG_COMPRESS_LEVEL,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write a dataset as an image folder of lossless PNG files; returns ``out_dir``.

    An :class:`~ubwlib.data.ImageDataset` becomes ``out_dir/<class>/<i>.png``; a
    :class:`~ubwlib.data.DatasetSplits` becomes ``out_dir/train/<class>/<i>.png`` and
    ``out_dir/test/<class>/<i>.png``, which ``load_dataset("imagefolder:" + out_dir, image_size=H)`` reads back
    with the same classes, labels and pixels (grouped by class: the loader lists class by class).

    ``<i>`` is the sample's index in its dataset, zero-padded to one width, so names are unique across classes
    and sort in dataset order within a class. Folder names: :func:`class_folder_names` (every class gets a
    folder, even an empty one). 1-channel images are written as grayscale (mode ``L``) PNGs, 3-channel images as
    RGB; other channel counts are refused. ``compress_level``: zlib level (lossless at every level).

    The folder is written into a hidden temporary sibling and renamed to ``out_dir`` at the end: after an error
    there is no ``out_dir``. An existing ``out_dir`` is refused. ``progress``: a tqdm bar over the files;
    ``workers``: threads that encode and write (default :data:`DEFAULT_WORKERS`).
    """
    if fmt != "png":
        raise ValueError(f"fmt must be 'png' (lossless, read by every image loader), got {fmt!r}")
    level = _check_compress_level(compress_level)
    nworkers = _workers(workers)
    if isinstance(dataset, DatasetSplits):
        splits = [("train/", dataset.train), ("test/", dataset.test)]
    elif isinstance(dataset, ImageDataset):
        splits = [("", dataset)]
    else:
        raise TypeError(f"dataset must be an ImageDataset or DatasetSplits, got {type(dataset).__name__}")
    for _, ds in splits:
        if ds.image_shape[0] not in (1, 3):
            raise ValueError(f"{ds.name} has {ds.image_shape[0]}-channel images; only 1 (grayscale) and 3 (RGB) "
                             "channels can be written as PNG")
    out = Path(out_dir).expanduser()
    _refuse_existing_dir(out, "export_imagefolder")

    tmp = _new_tmp_dir(out)
    try:
        tasks: list[tuple[np.ndarray, str, int]] = []
        for prefix, ds in splits:
            dirs, files = _plan_split(ds, prefix)
            for d in dirs:
                (tmp / d).mkdir(parents=True, exist_ok=True)
            arr = ds.images.cpu().numpy()
            tasks.extend((arr, rel, i) for rel, i in files)

        tmp_s = os.fspath(tmp)

        def work(task: tuple[np.ndarray, str, int]) -> None:
            arr, rel, i = task
            _write_png(os.path.join(tmp_s, rel), _png_mode_array(arr[i], gray=False), level)

        _map(work, tasks, nworkers, progress, "export")
        _finish_dir(tmp, out, "export_imagefolder")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------------
# publish_imagefolder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PublishResult:
    """What :func:`publish_imagefolder` wrote.

    ``files``: for each sample of the release, in its order, the path of its file relative to ``out_dir``
    (POSIX separators). ``rewritten``: indices of the samples written as new PNG files (sorted, int64);
    ``relabelled``: indices of the samples moved to another class folder; ``renamed``: source path -> output
    path (both relative) of every sample whose file name changed (a ``.png`` suffix, or a ``-<k>`` suffix that
    avoids a name taken in its new folder); ``copied``: number of files copied byte for byte (samples and
    every other file of the input). ``commitment``: the hex commitment to publish, when ``commitment_path`` was
    given.
    """

    out_dir: Path
    key_path: Path
    manifest_path: Path
    commitment_path: Path | None
    commitment: str | None
    files: tuple[str, ...] = field(repr=False)
    rewritten: torch.Tensor = field(repr=False)
    relabelled: torch.Tensor = field(repr=False)
    renamed: dict[str, str] = field(repr=False)
    copied: int = 0


def _release_classes(src: Path, classes: tuple[str, ...]) -> int | None:
    """``max_classes`` that makes ``load_dataset`` pick the release's classes out of ``src/train``."""
    folders = _data._list_classes(src / "train")
    if tuple(folders[: len(classes)]) != tuple(classes):
        raise ValueError(
            f"the release's classes {list(classes)[:5]}{'...' if len(classes) > 5 else ''} are not the (first) class "
            f"folders of {src / 'train'} ({folders[:5]}{'...' if len(folders) > 5 else ''}); publish a release made "
            f"from load_dataset('imagefolder:{src}').train"
        )
    return None if len(classes) == len(folders) else len(classes)


def _posix(rel: str) -> str:
    return rel if os.sep == "/" else rel.replace(os.sep, "/")


def _changed_mask(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    out = torch.empty(len(a), dtype=torch.bool)
    for s in range(0, len(a), chunk):
        out[s : s + chunk] = (a[s : s + chunk] != b[s : s + chunk]).flatten(1).any(1).cpu()
    return out


def _index_mask(indices: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    idx = indices.detach().cpu().reshape(-1).to(torch.int64)
    if idx.numel():
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ValueError(f"the release's indices must be in [0, {n}); got values in "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        mask[idx] = True
    return mask


def _check_side_file(path: Path, what: str, src: Path, out: Path) -> None:
    if path.exists() or path.is_symlink():
        raise FileExistsError(
            f"{what} {path} exists; publish_imagefolder never overwrites it (a {what} written over loses the "
            "one it replaces): move it away or choose another path"
        )
    if _inside(path, out):
        raise ValueError(f"{what} {path} lies inside the published folder {out}; it must stay private: choose a "
                         "path outside it")
    if _inside(path, src):
        raise ValueError(f"{what} {path} lies inside the input folder {src}, which is never modified: choose a path "
                         "outside it")


def publish_imagefolder(
    src_dir: str | Path,
    released: WatermarkedDataset,
    out_dir: str | Path,
    key_path: str | Path,
    *,
    commitment_path: str | Path | None = None,
    manifest_path: str | Path | None = None,
    progress: bool = True,
    compress_level: int = PNG_COMPRESS_LEVEL,
    workers: int | None = None,
) -> PublishResult:
    """Write the release of an image folder's training split as a complete copy of that folder.

    ``src_dir``: the folder that ``load_dataset("imagefolder:" + src_dir, image_size=S)`` read; ``released``:
    a watermark of its training split (``get_watermark(...).watermark(splits.train)``). ``out_dir`` gets the
    input's whole tree (train and test splits, every other file and folder):

    * a file that no sample of the release changes is copied byte for byte (content only);
    * an image the watermark changed (the release's ``indices`` and ``noise_indices``, and any other sample
      whose pixels differ from the input's) is written as a lossless PNG (grayscale when its original was a
      grayscale file and its three channels are equal, else RGB) under the original name, or, when the
      original was not a PNG, under the same stem with the ``.png`` suffix;
    * a sample whose label the watermark changed (poisoned-label methods: BadNets, Blended, UBW-P, WaNet...)
      goes into the folder of its new class, at the same path below the class folder; if that name is taken
      there, ``-1``, ``-2``, ... is appended to the stem. Its original file is not written.

    Reloading ``out_dir`` with the same ``image_size`` gives exactly the release's images and labels (in the
    release's order when no label changed; otherwise a sample's position is that of ``result.files[i]`` in
    the loader's class-by-class listing).

    Which file holds which sample is the loader's own listing (the same function lists the files). A changed
    image is written at the loaded size ``S x S``, so the input file it replaces must have that size; otherwise
    (a folder loaded with resizing) the call is refused and the message names the ``image_size`` to load with.
    Nothing in ``src_dir`` is written or changed.

    ``key_path``: where the watermark key goes (``0600``); it must not exist (a key is never overwritten) and
    must lie outside ``out_dir`` and ``src_dir``. ``manifest_path`` (default ``<key_path>.manifest.json``,
    same rules): a private JSON record of every rewritten, relabelled or renamed sample (its index, source and
    output paths, labels). It stays out of the published folder because it names the watermarked samples.
    ``commitment_path`` (optional, same rules): :func:`commit` the key and :func:`save_commitment` the
    commitment and its salt there; ``result.commitment`` is the hex to publish with the dataset.

    The folder is built in a hidden temporary sibling of ``out_dir`` and renamed at the end; after an error
    there is no ``out_dir``, no temporary folder and none of the side files. An existing ``out_dir`` is
    refused. ``progress``: a tqdm bar over the files. ``workers``: threads that copy and encode (default
    :data:`DEFAULT_WORKERS`).
    """
    if not isinstance(released, WatermarkedDataset):
        raise TypeError(f"released must be an ubwlib WatermarkedDataset, got {type(released).__name__}")
    level = _check_compress_level(compress_level)
    nworkers = _workers(workers)
    src = Path(src_dir).expanduser()
    out = Path(out_dir).expanduser()
    key_file = Path(key_path).expanduser()
    manifest_file = Path(manifest_path).expanduser() if manifest_path is not None else \
        key_file.with_name(key_file.name + ".manifest.json")
    commit_file = Path(commitment_path).expanduser() if commitment_path is not None else None
    if not (src / "train").is_dir():
        raise FileNotFoundError(f"{src / 'train'} not found: src_dir must be the image folder the release was "
                                "loaded from (<src_dir>/train/<class>/...)")
    _refuse_existing_dir(out, "publish_imagefolder")
    if _inside(out, src):
        raise ValueError(f"the output folder {out} lies inside the input folder {src}, which is never modified: "
                         "choose a folder outside it")
    side = [(key_file, "key file"), (manifest_file, "manifest file")]
    if commit_file is not None:
        side.append((commit_file, "commitment file"))
    for path, what in side:
        _check_side_file(path, what, src, out)
    if len({p.resolve() for p, _ in side}) != len(side):
        raise ValueError(f"key, manifest and commitment files must be different paths, got {[str(p) for p, _ in side]}")

    rel_ds = released.dataset
    c, h, w = rel_ds.image_shape
    if h != w:
        raise ValueError(f"the release's images are {h} x {w}; image folders load as square images, so this "
                         f"release was not made from load_dataset('imagefolder:{src}')")
    max_classes = _release_classes(src, rel_ds.classes)
    classes = rel_ds.classes
    orig = load_dataset(f"imagefolder:{src}", image_size=h, max_classes=max_classes).train
    train_samples = _data._imagefolder_samples(src, max_classes)[1]
    n = len(rel_ds)
    if len(orig) != n or len(train_samples) != n or orig.image_shape != rel_ds.image_shape:
        raise ValueError(
            f"the release has {n} images of shape {rel_ds.image_shape} but {src / 'train'} holds {len(orig)} images "
            f"loaded as {orig.image_shape}; publish a release made from load_dataset('imagefolder:{src}', "
            f"image_size={h}).train"
        )
    orig_labels = orig.labels.cpu()
    if [y for _, y in train_samples] != orig_labels.tolist():
        raise RuntimeError(f"the listing of {src / 'train'} changed while it was read; try again")
    new_labels = rel_ds.labels.cpu()
    watermarked = _index_mask(released.indices, n) | _index_mask(released.noise_indices, n)
    rewrite = _changed_mask(rel_ds.images, orig.images) | watermarked
    relabel = new_labels != orig_labels
    stray = int(((rewrite | relabel) & ~watermarked).sum())
    if stray > max(1, int((~watermarked).sum()) // 2):
        raise ValueError(
            f"{stray} of the {int((~watermarked).sum())} samples the watermark did not select differ from the images "
            f"or labels in {src / 'train'}; the release does not belong to this folder (or to this image_size)"
        )

    # ---- plan: where every file goes (plain strings: tens of thousands of files) ---------------------------
    src_s = os.fspath(src)
    base = src_s if src_s.endswith(os.sep) else src_s + os.sep
    sample_src = [os.fspath(p) for p, _ in train_samples]
    if not all(p.startswith(base) for p in sample_src):
        raise RuntimeError(f"the loader listed files outside {src}")
    sample_rel = [p[len(base):] for p in sample_src]
    sample_set = set(sample_rel)
    dirs: list[str] = []
    others: list[str] = []
    for dirpath, dirnames, fnames in os.walk(src_s, followlinks=True):
        here = dirpath[len(base):] if dirpath != src_s else ""
        dirnames.sort()
        dirs.extend(os.path.join(here, d) for d in dirnames)
        for f in fnames:
            rel = os.path.join(here, f)
            if rel not in sample_set:
                others.append(rel)
    occupied = set(others)
    dest: list[str] = [""] * n
    moving: list[int] = []
    relabel_l, rewrite_l, new_l = relabel.tolist(), rewrite.tolist(), new_labels.tolist()
    for i, rel in enumerate(sample_rel):
        if relabel_l[i] or (rewrite_l[i] and os.path.splitext(rel)[1].lower() != ".png"):
            moving.append(i)
        else:
            dest[i] = rel
            occupied.add(rel)
    renamed: dict[str, str] = {}
    known_dirs = set(dirs)
    for i in moving:
        class_dir = os.path.join("train", classes[train_samples[i][1]]) + os.sep
        below = sample_rel[i][len(class_dir):]
        folder = os.path.join("train", classes[new_l[i]], os.path.dirname(below))
        stem, suffix = os.path.splitext(os.path.basename(below))
        if rewrite_l[i] and suffix.lower() != ".png":
            suffix = ".png"
        cand, k = os.path.join(folder, stem + suffix), 0
        while cand in occupied:
            k += 1
            cand = os.path.join(folder, f"{stem}-{k}{suffix}")
        occupied.add(cand)
        dest[i] = cand
        if os.path.basename(cand) != os.path.basename(sample_rel[i]):
            renamed[_posix(sample_rel[i])] = _posix(cand)
        if folder not in known_dirs:
            known_dirs.add(folder)
            dirs.append(folder)

    # changed images: check the source files' size and mode (header only)
    gray = [False] * n
    rewrite_idx = torch.nonzero(rewrite).flatten().tolist()
    for i in rewrite_idx:
        path = sample_src[i]
        with Image.open(path) as im:
            size, mode = im.size, im.mode
        if size != (w, h):
            raise ValueError(
                f"{path} is {size[0]} x {size[1]} pixels but the release's images are {w} x {h}: a changed image is "
                f"written at the release's size, so it must be the file's size; load the folder with "
                f"image_size={size[0] if size[0] == size[1] else 'its size'} and watermark that, or first make a "
                "folder of uniform square images with export_imagefolder(load_dataset(...), new_folder)"
            )
        gray[i] = mode in _GRAY_MODES

    images = rel_ds.images.cpu().numpy()
    stamp = int(time.time()) * 1_000_000_000

    tmp = _new_tmp_dir(out)
    tmp_s = os.fspath(tmp)
    created: list[Path] = []
    try:
        for d in dirs:
            os.makedirs(os.path.join(tmp_s, d), exist_ok=True)
        tasks: list[tuple[str, str, int]] = [(os.path.join(src_s, r), r, -1) for r in others]
        tasks.extend((sample_src[i], dest[i], i if rewrite_l[i] else -1) for i in range(n))
        tasks.sort(key=lambda t: t[1])  # one pass in output order: no trace of which files were written

        def work(task: tuple[str, str, int]) -> None:
            source, rel, i = task
            target = os.path.join(tmp_s, rel)
            if i < 0:
                _copy_file(source, target, stamp)
            else:
                chw = images[i]
                is_gray = c == 1 or (gray[i] and bool((chw == chw[:1]).all()))
                _write_png(target, _png_mode_array(chw, is_gray), level, stamp, verify=True)

        _map(work, tasks, nworkers, progress, "publish")

        key_obj = released.key
        _write_new_file(key_file, key_obj.save)
        created.append(key_file)
        commitment = None
        if commit_file is not None:
            commitment, salt = commit(key_obj)
            _write_new_file(commit_file, lambda p: _write_private_json(_commitment_payload(commitment, salt), p))
            created.append(commit_file)
        entries = []
        for i in torch.nonzero(rewrite | relabel).flatten().tolist():
            entries.append({
                "index": i,
                "source": _posix(sample_rel[i]),
                "output": _posix(dest[i]),
                "label": int(orig_labels[i]),
                "released_label": int(new_labels[i]),
                "rewritten": bool(rewrite[i]),
                "watermarked": bool(watermarked[i]),
            })
        manifest = {
            "format": _MANIFEST_FORMAT,
            "source": str(src.resolve()),
            "out_dir": str(out.resolve()),
            "release": rel_ds.name,
            "method": key_obj.method,
            "samples": n,
            "rewritten": int(rewrite.sum()),
            "relabelled": int(relabel.sum()),
            "renamed": renamed,
            "changed": entries,
        }
        _write_new_file(manifest_file, lambda p: _write_private_json(manifest, p))
        created.append(manifest_file)
        _finish_dir(tmp, out, "publish_imagefolder")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    return PublishResult(
        out_dir=out,
        key_path=key_file,
        manifest_path=manifest_file,
        commitment_path=commit_file,
        commitment=commitment,
        files=tuple(_posix(d) for d in dest),
        rewritten=torch.tensor(rewrite_idx, dtype=torch.int64),
        relabelled=torch.nonzero(relabel).flatten(),
        renamed=renamed,
        copied=len(tasks) - len(rewrite_idx),
    )


# --------------------------------------------------------------------------------------------------
# commitment
# --------------------------------------------------------------------------------------------------


def _lp(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _tensor_le_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    size = flat.element_size()
    if sys.byteorder == "big" and size > 1:
        raw = raw.reshape(-1, size).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def canonical_key_bytes(key: WatermarkKey) -> bytes:
    """The canonical byte encoding of a watermark key (what :func:`commit` hashes).

    With ``lp(b) = len(b) as 8-byte little-endian unsigned || b``:

    ``lp(J) || count || for each tensor name in sorted order: lp(name) || lp(dtype) || lp(shape) || lp(data)``

    * ``J``: UTF-8 JSON of ``{"classes", "dataset", "image_shape", "method", "seed", "settings", "target"}``,
      plus ``"test_dataset"`` and ``"test_fingerprint"`` for a key bound to its test split
      (:meth:`~ubwlib.watermarks.WatermarkKey.bind_test_split`; an unbound key has neither entry), with sorted
      keys at every level, separators ``","`` and ``":"``, non-ASCII characters as they are
      (``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False)``); tuples are lists;
    * ``count``: the number of tensors, 8-byte little-endian unsigned;
    * ``name``: UTF-8; ``dtype``: ASCII torch dtype name without ``torch.`` (``"uint8"``, ``"float32"``);
      ``shape``: ASCII JSON list of ints (``"[1,28,28]"``); ``data``: the elements in C order, each in
      little-endian byte order.
    """
    if not isinstance(key, WatermarkKey):
        raise TypeError(f"key must be an ubwlib.watermarks.WatermarkKey, got {type(key).__name__}")
    meta = {
        "classes": list(key.classes),
        "dataset": key.dataset,
        "image_shape": [int(v) for v in key.image_shape],
        "method": key.method,
        "seed": int(key.seed),
        "settings": key.settings,
        "target": None if key.target is None else int(key.target),
    }
    for name in ("test_dataset", "test_fingerprint"):  # the test split a bound key verifies with
        value = getattr(key, name, None)
        if value is not None:
            meta[name] = value
    parts = [_lp(json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")),
             struct.pack("<Q", len(key.tensors))]
    for name in sorted(key.tensors):
        t = key.tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"key tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
        parts.append(_lp(name.encode("utf-8")))
        parts.append(_lp(str(t.dtype).removeprefix("torch.").encode("ascii")))
        parts.append(_lp(json.dumps([int(s) for s in t.shape], separators=(",", ":")).encode("ascii")))
        parts.append(_lp(_tensor_le_bytes(t)))
    return b"".join(parts)


def _check_salt(salt: Any) -> bytes:
    if not isinstance(salt, (bytes, bytearray, memoryview)):
        raise TypeError(f"salt must be bytes, got {type(salt).__name__}")
    salt = bytes(salt)
    if len(salt) != SALT_BYTES:
        raise ValueError(f"salt must be exactly {SALT_BYTES} bytes, got {len(salt)}")
    return salt


def _check_hex(commitment: Any) -> str:
    if not isinstance(commitment, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", commitment.strip()):
        raise ValueError(f"a commitment is 64 hex digits (a SHA-256 digest), got {commitment!r}")
    return commitment.strip().lower()


def commit(key: WatermarkKey, salt: bytes | None = None) -> tuple[str, bytes]:
    """``(commitment, salt)``: ``SHA-256(COMMITMENT_PREFIX || salt || canonical_key_bytes(key))`` in hex.

    ``salt``: 32 bytes; None draws fresh ones with :func:`secrets.token_bytes`. Publish the commitment with the
    dataset; keep the salt private with the key until a dispute (see the module's protocol).
    """
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else _check_salt(salt)
    digest = hashlib.sha256(COMMITMENT_PREFIX + salt + canonical_key_bytes(key)).hexdigest()
    return digest, salt


def check_commitment(key: WatermarkKey, salt: bytes, commitment_hex: str) -> bool:
    """Whether ``key`` and ``salt`` open the published ``commitment_hex`` (constant-time comparison).

    A well-formed commitment that does not match gives ``False``: refuse to verify with that key. A salt that is
    not 32 bytes or a commitment that is not 64 hex digits raises ``ValueError`` (``TypeError`` for other
    types).
    """
    expected = _check_hex(commitment_hex)
    digest, _ = commit(key, _check_salt(salt))
    return hmac.compare_digest(digest.encode("ascii"), expected.encode("ascii"))


def _commitment_payload(commitment: str, salt: bytes) -> dict:
    return {"format": _COMMITMENT_FORMAT, "commitment": _check_hex(commitment), "salt": _check_salt(salt).hex()}


def save_commitment(path: str | Path, commitment: str, salt: bytes) -> Path:
    """Write the commitment and its salt to a new JSON file (mode ``0600``); an existing file is refused (its
    salt would be lost, and with it the only way to open the commitment it belongs to).

    ``{"format": "ubw-commitment/1", "commitment": "<64 hex>", "salt": "<64 hex>"}``. The file is private until
    a dispute, like the key: keep it outside the published folder.
    """
    path = Path(path).expanduser()
    payload = _commitment_payload(commitment, salt)
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} exists; save_commitment never overwrites a commitment file (its salt would "
                              "be lost): choose another path")
    _write_new_file(path, lambda p: _write_private_json(payload, p))
    return path


def load_commitment(path: str | Path) -> tuple[str, bytes]:
    """``(commitment, salt)`` from a file written by :func:`save_commitment`."""
    path = Path(path).expanduser()
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a commitment file (JSON written by save_commitment): {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != _COMMITMENT_FORMAT:
        raise ValueError(f"{path} is not a commitment file (expected format {_COMMITMENT_FORMAT!r})")
    try:
        salt = bytes.fromhex(payload["salt"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: the salt must be {SALT_BYTES} bytes in hex") from None
    return _check_hex(payload.get("commitment")), _check_salt(salt)
