"""Tests of ubwlib.publish: image folders written from datasets and from watermark releases, and the salted
commitment to a watermark key.

The image folders are tiny synthetic trees (3 classes x 8 training images of 12 x 12 pixels, 2 test images per
class) in the loader's layout; every class folder uses the same file names, so a relabelled sample always meets
a name that is taken in its new folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import ubwlib.publish as publish
from ubwlib.data import DatasetSplits, ImageDataset, _imagefolder_samples, load_dataset
from ubwlib.publish import (
    COMMITMENT_PREFIX,
    canonical_key_bytes,
    check_commitment,
    class_folder_names,
    commit,
    export_imagefolder,
    load_commitment,
    publish_imagefolder,
    save_commitment,
)
from ubwlib.watermarks import WatermarkedDataset, WatermarkKey, get_watermark

CLASSES = ("ant", "bee", "cat")
SIZE = 12
PER_CLASS = 8


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UBW_CACHE", str(tmp_path / "cache"))


def save_img(path: Path, arr: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def make_folder(root: Path, *, mode: str = "RGB", jpeg_class: str | None = None, seed: int = 0) -> Path:
    """train/<class>/img_00..07.png (JPEG for ``jpeg_class``), val/<class>/v0..1.png, plus non-image files."""
    rng = np.random.default_rng(seed)
    shape = (SIZE, SIZE) if mode == "L" else (SIZE, SIZE, 3)
    for c in CLASSES:
        for j in range(PER_CLASS):
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            if c == jpeg_class:
                save_img(root / "train" / c / f"img_{j:02d}.jpg", arr, "JPEG")
            else:
                save_img(root / "train" / c / f"img_{j:02d}.png", arr)
        for j in range(2):
            save_img(root / "val" / c / f"v{j}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    (root / "README.txt").write_text("a tiny dataset\n")
    (root / "train" / "ant" / "notes.txt").write_text("not an image\n")
    (root / "empty").mkdir()
    return root


def sha_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def reload_in_release_order(out: Path, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reloaded train split of ``out``, reordered to the release's order through ``files``."""
    splits = load_dataset(f"imagefolder:{out}", image_size=SIZE)
    listed = [p.relative_to(out).as_posix() for p, _ in _imagefolder_samples(out, None)[1]]
    assert sorted(listed) == sorted(files)
    pos = {f: k for k, f in enumerate(listed)}
    order = torch.tensor([pos[f] for f in files])
    return splits.train.images[order], splits.train.labels[order]


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


@pytest.fixture
def src(tmp_path):
    return make_folder(tmp_path / "pets")


# --------------------------------------------------------------------------------------------------
# export_imagefolder
# --------------------------------------------------------------------------------------------------


def synthetic(n: int, channels: int, classes: tuple[str, ...], seed: int, name: str) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % len(classes))[torch.randperm(n, generator=g)]
    images = torch.randint(0, 256, (n, channels, SIZE, SIZE), generator=g, dtype=torch.uint8)
    return ImageDataset(images, labels, classes, name)


def test_export_rgb_splits_round_trip(tmp_path):
    splits = DatasetSplits(synthetic(24, 3, CLASSES, 0, "s/train"), synthetic(9, 3, CLASSES, 1, "s/test"))
    out = export_imagefolder(splits, tmp_path / "exported")
    assert sorted(p.name for p in (out / "train").iterdir()) == list(CLASSES)  # sorted safe names kept
    assert sorted(p.name for p in (out / "train" / "ant").iterdir())[0] in {f"{i:02d}.png" for i in range(24)}
    back = load_dataset(f"imagefolder:{out}", image_size=SIZE)
    assert back.classes == CLASSES
    for orig, got in ((splits.train, back.train), (splits.test, back.test)):
        order = torch.sort(orig.labels, stable=True).indices  # the loader lists class by class
        assert torch.equal(got.images, orig.images[order])
        assert torch.equal(got.labels, orig.labels[order])
    with Image.open(next((out / "train" / "bee").iterdir())) as im:
        assert im.mode == "RGB" and im.format == "PNG"
    assert no_temp_left(tmp_path)


def test_export_gray_dataset_and_unsorted_class_names(tmp_path):
    classes = ("T-shirt/top", "Trouser", "Bag")
    ds = synthetic(30, 1, classes, 2, "gray/train")
    names = class_folder_names(classes)
    assert names == ("0-T-shirt_top", "1-Trouser", "2-Bag")
    out = export_imagefolder(ds, tmp_path / "gray" / "train")
    export_imagefolder(synthetic(6, 1, classes, 3, "gray/test"), tmp_path / "gray" / "test")
    files = sorted((out / names[0]).iterdir())
    assert [f.name for f in files] == sorted(f.name for f in files) and files[0].suffix == ".png"
    with Image.open(files[0]) as im:
        assert im.mode == "L"
    back = load_dataset(f"imagefolder:{tmp_path / 'gray'}", image_size=SIZE).train
    assert back.classes == names
    order = torch.sort(ds.labels, stable=True).indices
    assert torch.equal(back.labels, ds.labels[order])  # labels survive: folder order is label order
    assert torch.equal(back.images, ds.images[order].expand(-1, 3, -1, -1))  # grayscale reloads as RGB


def test_class_folder_names_are_unique_and_safe():
    assert class_folder_names(("a", "b")) == ("a", "b")
    assert class_folder_names(("b", "a")) == ("0-b", "1-a")
    assert class_folder_names(("..", "x/y", ".hidden")) == ("0-class", "1-x_y", "2-hidden")
    many = class_folder_names([f"c{k}" for k in range(11)][::-1])
    assert many[0] == "00-c10" and list(many) == sorted(many)


def test_export_refuses_existing_folder_other_channels_and_formats(tmp_path):
    ds = synthetic(6, 3, CLASSES, 0, "x")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="remove it or choose a new folder name"):
        export_imagefolder(ds, tmp_path / "taken")
    four = ImageDataset(torch.zeros(2, 4, 5, 5, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ("a",), "rgba")
    with pytest.raises(ValueError, match="4-channel"):
        export_imagefolder(four, tmp_path / "four")
    with pytest.raises(ValueError, match="fmt must be 'png'"):
        export_imagefolder(ds, tmp_path / "jpeg", fmt="jpeg")
    assert not (tmp_path / "four").exists() and not (tmp_path / "jpeg").exists()


def test_export_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = publish._write_png

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (injected)")
        real(*args, **kwargs)

    monkeypatch.setattr(publish, "_write_png", flaky)
    with pytest.raises(OSError, match="injected"):
        export_imagefolder(synthetic(12, 3, CLASSES, 0, "x"), tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists() and no_temp_left(tmp_path)


# --------------------------------------------------------------------------------------------------
# publish_imagefolder
# --------------------------------------------------------------------------------------------------


def test_sample_to_file_mapping_matches_a_fresh_decode(src):
    """The loader's listing (which publish uses) maps sample i to the file that decodes to image i."""
    train = load_dataset(f"imagefolder:{src}", image_size=SIZE).train
    samples = _imagefolder_samples(src, None)[1]
    assert len(samples) == len(train) == len(CLASSES) * PER_CLASS
    for i, (path, label) in enumerate(samples):
        with Image.open(path) as im:
            arr = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(arr, train.images[i]) and label == int(train.labels[i])


def test_publish_poisoned_label_release(src, tmp_path):
    before = sha_tree(src)
    train = load_dataset(f"imagefolder:{src}", image_size=SIZE).train
    released = get_watermark("badnets", poisoning_rate=0.25, target=1).watermark(train, seed=3)
    out, key = tmp_path / "release", tmp_path / "private" / "pets.key"
    result = publish_imagefolder(src, released, out, key, commitment_path=tmp_path / "private" / "pets.commit",
                                 progress=False)
    assert sha_tree(src) == before  # the input is untouched
    assert no_temp_left(tmp_path)

    n = len(train)
    wm = set(released.indices.tolist())
    assert set(result.rewritten.tolist()) == wm
    moved = set(result.relabelled.tolist())
    assert moved == {i for i in wm if int(train.labels[i]) != 1} and moved
    samples = _imagefolder_samples(src, None)[1]
    for i in range(n):
        src_rel = samples[i][0].relative_to(src)
        dst = out / result.files[i]
        if i in wm:
            assert dst.suffix == ".png" and dst.parent.name == "bee"
            with Image.open(dst) as im:
                assert im.format == "PNG" and im.size == (SIZE, SIZE)
        else:  # unmodified: same place, same bytes
            assert result.files[i] == src_rel.as_posix()
            assert dst.read_bytes() == samples[i][0].read_bytes()
    # relabelled samples met taken names in bee/ and got a suffix; nothing was overwritten
    assert all(Path(v).stem.rsplit("-", 1)[-1].isdigit() for v in result.renamed.values())
    assert len(result.renamed) == len(moved)
    assert len(set(result.files)) == n
    # every other file is copied
    for rel in ("README.txt", "train/ant/notes.txt", "val/ant/v0.png", "val/cat/v1.png"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert (out / "empty").is_dir()
    out_tree = sha_tree(out)
    assert len(out_tree) == len(before)
    # the reloaded folder is exactly the release
    images, labels = reload_in_release_order(out, result.files)
    assert torch.equal(images, released.dataset.images)
    assert torch.equal(labels, released.dataset.labels)
    test_back = load_dataset(f"imagefolder:{out}", image_size=SIZE).test
    assert torch.equal(test_back.images, load_dataset(f"imagefolder:{src}", image_size=SIZE).test.images)
    # one timestamp for every file: no trace of which were rewritten
    assert len({(out / f).stat().st_mtime_ns for f in out_tree}) == 1
    # the private side files
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    loaded = WatermarkKey.load(key)
    assert canonical_key_bytes(loaded) == canonical_key_bytes(released.key)
    manifest = json.loads(result.manifest_path.read_text())
    assert result.manifest_path == key.with_name("pets.key.manifest.json")
    assert stat.S_IMODE(result.manifest_path.stat().st_mode) == 0o600
    assert manifest["renamed"] == result.renamed
    assert {e["index"] for e in manifest["changed"]} == wm
    assert all(e["released_label"] == 1 and e["watermarked"] for e in manifest["changed"])
    commitment, salt = load_commitment(result.commitment_path)
    assert commitment == result.commitment and check_commitment(loaded, salt, commitment)
    assert not any(p.name.endswith((".key", ".json", ".commit")) for p in out.rglob("*"))


def test_publish_clean_label_release_keeps_order_and_noise_samples(src, tmp_path):
    """Labels unchanged (a clean-label-like release with extra noise samples): same files, same order."""
    before = sha_tree(src)
    train = load_dataset(f"imagefolder:{src}", image_size=SIZE).train
    images = train.images.clone()
    indices, noise = torch.tensor([1, 9, 17]), torch.tensor([4, 20])
    images[indices, :, -3:, -3:] = 255
    images[noise] = images[noise] ^ 1
    key = get_watermark("ubw-p", poisoning_rate=0.1).watermark(train, seed=0).key
    released = WatermarkedDataset(train.replace(images=images, name="clean"), indices, key, noise)
    result = publish_imagefolder(src, released, tmp_path / "out", tmp_path / "k.key", progress=False)
    assert result.relabelled.numel() == 0 and result.renamed == {}
    assert set(result.rewritten.tolist()) == {1, 4, 9, 17, 20}
    back = load_dataset(f"imagefolder:{tmp_path / 'out'}", image_size=SIZE).train
    assert torch.equal(back.images, released.dataset.images)  # same order, exactly
    assert torch.equal(back.labels, train.labels)
    listed = [p.relative_to(tmp_path / "out").as_posix() for p, _ in _imagefolder_samples(tmp_path / "out", None)[1]]
    assert tuple(listed) == result.files
    assert sha_tree(src) == before


def test_publish_grayscale_folder_keeps_grayscale_files(tmp_path):
    src = make_folder(tmp_path / "gray", mode="L")
    train = load_dataset(f"imagefolder:{src}", image_size=SIZE).train
    released = get_watermark("ubw-p", poisoning_rate=0.25).watermark(train, seed=1)
    result = publish_imagefolder(src, released, tmp_path / "out", tmp_path / "k.key", progress=False)
    for i in result.rewritten.tolist():
        with Image.open(tmp_path / "out" / result.files[i]) as im:
            assert im.mode == "L"  # the square is the same in every channel
    images, labels = reload_in_release_order(tmp_path / "out", result.files)
    assert torch.equal(images, released.dataset.images) and torch.equal(labels, released.dataset.labels)


def test_publish_renames_changed_jpeg_files(tmp_path):
    src = make_folder(tmp_path / "mixed", jpeg_class="cat")
    before = sha_tree(src)
    train = load_dataset(f"imagefolder:{src}", image_size=SIZE).train
    cat = torch.nonzero(train.labels == 2).flatten()
    images = train.images.clone()
    images[cat[:3], :, :2, :2] = 0
    key = get_watermark("ubw-p", poisoning_rate=0.1).watermark(train, seed=0).key
    released = WatermarkedDataset(train.replace(images=images), cat[:3], key)
    result = publish_imagefolder(src, released, tmp_path / "out", tmp_path / "k.key", progress=False)
    assert result.renamed == {f"train/cat/img_{j:02d}.jpg": f"train/cat/img_{j:02d}.png" for j in range(3)}
    assert not (tmp_path / "out" / "train" / "cat" / "img_00.jpg").exists()
    assert (tmp_path / "out/train/cat/img_05.jpg").read_bytes() == (src / "train/cat/img_05.jpg").read_bytes()
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["renamed"] == result.renamed
    images_back, labels_back = reload_in_release_order(tmp_path / "out", result.files)
    assert torch.equal(images_back, released.dataset.images)
    assert torch.equal(labels_back, train.labels)
    assert sha_tree(src) == before


def test_publish_refusals(src, tmp_path):
    train = load_dataset(f"imagefolder:{src}", image_size=SIZE).train
    released = get_watermark("badnets", poisoning_rate=0.25).watermark(train, seed=0)
    before = sha_tree(src)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        publish_imagefolder(src, released, tmp_path / "exists", tmp_path / "a.key", progress=False)
    (tmp_path / "old.key").write_bytes(b"the owner's only key")
    with pytest.raises(FileExistsError, match="never overwrites"):
        publish_imagefolder(src, released, tmp_path / "out", tmp_path / "old.key", progress=False)
    assert (tmp_path / "old.key").read_bytes() == b"the owner's only key"
    with pytest.raises(ValueError, match="inside the published folder"):
        publish_imagefolder(src, released, tmp_path / "out", tmp_path / "out" / "a.key", progress=False)
    with pytest.raises(ValueError, match="inside the input folder"):
        publish_imagefolder(src, released, tmp_path / "out", src / "a.key", progress=False)
    with pytest.raises(ValueError, match="inside the input folder"):
        publish_imagefolder(src, released, src / "release", tmp_path / "a.key", progress=False)
    with pytest.raises(FileExistsError, match="commitment file"):
        publish_imagefolder(src, released, tmp_path / "out", tmp_path / "a.key",
                            commitment_path=tmp_path / "old.key", progress=False)
    # a release of the folder loaded with resizing (default 64 px) cannot be written at the files' size
    resized = load_dataset(f"imagefolder:{src}").train
    big = get_watermark("badnets", poisoning_rate=0.25).watermark(resized, seed=0)
    with pytest.raises(ValueError, match=f"image_size={SIZE}"):
        publish_imagefolder(src, big, tmp_path / "out", tmp_path / "a.key", progress=False)
    # a release of another folder
    other = make_folder(tmp_path / "other", seed=5)
    with pytest.raises(ValueError, match="does not belong to this folder"):
        publish_imagefolder(other, released, tmp_path / "out", tmp_path / "a.key", progress=False)
    with pytest.raises(TypeError, match="WatermarkedDataset"):
        publish_imagefolder(src, released.dataset, tmp_path / "out", tmp_path / "a.key", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "a.key").exists()
    assert sha_tree(src) == before and no_temp_left(tmp_path)


@pytest.mark.parametrize("where", ["png", "copy", "key"])
def test_publish_failure_midway_leaves_nothing(src, tmp_path, monkeypatch, where):
    train = load_dataset(f"imagefolder:{src}", image_size=SIZE).train
    released = get_watermark("ubw-p", poisoning_rate=0.25).watermark(train, seed=0)
    before = sha_tree(src)
    calls = {"n": 0}

    def fail_on_third(real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError("disk full (injected)")
            return real(*args, **kwargs)
        return wrapped

    if where == "png":
        monkeypatch.setattr(publish, "_write_png", fail_on_third(publish._write_png))
    elif where == "copy":
        monkeypatch.setattr(publish, "_copy_file", fail_on_third(publish._copy_file))
    else:  # after the folder and the key are written, the manifest fails
        def no_space(obj, path):
            raise OSError("disk full (injected)")

        monkeypatch.setattr(publish, "_write_private_json", no_space)
    with pytest.raises(OSError, match="injected"):
        publish_imagefolder(src, released, tmp_path / "out", tmp_path / "k.key", progress=False, workers=2)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "k.key").exists() and not (tmp_path / "k.key.manifest.json").exists()
    assert no_temp_left(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "pets"]
    assert sha_tree(src) == before
    # and a retry with the same paths succeeds
    monkeypatch.undo()
    monkeypatch.setenv("UBW_CACHE", str(tmp_path / "cache"))
    publish_imagefolder(src, released, tmp_path / "out", tmp_path / "k.key", progress=False)
    assert (tmp_path / "out").is_dir() and (tmp_path / "k.key").is_file()


# --------------------------------------------------------------------------------------------------
# commitment
# --------------------------------------------------------------------------------------------------


def make_key(**changes) -> WatermarkKey:
    fields = dict(
        method="badnets",
        settings={"poisoning_rate": 0.1, "pattern": "square", "alpha": 1.0, "target": 1},
        tensors={"pattern": torch.arange(12, dtype=torch.uint8).reshape(1, 3, 4),
                 "alpha": torch.linspace(0, 1, 12).reshape(1, 3, 4)},
        image_shape=(1, 3, 4),
        classes=("a", "b", "c"),
        dataset="tiny/train",
        seed=0,
        target=1,
    )
    fields.update(changes)
    return WatermarkKey(**fields)


SALT = bytes(range(32))


def test_commitment_is_deterministic_given_the_salt_and_salted_otherwise():
    key = make_key()
    c1, s1 = commit(key, SALT)
    c2, s2 = commit(make_key(), SALT)
    assert c1 == c2 and s1 == s2 == SALT and len(c1) == 64
    assert c1 == hashlib.sha256(COMMITMENT_PREFIX + SALT + canonical_key_bytes(key)).hexdigest()
    c3, s3 = commit(key)
    c4, s4 = commit(key)
    assert len(s3) == 32 and s3 != s4 and c3 != c4 and c3 != c1
    assert check_commitment(key, s3, c3) and check_commitment(key, s3, c3.upper())
    assert not check_commitment(key, s4, c3)
    assert not check_commitment(make_key(seed=1), s3, c3)


def test_canonical_bytes_layout():
    key = make_key()
    raw = canonical_key_bytes(key)
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n])
    assert list(meta) == sorted(meta) and meta["image_shape"] == [1, 3, 4] and meta["target"] == 1
    assert int.from_bytes(raw[8 + n : 16 + n], "little") == 2
    pos = 16 + n
    fields = []
    while pos < len(raw):
        size = int.from_bytes(raw[pos : pos + 8], "little")
        fields.append(raw[pos + 8 : pos + 8 + size])
        pos += 8 + size
    assert fields[0] == b"alpha" and fields[1] == b"float32" and fields[2] == b"[1,3,4]"
    assert fields[3] == key.tensors["alpha"].numpy().astype("<f4").tobytes()
    assert fields[4:7] == [b"pattern", b"uint8", b"[1,3,4]"] and fields[7] == bytes(range(12))


def test_commitment_survives_key_save_and_load(tmp_path):
    key = make_key(settings={"poisoning_rate": 0.1, "sizes": (3, 3), "nested": {"b": 1, "a": [1.5, None]}},
                   classes=("T-shirt/top", "Trouser", "Ünïcode"))
    key.save(tmp_path / "k.key")
    assert canonical_key_bytes(WatermarkKey.load(tmp_path / "k.key")) == canonical_key_bytes(key)
    test = ImageDataset(torch.zeros(3, 1, 3, 4, dtype=torch.uint8), torch.arange(3), key.classes, "tiny/test")
    bound = key.bind_test_split(test)
    assert canonical_key_bytes(bound) != canonical_key_bytes(key)  # the commitment binds the test split too
    bound.save(tmp_path / "bound.key")
    assert canonical_key_bytes(WatermarkKey.load(tmp_path / "bound.key")) == canonical_key_bytes(bound)


def test_commitment_test_split_binding_changes_the_commitment():
    base, _ = commit(make_key(test_dataset="tiny/test", test_fingerprint="0" * 64), SALT)
    other, _ = commit(make_key(test_dataset="tiny/test", test_fingerprint="1" + "0" * 63), SALT)
    assert base != other


VARIANTS = {
    "method": dict(method="blended"),
    "settings value": dict(settings={"poisoning_rate": 0.1000001, "pattern": "square", "alpha": 1.0, "target": 1}),
    "settings key": dict(settings={"poisoning_rate": 0.1, "pattern": "square", "alpha": 1.0, "targets": 1}),
    "image_shape": dict(image_shape=(1, 4, 3)),
    "classes": dict(classes=("a", "b", "d")),
    "class order": dict(classes=("b", "a", "c")),
    "dataset": dict(dataset="tiny/test"),
    "seed": dict(seed=1),
    "target": dict(target=2),
    "no target": dict(target=None),
    "tensor name": dict(tensors={"patterns": torch.arange(12, dtype=torch.uint8).reshape(1, 3, 4),
                                 "alpha": torch.linspace(0, 1, 12).reshape(1, 3, 4)}),
    "tensor shape": dict(tensors={"pattern": torch.arange(12, dtype=torch.uint8).reshape(3, 4),
                                  "alpha": torch.linspace(0, 1, 12).reshape(1, 3, 4)}),
    "tensor dtype": dict(tensors={"pattern": torch.arange(12, dtype=torch.int8).reshape(1, 3, 4),
                                  "alpha": torch.linspace(0, 1, 12).reshape(1, 3, 4)}),
    "test split": dict(test_dataset="tiny/test", test_fingerprint="0" * 64),
    "extra tensor": dict(tensors={"pattern": torch.arange(12, dtype=torch.uint8).reshape(1, 3, 4),
                                  "alpha": torch.linspace(0, 1, 12).reshape(1, 3, 4),
                                  "z": torch.zeros(0)}),
}


@pytest.mark.parametrize("field", sorted(VARIANTS))
def test_commitment_changes_with_every_field(field):
    base, _ = commit(make_key(), SALT)
    other, _ = commit(make_key(**VARIANTS[field]), SALT)
    assert other != base
    assert not check_commitment(make_key(**VARIANTS[field]), SALT, base)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["pattern", "alpha"]), pos=st.integers(0, 11 * 4 + 3), bit=st.integers(0, 7))
def test_commitment_changes_when_any_tensor_byte_changes(name, pos, bit):
    key = make_key()
    base, _ = commit(key, SALT)
    t = key.tensors[name].clone()
    raw = t.reshape(-1).view(torch.uint8)
    raw[pos % raw.numel()] ^= 1 << bit
    tensors = dict(key.tensors, **{name: t})
    assert commit(make_key(tensors=tensors), SALT)[0] != base


@settings(max_examples=40, deadline=None)
@given(salt=st.binary(min_size=32, max_size=32), other=st.binary(min_size=32, max_size=32))
def test_commitment_depends_on_the_salt(salt, other):
    key = make_key()
    c, _ = commit(key, salt)
    assert check_commitment(key, salt, c)
    assert check_commitment(key, other, c) == (other == salt)


def test_commitment_input_checks():
    key = make_key()
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        commit(key, b"short")
    with pytest.raises(TypeError, match="salt must be bytes"):
        commit(key, "0" * 32)
    with pytest.raises(ValueError, match="64 hex digits"):
        check_commitment(key, SALT, "xyz")
    with pytest.raises(TypeError, match="WatermarkKey"):
        canonical_key_bytes({"method": "badnets"})


def test_save_and_load_commitment(tmp_path):
    c, salt = commit(make_key())
    path = save_commitment(tmp_path / "pets.commitment.json", c, salt)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_commitment(path) == (c, salt)
    payload = json.loads(path.read_text())
    assert payload == {"format": "ubw-commitment/1", "commitment": c, "salt": salt.hex()}
    with pytest.raises(FileExistsError, match="never overwrites"):
        save_commitment(path, c, os.urandom(32))
    assert load_commitment(path) == (c, salt)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a commitment file"):
        load_commitment(tmp_path / "bad.json")
    (tmp_path / "garbage").write_bytes(b"\xff\x00 not json")
    with pytest.raises(ValueError, match="not a commitment file"):
        load_commitment(tmp_path / "garbage")
