"""Sources: folder and tar layouts, their errors, corrupt records, the optional tfds one."""

import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import CorruptRecordError, ImageFolderSource, TarShardSource, TfdsSource


def records(source):
    return {r["key"]: r for r in (source[i] for i in range(len(source)))}


def test_folder_source_reads_nested_images_in_sorted_order(tmp_path, dataset):
    data = dataset(7)
    source = ImageFolderSource(data.write_folder(tmp_path))
    keys = [source[i]["key"] for i in range(len(source))]
    assert keys == sorted(data.images)
    for key, record in records(source).items():
        assert record["image"].dtype == np.uint8 and record["image"].shape[-1] == 3
        np.testing.assert_array_equal(record["image"], data.images[key])  # PNG is lossless
        assert record["caption"] == f"caption {int(key[-3:])}"  # newline stripped


def test_folder_source_converts_to_rgb_and_ignores_hidden_files(tmp_path, dataset):
    data = dataset(1)
    gray = np.full((8, 8), 77, np.uint8)
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent -> white
    root = data.write_folder(tmp_path)
    Image.fromarray(gray).save(root / "gray.png")
    Image.fromarray(rgba).save(root / "rgba.png")
    (root / "gray.txt").write_text("g")
    (root / "rgba.txt").write_text("r")
    (root / ".hidden.png").write_bytes(b"junk")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"junk")
    got = records(ImageFolderSource(root))
    assert sorted(got) == ["d0/img000", "gray", "rgba"]
    np.testing.assert_array_equal(got["gray"]["image"], np.full((8, 8, 3), 77, np.uint8))
    np.testing.assert_array_equal(got["rgba"]["image"], np.full((8, 8, 3), 255, np.uint8))


def test_folder_missing_caption_error_names_the_file(tmp_path, dataset):
    root = dataset(3).add("d1/nocap", dataset(1).records["d0/img000"][0], caption=None)
    root = root.write_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="nocap.png"):
        ImageFolderSource(root)
    skipping = ImageFolderSource(root, missing_caption="skip")
    assert len(skipping) == 3 and skipping.num_missing_captions == 1
    empty = records(ImageFolderSource(root, missing_caption="empty"))
    assert len(empty) == 4 and empty["d1/nocap"]["caption"] == ""
    with pytest.raises(ValueError, match="missing_caption"):
        ImageFolderSource(root, missing_caption="ignore")


def test_folder_empty_or_missing_raises_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        ImageFolderSource(tmp_path / "empty")


def test_corrupt_and_truncated_images_raise_corrupt_record_error(tmp_path, dataset):
    good = dataset(1).records["d0/img000"][0]
    data = dataset(1).add("bad", b"not an image").add("cut", good[: len(good) // 2])
    source = ImageFolderSource(data.write_folder(tmp_path))
    assert len(source) == 3 and source[2]["key"] == "d0/img000"  # sorted: bad, cut, d0/...
    for i, name in [(0, "bad.png"), (1, "cut.png")]:
        with pytest.raises(CorruptRecordError, match=name):
            source[i]


def test_tar_source_equals_folder_source(tmp_path, dataset):
    data = dataset(10)
    folder = records(ImageFolderSource(data.write_folder(tmp_path / "folder")))
    shards = data.write_shards(tmp_path / "shards", per_shard=4)
    assert len(shards) == 3
    for tar_source in (TarShardSource(str(tmp_path / "shards" / "*.tar")), TarShardSource(shards)):
        tar = records(tar_source)
        assert list(tar) == list(folder)  # same order too
        for key in folder:
            assert tar[key]["caption"] == folder[key]["caption"]
            np.testing.assert_array_equal(tar[key]["image"], folder[key]["image"])


def test_tar_source_errors_name_the_shard(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="nothing-"):
        TarShardSource(str(tmp_path / "nothing-*.tar"))
    good = dataset(1).records["d0/img000"][0]
    data = dataset(2).add("nocap", good, caption=None)
    (shard,) = data.write_shards(tmp_path / "a", per_shard=10)
    with pytest.raises(ValueError, match=rf"{shard}.*nocap"):
        TarShardSource(shard)
    assert TarShardSource(shard, missing_caption="skip").num_missing_captions == 1
    # A shard cut in the middle of a member is refused when indexed.
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(shard.read_bytes()[: len(good) + 700])
    with pytest.raises(ValueError, match="truncated.tar"):
        TarShardSource(truncated)
    # Compressed shards have no seekable members.
    with tarfile.open(tmp_path / "gz.tar.gz", "w:gz") as tar:
        tar.add(shard, arcname="x.tar")
    with pytest.raises(ValueError, match="gz.tar.gz"):
        TarShardSource(tmp_path / "gz.tar.gz")


def test_tar_corrupt_member_names_shard_and_key(tmp_path, dataset):
    (shard,) = dataset(2).add("bad", b"\x89PNG garbage").write_shards(tmp_path, per_shard=10)
    source = TarShardSource(shard)
    assert len(source) == 3 and source[1]["key"] == "d0/img000"  # sorted: bad, d0/..., d1/...
    with pytest.raises(CorruptRecordError, match=rf"{shard}:bad"):
        source[0]


def test_tfds_source_without_tfds_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        TfdsSource("coco_captions", split="train")
