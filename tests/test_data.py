"""Datasets: ImageFolder / .tar.gz loading, the bytes-keyed tensor cache, selection, augmentation."""

from __future__ import annotations

import logging
import shutil
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, TEST_COUNTS, TRAIN_COUNTS, write_image
from edgekd import archive as archive_mod
from edgekd import data as data_mod
from edgekd.schema import DataConfig
from edgekd.data import Split, augment_batch, cache_root, iterate, load_data, stratified_indices
from edgekd.errors import EdgekdError

N_TRAIN = sum(TRAIN_COUNTS.values())
N_TEST = sum(TEST_COUNTS.values())


def cfg_for(source, cache: Path | None = None, **kw) -> DataConfig:
    """A DataConfig; with cache=None the session cache ($EDGEKD_CACHE) is used, so identical
    fixture images decoded by an earlier test are a cache hit (tests that inspect the cache or
    depend on decoding pass their own folder)."""
    return DataConfig(source=str(source), cache_dir=str(cache) if cache else None, **kw)


def forbid_decoding(monkeypatch):
    """Make any attempt to decode images (i.e. a cache miss) fail loudly."""

    def boom(*a, **k):
        raise AssertionError("images were decoded again; the tensor cache was not used")

    monkeypatch.setattr(data_mod, "ProcessPoolExecutor", boom)


def image_rows(split: Split) -> list[bytes]:
    return sorted(img.numpy().tobytes() for img in split.images)


# ----------------------------------------------------------------------------- ImageFolder


def test_image_folder_shapes_classes_labels(image_folder, tmp_path):
    d = load_data(cfg_for(image_folder, image_size=8), seed=0)
    assert d.classes == CLASSES == ["ant", "moose", "zebra"]  # sorted, not creation order
    assert d.num_classes == 3 and d.image_size == 8
    assert d.train.images.shape == (N_TRAIN, 3, 8, 8) and d.train.images.dtype == torch.uint8
    assert d.test.images.shape == (N_TEST, 3, 8, 8)
    assert d.train.labels.dtype == torch.int64
    assert d.train.labels.tolist() == [0] * 6 + [1] * 4 + [2] * 2
    assert d.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert d.val is None
    assert d.train.classes == d.test.classes == CLASSES
    assert d.train.key and d.test.key and d.train.key != d.test.key


def test_image_folder_pixels_are_exact_for_png(image_folder, tmp_path):
    d = load_data(cfg_for(image_folder, image_size=8), seed=0)
    # files are sorted inside each class: train/ant/img_0.png is sample 0, train/moose/img_2.png sample 8
    for idx, rel in [(0, "train/ant/img_0.png"), (8, "train/moose/img_2.png"), (10, "train/zebra/img_0.png")]:
        expected = np.asarray(Image.open(image_folder / rel).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(d.train.images[idx].numpy(), expected), rel


def test_image_folder_jpeg_matches_pillow(image_folder, tmp_path):
    d = load_data(cfg_for(image_folder, image_size=8), seed=0)
    expected = np.asarray(Image.open(image_folder / "train/ant/img_1.jpg").convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(d.train.images[1].numpy(), expected)


def test_images_are_resized_to_image_size(image_folder, tmp_path):
    d = load_data(cfg_for(image_folder, image_size=16), seed=0)
    assert d.train.images.shape == (N_TRAIN, 3, 16, 16)
    assert d.test.images.shape == (N_TEST, 3, 16, 16)
    assert d.image_size == 16
    with Image.open(image_folder / "train/ant/img_0.png") as im:
        expected = np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(d.train.images[0].numpy(), expected)


def test_default_image_size_is_32(image_folder, tmp_path):
    d = load_data(cfg_for(image_folder), seed=0)
    assert d.train.images.shape[-2:] == (32, 32)


def test_mixed_size_images_are_all_resized(make_image_folder, tmp_path):
    root = make_image_folder()
    write_image(root / "train" / "ant" / "img_9.png", np.zeros((20, 13, 3), np.uint8))
    d = load_data(cfg_for(root, image_size=8), seed=0)
    assert d.train.images.shape == (N_TRAIN + 1, 3, 8, 8)


def test_val_folder_is_found_as_test_split(make_image_folder, tmp_path):
    root = make_image_folder(test_name="val")
    d = load_data(cfg_for(root, image_size=8), seed=0)
    assert len(d.test) == N_TEST


def test_explicit_split_dirs(make_image_folder, tmp_path):
    root = make_image_folder(test_name="holdout")
    d = load_data(cfg_for(root, image_size=8, test_dir="holdout"), seed=0)
    assert len(d.train) == N_TRAIN and len(d.test) == N_TEST
    with pytest.raises(EdgekdError, match=r"nosuch: split folder not found"):
        load_data(cfg_for(root, train_dir="nosuch"), seed=0)


def test_missing_test_split(image_folder, tmp_path):
    shutil.rmtree(image_folder / "test")
    with pytest.raises(EdgekdError, match=r"no 'test' folder found .*set data\.test_split \(e\.g\. 0\.2\)"):
        load_data(cfg_for(image_folder), seed=0)
    shutil.move(image_folder / "train", image_folder / "classes")
    with pytest.raises(EdgekdError, match=r"no 'train' folder found .*set data\.test_split"):
        load_data(cfg_for(image_folder), seed=0)


@pytest.mark.parametrize("layout", ["classes", "train-only", "zip-of-a-wrapper"])
def test_test_split_holds_a_fixed_stratified_part_of_a_source_with_no_test_folder(image_folder, tmp_path, layout):
    """Many users' data is one folder of class folders: data.test_split holds out the same
    stratified images whatever the run's seed (as a test folder would), the rest trains."""
    shutil.rmtree(image_folder / "test")
    source = image_folder / "train" if layout == "classes" else image_folder
    if layout == "zip-of-a-wrapper":
        source = _make_zip(image_folder / "train", tmp_path / "flowers.zip", "flowers")
    full = load_data(cfg_for(image_folder, tmp_path / "c0", image_size=8, test_dir="train"), seed=0).test
    runs = [load_data(cfg_for(source, tmp_path / "c", image_size=8, test_split=0.25), seed=seed) for seed in (0, 1)]
    for d in runs:
        assert d.classes == CLASSES and len(d.test) == round(N_TRAIN * 0.25) and len(d.train) + len(d.test) == N_TRAIN
        assert torch.bincount(d.test.labels, minlength=3).tolist() == [2, 1, 0]  # in proportion to 6 / 4 / 2
        rows = set(image_rows(full))
        assert set(image_rows(d.train)) | set(image_rows(d.test)) == rows
        assert not set(image_rows(d.train)) & set(image_rows(d.test))
    assert torch.equal(runs[0].test.images, runs[1].test.images) and runs[0].test.key == runs[1].test.key
    (image_folder / "test").mkdir()
    shutil.copytree(image_folder / "train" / "ant", image_folder / "test" / "ant")
    if layout == "train-only":
        with pytest.raises(EdgekdError, match=r"^data\.test_split: .* has a test folder of its own"):
            load_data(cfg_for(image_folder, tmp_path / "c", image_size=8, test_split=0.25), seed=0)


def _flat_with_labels(image_folder: Path, root: Path, header: str = "id,breed", bare: bool = True) -> Path:
    """The fixture's train and test images as a labelled source (Kaggle's layout): every image in
    one flat folder per split, named by an id, and a CSV per split naming each id's class."""
    for split in ("train", "test"):
        rows = [header]
        for i, f in enumerate(sorted((image_folder / split).rglob("img_*"))):
            ident = f"{split}{i:03d}"
            (root / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / split / f"{ident}{f.suffix}")
            rows.append(f"{ident if bare else f'{split}/{ident}{f.suffix}'},{f.parent.name}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_csv_labelled_source_gives_the_class_folders_images_and_classes(image_folder, tmp_path):
    """data.labels: images named in a CSV (bare ids, found with their suffix) give the same
    pixels, labels and classes as the same images in class folders; a CSV inside an archive too."""
    folders = load_data(cfg_for(image_folder, tmp_path / "c0", image_size=8), seed=0)
    root = _flat_with_labels(image_folder, tmp_path / "kaggle")
    for source in (root, _make_zip(root, tmp_path / "kaggle.zip", "kaggle")):
        d = load_data(cfg_for(source, tmp_path / "c", image_size=8, labels="train.csv", train_dir="train",
                              test_labels="test.csv", test_dir="test", label_columns=("id", "breed")), seed=0)
        assert d.classes == CLASSES and len(d.train) == N_TRAIN and len(d.test) == N_TEST
        for ours, theirs in ((d.train, folders.train), (d.test, folders.test)):
            got = sorted(zip(image_rows_list(ours), ours.labels.tolist()))
            assert got == sorted(zip(image_rows_list(theirs), theirs.labels.tolist()))
    (root / "train.csv").write_text((root / "train.csv").read_text().replace(",zebra", ",moose"))
    relabelled = load_data(cfg_for(root, tmp_path / "c", image_size=8, labels="train.csv", train_dir="train",
                                   test_split=0.25, label_columns=("id", "breed")), seed=0)
    assert relabelled.classes == ["ant", "moose"] and relabelled.train.key != d.train.key  # keyed on the labels too


def image_rows_list(split: Split) -> list[bytes]:
    return [img.numpy().tobytes() for img in split.images]


def test_label_files_name_what_is_wrong(image_folder, tmp_path, caplog):
    root = _flat_with_labels(image_folder, tmp_path / "kaggle", header="image,label", bare=False)
    (root / "train" / "nested").mkdir()
    shutil.move(root / "train" / "train000.png", root / "train" / "nested" / "a.png")  # files relative to the CSV's folder
    rows = (root / "train.csv").read_text().replace("train/train000.png", "train/nested/a.png")
    (root / "train.csv").write_text(rows)
    base = dict(image_size=8, labels="train.csv", test_split=0.25)
    assert load_data(cfg_for(root, tmp_path / "c", **base), seed=0).classes == CLASSES
    (root / "numbers.csv").write_text("file,target\n" + "".join(f"train/train{i:03d}.{'png' if i % 2 == 0 else 'jpg'},{i % 2 * 10 + 2}\n"
                                                                  for i in range(1, 12)))
    assert load_data(cfg_for(root, tmp_path / "c", **{**base, "labels": "numbers.csv"}), seed=0).classes == ["2", "12"]
    excel = "Image;Label\r\n" + "".join(f"train\\train{i:03d}.{'png' if i % 2 == 0 else 'jpg'};{'élan' if i % 2 else 'ant'}\r\n"
                                         for i in range(1, 12))
    (root / "excel.csv").write_bytes(excel.encode("cp1252"))  # Windows, a ';' locale, backslashes, an accent
    assert load_data(cfg_for(root, tmp_path / "c", **{**base, "labels": "excel.csv"}), seed=0).classes == ["ant", "élan"]
    (root / "cols.csv").write_text("name,kind\ntrain/train001.jpg,ant\n")
    with pytest.raises(EdgekdError, match=r"^data\.labels: .*cols\.csv has no file column one of file_name, .* \(its "
                                          r"columns: name, kind\); name them with data\.label_columns"):
        load_data(cfg_for(root, tmp_path / "c", **{**base, "labels": "cols.csv"}), seed=0)
    (root / "gone.csv").write_text(rows + "train/nothere.png,ant\n")
    with pytest.raises(EdgekdError, match=r"^data\.labels: .*nothere\.png \(named on row 14 of .*gone\.csv, not found\); "
                                          r"fix it or set data\.skip_bad_images: true$"):
        load_data(cfg_for(root, tmp_path / "c", **{**base, "labels": "gone.csv"}), seed=0)
    with caplog.at_level(logging.WARNING, logger="edgekd"):
        skipped = load_data(cfg_for(root, tmp_path / "c", **{**base, "labels": "gone.csv"}, skip_bad_images=True), seed=0)
    assert len(skipped.train) + len(skipped.test) == N_TRAIN and [s["file"].rpartition("/")[2] for s in skipped.skipped if "gone.csv" in s["reason"]] == ["nothere.png"]
    (root / "other.csv").write_text("image,label\ntest/test000.png,wolf\n")
    with pytest.raises(EdgekdError, match=r"^data\.test_labels: .*other\.csv has classes the train labels do not: wolf$"):
        load_data(cfg_for(root, tmp_path / "c", image_size=8, labels="train.csv", test_labels="other.csv"), seed=0)
    with pytest.raises(EdgekdError, match=r"^data\.labels: nope\.csv not found in "):
        load_data(cfg_for(root, tmp_path / "c", **{**base, "labels": "nope.csv"}), seed=0)


def test_validate_checks_a_folder_sources_layout(image_folder, write_pipeline, minimal_pipeline, capsys):
    """`edgekd validate` lists a folder source's splits and label files as a run would, in a
    second, instead of leaving the mistake to the run."""
    from edgekd.cli import main

    shutil.rmtree(image_folder / "test")
    path = write_pipeline(minimal_pipeline)
    assert main(["validate", str(path)]) == 2
    assert "no 'test' folder found" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "data.test_split=0.25"]) == 0
    assert main(["validate", str(path), "--set", "data.test_split=0.25", "--set", "data.labels=labels.csv"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"data.labels: labels.csv not found in {image_folder}")


def test_class_names_file_gives_the_classes_readable_names(image_folder, tmp_path, write_pipeline, minimal_pipeline,
                                                            capsys, monkeypatch):
    """data.class_names: Imagenette's classes.txt (tab) or ImageNet's synset mapping (spaces, more
    classes than the data has), inside the source or a path of its own; the names are what the
    data's classes are called from then on (metadata, report). A class left unnamed, two classes
    of one name, or no such file are one-line errors, from validate too."""
    from edgekd.cli import main

    (image_folder / "classes.txt").write_text("ant\tcarpenter ant\nmoose\tEurasian elk\nzebra\tplains zebra\n")
    data = load_data(cfg_for(image_folder, class_names="classes.txt", val_split=0.25), seed=0)
    assert data.classes == data.test.classes == data.val.classes == ["carpenter ant", "Eurasian elk", "plains zebra"]
    synsets = tmp_path / "LOC_synset_mapping.txt"
    synsets.write_text("# wnid name\naardvark Orycteropus afer\nant formicid, emmet\nmoose  Alces alces\n\nzebra zebra\n")
    assert load_data(cfg_for(image_folder, class_names=str(synsets)), seed=0).classes == [
        "formicid, emmet", "Alces alces", "zebra"]
    synsets.with_name("two.txt").write_text("ant formicid\n")
    path = write_pipeline({**minimal_pipeline, "data": {**minimal_pipeline["data"], "class_names": "classes.txt"}})
    assert main(["validate", str(path)]) == 0
    for text, why in [("ant x\nmoose y\n", "names no 'zebra' of the data's 3 classes"),
                      ("ant x\nmoose x\nzebra z\n", "names ant, moose all 'x'"),
                      ("ant x\nmoose\nzebra z\n", "line 2: expected '<class> <name>', got 'moose'")]:
        (image_folder / "classes.txt").write_text(text)
        with pytest.raises(EdgekdError, match=why):
            load_data(cfg_for(image_folder, class_names="classes.txt"), seed=0)
        assert main(["validate", str(path)]) == 2 and why in capsys.readouterr().err
    # classes from a label file are named the same way, checked before its images are decoded
    root = _flat_with_labels(image_folder, tmp_path / "kaggle")
    labelled = dict(labels="train.csv", train_dir="train", test_split=0.25, label_columns=("id", "breed"))
    assert load_data(cfg_for(root, tmp_path / "c", class_names=str(synsets), **labelled), seed=0).classes == [
        "formicid, emmet", "Alces alces", "zebra"]
    forbid_decoding(monkeypatch)
    with pytest.raises(EdgekdError, match="names no 'moose', 'zebra' of the data's 3 classes"):
        load_data(cfg_for(root, tmp_path / "fresh", class_names=str(synsets.with_name("two.txt")), **labelled), seed=0)
    # in an archive (which validate does not open), before a single image is decoded
    archive = _make_zip(image_folder, tmp_path / "set.zip", "set")
    with pytest.raises(EdgekdError, match="names no 'moose', 'zebra' of the data's 3 classes"):
        load_data(cfg_for(archive, cache=tmp_path / "fresh", class_names=str(synsets.with_name("two.txt"))), seed=0)
    assert main(["validate", str(path), "--set", "data.class_names=names.txt"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"data.class_names: names.txt not found in {image_folder} nor as a file of its own "
        "(expected a text file of '<class> <name>' lines)")


def test_test_split_and_test_dir_are_one_choice():
    with pytest.raises(ValueError, match="set one"):
        DataConfig(source="x", test_split=0.2, test_dir="holdout")


def test_train_and_test_classes_must_match(make_image_folder, tmp_path):
    root = make_image_folder(test_counts={"ant": 1, "moose": 1})
    with pytest.raises(EdgekdError, match=r"have different class folders"):
        load_data(cfg_for(root, image_size=8), seed=0)


def test_missing_source_path(tmp_path):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(EdgekdError, match=r"^data\.source: .*no_such_dataset does not exist$"):
        load_data(cfg_for(missing, tmp_path / "cache"), seed=0)


def test_source_file_that_is_not_an_archive(tmp_path):
    f = tmp_path / "data.rar"
    f.write_bytes(b"Rar!\x1a\x07\x00")
    with pytest.raises(EdgekdError, match=r"is a file but not a \.tar\.gz/\.tgz/\.tar\.xz/.*/\.zip archive"):
        load_data(cfg_for(f, tmp_path / "cache"), seed=0)


def test_num_classes_mismatch(image_folder, tmp_path):
    with pytest.raises(EdgekdError, match=r"data\.num_classes is 5 but .* has 3 classes"):
        load_data(cfg_for(image_folder, image_size=8, num_classes=5), seed=0)


def test_num_classes_match_is_accepted(image_folder, tmp_path):
    d = load_data(cfg_for(image_folder, image_size=8, num_classes=3), seed=0)
    assert d.num_classes == 3


def test_data_carries_loader_options(image_folder, tmp_path):
    d = load_data(cfg_for(image_folder, image_size=8, batch_size=4, eval_batch_size=5,
                          augment="flip", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), seed=0)
    assert (d.batch_size, d.eval_batch_size, d.augment) == (4, 5, "flip")
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    assert torch.allclose(d.normalize(x), torch.tensor([-2.0, 2.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2))


# ----------------------------------------------------------------------------- bad images


def test_corrupt_image_names_the_file(image_folder, tmp_path):
    bad = image_folder / "train" / "moose" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(EdgekdError) as info:
        load_data(cfg_for(image_folder, tmp_path / "cache", image_size=8), seed=0)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: unreadable image"), msg
    assert "skip_bad_images" in msg and "more)" not in msg


def test_several_corrupt_images_are_counted(image_folder, tmp_path):
    (image_folder / "train" / "ant" / "b1.png").write_bytes(b"x")
    (image_folder / "train" / "zebra" / "b2.png").write_bytes(b"y")
    with pytest.raises(EdgekdError, match=r"ant/b1\.png: unreadable image .*\(and 1 more\)"):
        load_data(cfg_for(image_folder, tmp_path / "cache", image_size=8), seed=0)


def test_truncated_image_is_an_error(image_folder, tmp_path):
    f = image_folder / "test" / "zebra" / "img_0.png"
    f.write_bytes(f.read_bytes()[:30])
    with pytest.raises(EdgekdError, match=r"zebra/img_0\.png: unreadable image"):
        load_data(cfg_for(image_folder, tmp_path / "cache", image_size=8), seed=0)


def test_skip_bad_images_warns_and_skips(image_folder, tmp_path, caplog):
    bad = image_folder / "train" / "moose" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with caplog.at_level(logging.WARNING, logger="edgekd"):
        d = load_data(cfg_for(image_folder, tmp_path / "cache", image_size=8, skip_bad_images=True), seed=0)
    assert len(d.train) == N_TRAIN  # the 13th (bad) file is gone
    assert d.train.labels.tolist() == [0] * 6 + [1] * 4 + [2] * 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and str(bad) in r.getMessage()]
    assert len(warnings) == 1 and "skipping unreadable image" in warnings[0].getMessage()


def test_cached_skip_does_not_hide_corrupt_image_later(image_folder, tmp_path):
    (image_folder / "train" / "moose" / "broken.jpg").write_bytes(b"this is not a jpeg")
    cache = tmp_path / "cache"
    load_data(cfg_for(image_folder, cache, image_size=8, skip_bad_images=True), seed=0)
    try:
        load_data(cfg_for(image_folder, cache, image_size=8, skip_bad_images=False), seed=0)
    except EdgekdError as e:
        assert "broken.jpg" in str(e)
    else:
        raise AssertionError("corrupt image accepted silently from the cache with skip_bad_images: false")


# ----------------------------------------------------------------------------- tensor cache


def test_cache_root_precedence(monkeypatch, tmp_path, _edgekd_cache):
    assert cache_root() == Path(str(_edgekd_cache))  # the session fixture set EDGEKD_CACHE
    assert cache_root(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("EDGEKD_CACHE")
    assert cache_root() == Path("~/.cache/edgekd").expanduser()


def test_session_cache_env_is_used(image_folder, _edgekd_cache):
    d = load_data(DataConfig(source=str(image_folder), image_size=8), seed=0)
    assert (Path(_edgekd_cache) / "tensors" / f"{d.train.key[:32]}.u8").is_file()


def test_cache_is_written_and_reused(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_data(cfg_for(image_folder, cache, image_size=8), seed=0)
    files = sorted(p.name for p in (cache / "tensors").iterdir())
    assert files == sorted(f"{s.key[:32]}{ext}" for s in (first.train, first.test) for ext in (".u8", ".meta.pt"))
    forbid_decoding(monkeypatch)
    second = load_data(cfg_for(image_folder, cache, image_size=8), seed=0)
    assert second.train.key == first.train.key
    assert torch.equal(second.train.images, first.train.images)
    assert torch.equal(second.train.labels, first.train.labels)
    assert second.classes == first.classes


def test_cache_key_is_location_independent(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_data(cfg_for(image_folder, cache, image_size=8), seed=0)
    moved = shutil.copytree(image_folder, tmp_path / "elsewhere" / "renamed")
    forbid_decoding(monkeypatch)  # same bytes under another name: a cache hit
    again = load_data(cfg_for(moved, cache, image_size=8), seed=0)
    assert again.train.key == first.train.key and again.test.key == first.test.key


def test_cache_key_follows_bytes(image_folder, tmp_path):
    cache = tmp_path / "cache"
    first = load_data(cfg_for(image_folder, cache, image_size=8), seed=0)
    target = image_folder / "train" / "moose" / "img_0.png"
    original = target.read_bytes()

    write_image(target, np.full((8, 8, 3), 7, np.uint8))  # new bytes, same name
    changed = load_data(cfg_for(image_folder, cache, image_size=8), seed=0)
    assert changed.train.key != first.train.key
    assert changed.test.key == first.test.key  # untouched split keeps its key
    assert (changed.train.images[6] == 7).all()  # and the new pixels are really used

    target.write_bytes(original)  # same bytes again -> same key, same tensors
    restored = load_data(cfg_for(image_folder, cache, image_size=8), seed=0)
    assert restored.train.key == first.train.key
    assert torch.equal(restored.train.images, first.train.images)


def test_cache_key_depends_on_image_size(image_folder, tmp_path):
    a = load_data(cfg_for(image_folder, tmp_path / "cache", image_size=8), seed=0)
    b = load_data(cfg_for(image_folder, tmp_path / "cache", image_size=16), seed=0)
    assert a.train.key != b.train.key
    assert b.train.images.shape[-1] == 16


def test_unreadable_cache_file_is_decoded_again(image_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = load_data(cfg_for(image_folder, cache, image_size=8), seed=0)
    for damage in (".meta.pt", ".u8"):  # garbage metadata, or a pixel file of the wrong size
        (cache / "tensors" / f"{first.train.key[:32]}{damage}").write_bytes(b"garbage")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgekd"):
            again = load_data(cfg_for(image_folder, cache, image_size=8), seed=0)
        assert torch.equal(again.train.images, first.train.images)
        assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_images_are_decoded_as_a_viewer_shows_them(make_image_folder, tmp_path):
    """A phone photo stored sideways with an EXIF orientation tag is trained upright, and 16-bit
    grey is scaled to 8 bits (PIL's convert("RGB") alone clips it to white)."""
    root = make_image_folder("ds", size=8)
    rng = np.random.default_rng(5)
    upright = rng.integers(0, 256, (12, 8, 3), dtype=np.uint8)
    for orientation, turn in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270), (3, Image.Transpose.ROTATE_180)):
        stored = Image.fromarray(upright).transpose(turn)
        exif = stored.getexif()
        exif[0x0112] = orientation
        stored.save(root / "train" / "ant" / f"photo_{orientation}.png", exif=exif)
    Image.fromarray(upright).save(root / "train" / "ant" / "photo_upright.png")
    grey = np.array([[0, 257 * 100], [65535, 257 * 200]], np.uint16).repeat(4, 0).repeat(4, 1)
    Image.fromarray(grey).save(root / "train" / "moose" / "grey16.png")
    split = load_data(cfg_for(root, tmp_path / "cache", image_size=8), seed=0).train
    names = [f.name for f in data_mod._list_image_folder(root / "train")[0]]
    want = split.images[names.index("photo_upright.png")]
    for orientation in (6, 8, 3):
        assert torch.equal(split.images[names.index(f"photo_{orientation}.png")], want), orientation
    got = split.images[names.index("grey16.png")]
    assert got[:, 0, 0].tolist() == [0] * 3 and got[:, 0, 7].tolist() == [100] * 3 and got[:, 7, 0].tolist() == [255] * 3


def test_phone_formats_are_read_and_other_files_are_named_not_dropped_silently(make_image_folder, tmp_path, caplog,
                                                                             monkeypatch):
    """iPhone photos (HEIC, with pillow-heif), AVIF, GIF and .jfif JPEGs are images; a file of any
    other suffix is left out with one line naming the suffixes, and a HEIC photo without
    pillow-heif is named with what to install, not as a corrupt file."""
    root = make_image_folder("ds", size=8)
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "train" / "ant" / "a.gif")
    Image.fromarray(pixels).save(root / "train" / "ant" / "b.jfif", format="JPEG")
    Image.fromarray(pixels).save(root / "train" / "ant" / "c.avif")
    (root / "train" / "moose" / "notes.txt").write_text("shot on a phone")
    (root / "train" / "moose" / "d.jxl").write_bytes(b"\xff\x0a")
    with caplog.at_level(logging.WARNING, logger="edgekd"):
        split = load_data(cfg_for(root, tmp_path / "c", image_size=8), seed=0).train
    assert len(split) == N_TRAIN + 3
    assert any("left out 2 file(s) whose suffix is not an image's (.jxl: 1, .txt: 1)" in r.getMessage()
               or "left out 2 file(s) whose suffix is not an image's (.txt: 1, .jxl: 1)" in r.getMessage()
               for r in caplog.records)
    monkeypatch.setattr(data_mod, "_heif_opener", lambda: False)
    assert data_mod._decode((b"\0\0\0\x1cftypheic" + bytes(40), 8, 10**6)).endswith("pip install 'edgekd[heic]'")
    monkeypatch.undo()
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    Image.fromarray(pixels).save(root / "train" / "zebra" / "e.heic")
    split = load_data(cfg_for(root, tmp_path / "c", image_size=8), seed=0).train
    names = [f.name for f in data_mod._list_image_folder(root / "train")[0]]
    with Image.open(root / "train" / "zebra" / "e.heic") as im:
        want = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(split.images[names.index("e.heic")].numpy(), want)


def test_hidden_files_and_macos_folders_are_left_out(image_folder, tmp_path, caplog):
    """What a desktop leaves beside the images is not data: macOS's `._x.png` resource forks
    (the image's suffix, not an image), hidden folders, and a zip's `__MACOSX` folder, which
    would otherwise be a class or the train split."""
    clean = load_data(cfg_for(image_folder, tmp_path / "clean", image_size=8), seed=0)
    (image_folder / "train" / "ant" / "._img_0.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    write_image(image_folder / "train" / "moose" / ".thumbs" / "t.png", np.zeros((8, 8, 3), np.uint8))
    write_image(image_folder / "train" / "__MACOSX" / "ant" / "._img_0.png", np.zeros((8, 8, 3), np.uint8))
    with caplog.at_level(logging.INFO, logger="edgekd"):
        messy = load_data(cfg_for(image_folder, tmp_path / "messy", image_size=8), seed=0)
    assert messy.classes == CLASSES and torch.equal(messy.train.images, clean.train.images)
    assert any("left out 2 hidden image file(s)" in r.getMessage() for r in caplog.records)
    outer = tmp_path / "outer"
    shutil.copytree(image_folder, outer / "set")
    write_image(outer / "__MACOSX" / "set" / "train" / "ant" / "._x.png", np.zeros((8, 8, 3), np.uint8))
    assert data_mod._find_split_dir(outer, None, ("train",)) == outer / "set" / "train"


# ----------------------------------------------------------------------------- archives


def _make_tar(folder: Path, dest: Path, top: str | None, mode: str = "w:gz") -> Path:
    if mode == "zip":
        return _make_zip(folder, dest, top)
    with tarfile.open(dest, mode) as tar:
        if top:
            tar.add(folder, arcname=top)
        else:
            for child in sorted(folder.iterdir()):
                tar.add(child, arcname=child.name)
    return dest


def _make_zip(folder: Path, dest: Path, top: str | None) -> Path:
    """As macOS's Finder zips a folder: folder entries, and each file's resource fork under
    __MACOSX/ (`._<name>`, the image's suffix but not an image)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).as_posix()
            name = f"{top}/{rel}" if top else rel
            if p.is_dir():
                zf.writestr(name + "/", b"")
            else:
                zf.write(p, name)
                head, _, leaf = name.rpartition("/")
                zf.writestr(f"__MACOSX/{head}/._{leaf}".replace("//", "/"), b"\x00\x05\x16\x07 resource fork")
    return dest


@pytest.fixture(params=["in-memory", "extracted"])
def archive_route(request, monkeypatch):
    """Both ways an archive is read (edgekd.archive): in memory, and extracted once (an archive
    over IN_MEMORY_BYTES)."""
    if request.param == "extracted":
        monkeypatch.setattr(archive_mod, "IN_MEMORY_BYTES", 0)
    return request.param


@pytest.mark.parametrize("top,name,mode", [("mini-set", "mini.tar.gz", "w:gz"), (None, "mini.tar.gz", "w:gz"),
                                           (None, "mini.tar.xz", "w:xz"), ("mini-set", "Mini.ZIP", "zip"),
                                           (None, "mini.zip", "zip")],
                         ids=["top-folder", "flat", "xz", "zip-top-folder", "zip-flat"])
def test_tar_gz_matches_folder(image_folder, tmp_path, top, name, mode, archive_route):
    cache = tmp_path / "cache"
    archive = _make_tar(image_folder, tmp_path / name, top, mode)
    from_folder = load_data(cfg_for(image_folder, tmp_path / "folder-cache", image_size=8), seed=0)
    from_tar = load_data(cfg_for(archive, cache, image_size=8), seed=0)
    assert from_tar.classes == CLASSES
    assert from_tar.train.images.shape == (N_TRAIN, 3, 8, 8)
    assert torch.equal(from_tar.train.images, from_folder.train.images)
    assert torch.equal(from_tar.test.labels, from_folder.test.labels)
    assert from_tar.train.key == from_folder.train.key  # keyed on bytes, not on where they came from
    # in memory the cache holds the decoded splits and nothing unpacked
    assert (cache / "extracted").exists() == (archive_route == "extracted")


def test_nested_images_in_an_archive_come_in_the_extracted_folder_order(image_folder, tmp_path, archive_route):
    """Images in subfolders of a class, beside files whose names sort differently as strings
    ("a-b.png" < "a/x.png") than as paths ("a" < "a-b.png"): both routes list them as `Path`
    does, so labels, pixels and the cache key match the folder's."""
    rng = np.random.default_rng(1)
    for rel in ("ant/a/x.png", "ant/a-b.png", "ant/a/y/z.png", "moose/b.c.png"):
        write_image(image_folder / "train" / rel, rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    archive = _make_tar(image_folder, tmp_path / "nested.tar.gz", "top")
    from_folder = load_data(cfg_for(image_folder, tmp_path / "folder-cache", image_size=8), seed=0)
    from_tar = load_data(cfg_for(archive, tmp_path / "cache", image_size=8), seed=0)
    assert len(from_tar.train) == N_TRAIN + 4
    assert from_tar.train.key == from_folder.train.key
    assert torch.equal(from_tar.train.images, from_folder.train.images)
    assert torch.equal(from_tar.train.labels, from_folder.train.labels)


def test_a_small_archive_is_read_in_one_pass_without_unpacking_a_file(image_folder, tmp_path, monkeypatch):
    """Unpacking writes a file per image, which is what costs on small images: a small archive
    is read as one stream, and a bad image inside it is named by its place in the archive."""
    archive = _make_tar(image_folder, tmp_path / "mini.tar.gz", "mini-set")
    opened = []
    real_open = archive_mod.tarfile.open
    monkeypatch.setattr(archive_mod.tarfile, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    load_data(cfg_for(archive, tmp_path / "cache", image_size=8), seed=0)
    assert len(opened) == 1 and not (tmp_path / "cache" / "extracted").exists()
    write_image(image_folder / "train" / "ant" / "img_0.png", np.zeros((8, 8, 3), np.uint8))
    (image_folder / "train" / "ant" / "img_0.png").write_bytes(b"not a png")
    _make_tar(image_folder, archive, "mini-set")
    with pytest.raises(EdgekdError, match=r"mini\.tar\.gz/mini-set/train/ant/img_0\.png: unreadable image"):
        load_data(cfg_for(archive, tmp_path / "cache", image_size=8), seed=0)


def test_an_archive_with_links_or_over_the_memory_bound_is_extracted(image_folder, tmp_path, monkeypatch):
    with tarfile.open(tmp_path / "links.tar.gz", "w:gz") as tar:
        tar.add(image_folder, arcname="set")
        link = tarfile.TarInfo("set/train/ant/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "img_0.png"
        tar.addfile(link)
    linked = load_data(cfg_for(tmp_path / "links.tar.gz", tmp_path / "cache", image_size=8), seed=0)
    assert (tmp_path / "cache" / "extracted").is_dir() and len(linked.train) == N_TRAIN + 1  # the link is an image too
    (image_folder / "notes.txt").write_bytes(bytes(1 << 20))  # compresses to a few KB
    packed = _make_tar(image_folder, tmp_path / "packed.tar.gz", "set")
    monkeypatch.setattr(archive_mod, "IN_MEMORY_BYTES", packed.stat().st_size)  # the archive fits, its bytes do not
    monkeypatch.setattr(archive_mod, "extract_archive", lambda *a: (_ for _ in ()).throw(AssertionError("extracted")))
    with pytest.raises(AssertionError, match="extracted"):
        load_data(cfg_for(packed, tmp_path / "cache2", image_size=8), seed=0)


def test_tar_gz_is_extracted_once(image_folder, tmp_path, monkeypatch, archive_route):
    cache = tmp_path / "cache"
    archive = _make_tar(image_folder, tmp_path / "mini.tar.gz", "mini-set")
    first = load_data(cfg_for(archive, cache, image_size=8), seed=0)
    if archive_route == "in-memory":
        return  # nothing extracted: the test above
    extracted = list((cache / "extracted").iterdir())
    assert len(extracted) == 1
    dest = extracted[0]
    assert (dest / ".complete").is_file() and (dest / "mini-set" / "train" / "ant").is_dir()
    stamps = (dest.stat().st_mtime_ns, (dest / ".complete").stat().st_mtime_ns)

    def no_reextract(*a, **k):
        raise AssertionError("archive extracted a second time")

    monkeypatch.setattr(archive_mod.tarfile, "open", no_reextract)
    second = load_data(cfg_for(archive, cache, image_size=8), seed=0)
    assert second.train.key == first.train.key
    assert list((cache / "extracted").iterdir()) == [dest]
    assert (dest.stat().st_mtime_ns, (dest / ".complete").stat().st_mtime_ns) == stamps


def test_changed_archive_is_read_again(image_folder, tmp_path, archive_route):
    cache = tmp_path / "cache"
    archive = tmp_path / "mini.tar.gz"
    _make_tar(image_folder, archive, "mini-set")
    first = load_data(cfg_for(archive, cache, image_size=8), seed=0)
    write_image(image_folder / "train" / "ant" / "img_0.png", np.zeros((8, 8, 3), np.uint8))
    _make_tar(image_folder, archive, "mini-set")
    second = load_data(cfg_for(archive, cache, image_size=8), seed=0)
    if archive_route == "extracted":
        assert len(list((cache / "extracted").iterdir())) == 2
    assert second.train.key != first.train.key
    assert (second.train.images[0] == 0).all()


def test_corrupt_archive(tmp_path, archive_route):
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(EdgekdError, match=r"^\S*broken\.tar\.gz: cannot (read|extract) archive \("):
        load_data(cfg_for(archive, tmp_path / "cache"), seed=0)
    extracted = tmp_path / "cache" / "extracted"
    assert not extracted.exists() or list(extracted.iterdir()) == []  # no half-extracted folder left behind


@pytest.mark.parametrize("case", ["escape", "absolute", "link", "bomb", "corrupt"])
def test_a_hostile_zip_is_refused_by_name_before_anything_is_inflated(image_folder, tmp_path, archive_route, case):
    archive = _make_zip(image_folder, tmp_path / "set.zip", "set")
    with zipfile.ZipFile(archive, "a", zipfile.ZIP_DEFLATED) as zf:
        if case == "escape":
            zf.writestr("set/train/ant/../../../../evil.png", b"x")
        elif case == "absolute":
            zf.writestr("/etc/evil.png", b"x")
        elif case == "link":
            info = zipfile.ZipInfo("set/train/ant/link.png")
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "img_0.png")
        elif case == "bomb":
            zf.writestr("set/notes.txt", bytes(200 << 20))  # 200 MiB of zeros in ~200 KB
    if case == "corrupt":
        archive.write_bytes(archive.read_bytes()[:-200])  # the central directory cut off
    want = {"escape": r"member '.*evil\.png' points outside the archive", "absolute": r"member '/etc/evil\.png' points outside",
            "link": r"member 'set/train/ant/link\.png' is a symbolic link", "bomb": r"unpacks to more than .* refused as an archive bomb",
            "corrupt": r"cannot (read|extract) archive \("}[case]
    with pytest.raises(EdgekdError, match=r"^\S*set\.zip: " + want):
        load_data(cfg_for(archive, tmp_path / "cache", image_size=8), seed=0)
    assert not (tmp_path / "evil.png").exists() and not Path("/etc/evil.png").exists()
    extracted = tmp_path / "cache" / "extracted"
    assert not extracted.exists() or list(extracted.iterdir()) == []


# ----------------------------------------------------------------------------- selection


def test_stratified_indices_exact_count_and_proportions():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_indices(labels, 10, seed=0)
    assert len(idx) == 10 and len(np.unique(idx)) == 10
    assert np.all(np.diff(idx) > 0)  # sorted
    assert np.bincount(labels[idx], minlength=3).tolist() == [5, 3, 2]


def test_stratified_indices_rounding_gives_exact_total():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_indices(labels, 7, seed=0)  # 3.5, 2.1, 1.4 -> 4, 2, 1
    assert len(idx) == 7
    assert np.bincount(labels[idx], minlength=3).tolist() == [4, 2, 1]
    for n in range(1, 101):
        sel = stratified_indices(labels, n, seed=n)
        counts = np.bincount(labels[sel], minlength=3)
        assert len(sel) == n
        assert np.all(np.abs(counts - np.array([50, 30, 20]) * n / 100) < 1), (n, counts)


def test_stratified_indices_unsorted_labels():
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.array([0] * 40 + [1] * 40 + [2] * 20))
    idx = stratified_indices(labels, 20, seed=3)
    assert np.bincount(labels[idx], minlength=3).tolist() == [8, 8, 4]


def test_stratified_indices_seed_determinism():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    a, b = stratified_indices(labels, 10, seed=42), stratified_indices(labels, 10, seed=42)
    assert np.array_equal(a, b)
    c = stratified_indices(labels, 10, seed=43)
    assert not np.array_equal(a, c)
    assert np.bincount(labels[c], minlength=3).tolist() == [5, 3, 2]


def test_split_sample_covers_every_class_of_a_split_stored_class_by_class():
    labels = torch.arange(4).repeat_interleave(25)  # as ImageFolder stores them: class by class
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 2, 2).contiguous()
    split = Split(images, labels, list("abcd"), key="k")
    part = split.sample(20)
    assert np.bincount(part.labels.numpy(), minlength=4).tolist() == [5, 5, 5, 5]  # the first 20 would be all "a"
    assert (part.images[1:, 0, 0, 0] > part.images[:-1, 0, 0, 0]).all()  # kept in stored order
    assert torch.equal(part.labels, labels[part.images[:, 0, 0, 0].long()])  # pixels and labels stay paired
    assert torch.equal(split.sample(20).images, part.images) and part.key == split.sample(20).key != split.key
    assert split.sample(100) is split and split.sample(None) is split and split.sample(1000) is split


def test_stratified_indices_n_larger_than_data():
    labels = np.array([0, 1, 1, 2])
    assert stratified_indices(labels, 100, seed=0).tolist() == [0, 1, 2, 3]


def test_subset_and_test_subset(image_folder, tmp_path):
    full = load_data(cfg_for(image_folder, image_size=8), seed=0)
    d = load_data(cfg_for(image_folder, image_size=8, subset=6, test_subset=3), seed=0)
    assert len(d.train) == 6 and len(d.test) == 3
    assert np.bincount(d.train.labels.numpy(), minlength=3).tolist() == [3, 2, 1]
    assert np.bincount(d.test.labels.numpy(), minlength=3).tolist() == [1, 1, 1]
    assert set(image_rows(d.train)) <= set(image_rows(full.train))
    assert d.train.key != full.train.key and d.test.key != full.test.key
    assert d.classes == CLASSES


def test_subset_is_seeded(image_folder, tmp_path):
    a = load_data(cfg_for(image_folder, image_size=8, subset=6), seed=0)
    b = load_data(cfg_for(image_folder, image_size=8, subset=6), seed=0)
    assert a.train.key == b.train.key and torch.equal(a.train.images, b.train.images)
    keys = {load_data(cfg_for(image_folder, image_size=8, subset=6), seed=s).train.key for s in range(1, 6)}
    assert len(keys | {a.train.key}) > 1  # other seeds pick other images (and other keys)


def test_val_split(image_folder, tmp_path):
    full = load_data(cfg_for(image_folder, image_size=8), seed=0)
    d = load_data(cfg_for(image_folder, image_size=8, val_split=0.25), seed=0)
    assert d.val is not None
    assert len(d.val) == 3 and len(d.train) == N_TRAIN - 3
    # train and val are disjoint and together are exactly the original train split
    assert sorted(image_rows(d.train) + image_rows(d.val)) == image_rows(full.train)
    assert len(d.test) == N_TEST
    assert d.val.key not in (d.train.key, full.train.key)
    again = load_data(cfg_for(image_folder, image_size=8, val_split=0.25), seed=0)
    assert again.val.key == d.val.key


def test_val_split_after_subset(image_folder, tmp_path):
    d = load_data(cfg_for(image_folder, image_size=8, subset=10, val_split=0.2), seed=0)
    assert len(d.train) + len(d.val) == 10 and len(d.val) == 2


def test_split_select_sorts_and_keys():
    split = Split(torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).view(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1]),
                  ["a", "b", "c"], "base")
    s1 = split.select(np.array([3, 1]), "t")
    assert s1.labels.tolist() == [1, 0]
    assert torch.equal(s1.images[0], split.images[1])
    assert s1.key == split.select(np.array([1, 3]), "t").key
    assert s1.key != split.select(np.array([1, 3]), "other").key
    assert s1.key != split.select(np.array([1, 2]), "t").key


# ----------------------------------------------------------------------------- augmentation


def _batch(b=6, h=8, w=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


def test_augment_none_is_identity():
    x = _batch()
    out, flip = augment_batch(x, "none", torch.Generator().manual_seed(0))
    assert out is x
    assert flip.dtype == torch.bool and flip.shape == (6,) and not flip.any()


def test_augment_flip_mask_matches_flips():
    x = _batch(b=64)
    out, flip = augment_batch(x, "flip", torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert flip.dtype == torch.bool and flip.shape == (64,)
    assert 0 < int(flip.sum()) < 64  # both kinds occur
    assert torch.equal(out[flip], x[flip].flip(-1))
    assert torch.equal(out[~flip], x[~flip])


def test_augment_is_seeded():
    x = _batch(b=16)
    a, fa = augment_batch(x, "crop_flip", torch.Generator().manual_seed(5))
    b, fb = augment_batch(x, "crop_flip", torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(fa, fb)


def test_augment_crop_flip_is_a_padded_crop():
    pad = 2
    x = _batch(b=12, h=8, w=6)
    out, flip = augment_batch(x, "crop_flip", torch.Generator().manual_seed(3), pad=pad)
    assert out.shape == x.shape and out.is_floating_point()
    padded = torch.nn.functional.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    for i in range(len(x)):
        src = out[i].flip(-1) if flip[i] else out[i]
        windows = [padded[i, :, oy:oy + 8, ox:ox + 6] for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)]
        assert any(torch.equal(src, win) for win in windows), i
    assert flip.any() and (~flip).any()


def test_augment_crop_with_zero_pad_is_flip_only():
    x = _batch(b=16)
    out, flip = augment_batch(x, "crop_flip", torch.Generator().manual_seed(2), pad=0)
    expected = torch.where(flip[:, None, None, None], x.flip(-1), x).float()
    assert torch.equal(out, expected)


def test_iterate_covers_every_sample_once():
    split = Split(_batch(b=10), torch.arange(10), ["a"], "k")
    seen, shapes = [], []
    for x, y, idx, flip in iterate(split, 4, shuffle=True, augment="flip", gen=torch.Generator().manual_seed(0)):
        assert torch.equal(y, split.labels[idx])
        assert torch.equal(x, torch.where(flip[:, None, None, None], split.images[idx].flip(-1), split.images[idx]))
        seen += idx.tolist()
        shapes.append(len(idx))
    assert sorted(seen) == list(range(10)) and shapes == [4, 4, 2]


# ----------------------------------------------------------------------------- random-resized crops


def test_resized_crop_boxes_follow_the_sampling_rule():
    g = torch.Generator().manual_seed(0)
    boxes = data_mod.resized_crop_boxes(20000, 48, 64, g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 64).all() and (boxes[:, 3] <= 48).all()
    frac = w * h / (48 * 64)
    assert frac.max() <= 1.0 and frac.min() >= 0.35 * 0.75 - 1e-6  # a clamped side can only shrink the area
    assert 0.6 < frac.mean() < 0.7  # uniform in [0.35, 1], less the few clamped boxes
    unclamped = (w < 64) & (h < 48)
    assert ((w / h)[unclamped] >= 0.75 - 1e-5).all() and ((w / h)[unclamped] <= 4 / 3 + 1e-5).all()


def test_resized_crops_keep_the_batch_shape_and_are_seeded():
    x = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    a, fa = augment_batch(x, "resized_crop_flip", torch.Generator().manual_seed(1))
    b, fb = augment_batch(x, "resized_crop_flip", torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and torch.equal(fa, fb)
    assert 0 <= a.min() and a.max() <= 255 and not torch.allclose(a[0], x[0].float())
    flat = torch.full((2, 3, 64, 64), 77, dtype=torch.uint8)  # a crop of a flat image is the same flat image
    assert torch.allclose(augment_batch(flat, "resized_crop_flip", torch.Generator().manual_seed(0))[0], flat.float(), atol=1e-3)


@pytest.mark.parametrize("size,crop,want", [(32, "auto", "crop_flip"), (64, "auto", "resized_crop_flip"),
                                            (64, "pad", "crop_flip"), (32, "resized", "resized_crop_flip")])
def test_the_crop_is_chosen_by_image_size_unless_set(image_folder, size, crop, want):
    assert load_data(cfg_for(image_folder, image_size=size, crop=crop), seed=0).augment == want
    assert load_data(cfg_for(image_folder, image_size=size, crop=crop, augment="flip"), seed=0).augment == "flip"


@pytest.mark.parametrize("augment", ["none", "flip", "crop_flip", "resized_crop_flip"])
def test_batches_augmented_on_the_device_with_prefetch_are_the_same_batches(augment):
    """The training loop's path (uint8 to the device, crops there, the next batch read ahead in a
    thread) draws the same random numbers in the same order as plain iteration."""
    full = torch.randint(0, 256, (11, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = Split.at_size(full, torch.arange(11) % 3, ["a", "b", "c"], "k", [], 8)
    plain = list(iterate(split, 4, True, augment, torch.Generator().manual_seed(7)))
    ahead = list(iterate(split, 4, True, augment, torch.Generator().manual_seed(7), device=torch.device("cpu"), prefetch=True))
    assert len(plain) == len(ahead) == 3  # 11 = 4 + 4 + 3
    for (x, y, i, f), (x2, y2, i2, f2) in zip(plain, ahead):
        assert x.shape[-2:] == (8, 8) and torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2) and torch.equal(f, f2)


def test_a_failing_read_ahead_reaches_the_caller():
    split = Split(_batch(b=10), torch.arange(10), ["a"], "k")
    split.images = None  # indexing it raises in the read-ahead thread
    with pytest.raises(TypeError):
        list(iterate(split, 4, True, "flip", torch.Generator().manual_seed(0), prefetch=True))


def test_to_device_and_normalize_keep_values_and_make_constants_once():
    """The GPU path's copies (pinned, queued on the stream) must hand over the same values; on a
    CPU they are plain copies. The normalisation constants are built once per device."""
    from edgekd.data import _channel_constants, to_device

    t = torch.randint(0, 255, (7,))
    assert torch.equal(to_device(t, torch.device("cpu")), t)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    assert _channel_constants(mean, std, torch.device("cpu"))[0] is _channel_constants(mean, std, torch.device("cpu"))[0]
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    ref = (x.float() / 255.0 - m) / s
    got = data_mod.Data.normalize(SimpleNamespace(mean=list(mean), std=list(std)), x)  # the method training calls
    assert torch.equal(got, ref)


def test_balanced_sampling_draws_every_class_equally_often_and_uniform_each_image_once():
    """data.sampling: a 9:1 train split. A uniform pass sees each image once; a balanced pass draws
    as many images as the split holds, half of each class (within 4 binomial standard deviations),
    the same draws for the same seed."""
    labels = torch.tensor([0] * 900 + [1] * 100)
    split = Split(torch.zeros(1000, 3, 2, 2, dtype=torch.uint8), labels, ["big", "small"], "k")

    def drawn(sampling, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([idx for _, _, idx, _ in iterate(split, 100, True, gen=gen, sampling=sampling)])

    assert sorted(drawn("uniform").tolist()) == list(range(1000))
    idx = drawn("balanced")
    assert len(idx) == 1000 and abs(int((labels[idx] == 1).sum()) - 500) < 4 * (1000 * 0.25) ** 0.5
    assert torch.equal(idx, drawn("balanced")) and not torch.equal(idx, drawn("balanced", seed=1))
    gen = torch.Generator().manual_seed(0)  # evaluation passes are never resampled
    assert torch.equal(torch.cat([i for _, _, i, _ in iterate(split, 100, gen=gen, sampling="balanced")]), torch.arange(1000))


def test_a_skewed_train_split_trained_uniformly_is_named_with_the_key_that_balances_it():
    from edgekd.data import Data, imbalance

    def data(counts, sampling="uniform"):
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        split = Split(torch.zeros(len(labels), 3, 2, 2, dtype=torch.uint8), labels, ["cat", "dog", "fox"], "k")
        return Data(split, split, None, (0.5,) * 3, (0.5,) * 3, sampling=sampling)

    assert imbalance(data([90, 40, 30])) == ("train classes differ in size: 'cat' has 90 images, 'fox' 30; "
                                             "data.sampling: balanced trains every class equally often")
    assert imbalance(data([89, 40, 30])) is None  # under 3x
    assert imbalance(data([90, 40, 30], "balanced")) is None
