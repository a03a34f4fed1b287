"""kdiff.data: packers round-trip exactly (fixtures written here by independent writers), the HDF5 layout, the
Dataset's scaling / padding / resizing / flips, DataLoader workers, and clear errors for bad files and arguments."""

import gzip
import pickle
import struct
import tarfile

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from kdiff import data
from kdiff.data import H5Dataset, hash_uniform, pack, read_h5, read_info, uint8_from_x, write_h5, x_from_uint8


def rand_u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# --------------------------------------------------------------------------------------------- IDX


def write_idx(path, array, *, type_code=0x08, big_endian_dtype=">u1", gz=False):
    """IDX as LeCun's MNIST page describes it: 0, 0, type, ndim, big-endian uint32 dims, big-endian values."""
    raw = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += np.asarray(array).astype(big_endian_dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_round_trip_both_splits(tmp_path, gz):
    src = tmp_path / "mnist"
    src.mkdir()
    ext = ".gz" if gz else ""
    train_x, test_x = rand_u8((7, 5, 6), 1), rand_u8((3, 5, 6), 2)
    train_y, test_y = np.array([0, 3, 9, 1, 1, 2, 5]), np.array([4, 0, 9])
    write_idx(src / f"train-images-idx3-ubyte{ext}", train_x, gz=gz)
    write_idx(src / f"train-labels-idx1-ubyte{ext}", train_y, gz=gz)
    write_idx(src / f"t10k-images-idx3-ubyte{ext}", test_x, gz=gz)
    write_idx(src / f"t10k-labels-idx1-ubyte{ext}", test_y, gz=gz)
    assert data.guess_format(src) == "idx"
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        out = pack(src, tmp_path / f"{split}.h5", split=split)
        images, labels, info = read_h5(out)
        np.testing.assert_array_equal(images, x[..., None])
        np.testing.assert_array_equal(labels, y)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        assert info.split == split and info.class_names == tuple(str(k) for k in range(10))
        assert "idx" in info.source


def test_idx_single_file_and_fashion_names(tmp_path):
    src = tmp_path / "fashion-mnist"
    src.mkdir()
    x, y = rand_u8((4, 28, 28), 3), np.array([9, 0, 0, 3])
    images_file = write_idx(src / "t10k-images-idx3-ubyte.gz", x, gz=True)
    write_idx(src / "t10k-labels-idx1-ubyte", y)  # labels found plain or gzipped
    out = pack(images_file, tmp_path / "f.h5", split="test")
    images, labels, info = read_h5(out)
    np.testing.assert_array_equal(images[..., 0], x)
    np.testing.assert_array_equal(labels, y)
    assert info.class_names == data.FASHION_MNIST_CLASSES and info.class_names[9] == "Ankle boot"


def test_read_idx_other_types(tmp_path):
    a = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    path = write_idx(tmp_path / "a", a, type_code=0x0C, big_endian_dtype=">i4")
    np.testing.assert_array_equal(data.read_idx(path), a)
    b = np.linspace(-1, 1, 5, dtype=np.float32)
    path = write_idx(tmp_path / "b", b, type_code=0x0D, big_endian_dtype=">f4")
    np.testing.assert_array_equal(data.read_idx(path), b)


def test_idx_errors(tmp_path):
    good = write_idx(tmp_path / "x-images-idx3-ubyte", rand_u8((2, 3, 3)))
    (tmp_path / "short").write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "text")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(good.read_bytes())[:-10])
    with pytest.raises(ValueError, match="gzip"):
        data.read_idx(tmp_path / "bad.gz")
    with pytest.raises(FileNotFoundError, match="labels"):
        data.pack_idx(good)  # no labels file next to it
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        data.pack_idx(tmp_path, split="test")


# --------------------------------------------------------------------------------------------- CIFAR


def cifar_row(img):
    """One CIFAR row: the 1024 red values (row-major), then the green, then the blue (Krizhevsky 2009)."""
    return np.concatenate([img[..., 0].ravel(), img[..., 1].ravel(), img[..., 2].ravel()])


def dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(folder, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = rand_u8((3, 32, 32, 3), seed + i), rng.integers(0, 10, 3).tolist()
        dump(folder / f"data_batch_{i}", {b"batch_label": b"x", b"labels": y,
                                           b"data": np.stack([cifar_row(im) for im in x])})
        train_x.append(x)
        train_y += y
    test_x, test_y = rand_u8((4, 32, 32, 3), seed + 9), [3, 1, 0, 9]
    dump(folder / "test_batch", {b"labels": test_y, b"data": np.stack([cifar_row(im) for im in test_x])})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return np.concatenate(train_x), np.array(train_y), test_x, np.array(test_y)


def test_cifar10_folder_and_tar_round_trip(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    train_x, train_y, test_x, test_y = write_cifar10(folder)
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    for source in (folder, tmp_path, tar_path):
        assert data.guess_format(source) == "cifar"
        for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            images, labels, info = read_h5(pack(source, tmp_path / "out.h5", split=split))
            np.testing.assert_array_equal(images, x)
            np.testing.assert_array_equal(labels, y)
            assert info.class_names[3] == "cat" and len(info.class_names) == 10


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = rand_u8((5, 32, 32, 3), 7)
    fine, coarse = [0, 99, 42, 7, 7], [0, 19, 3, 1, 1]
    dump(folder / "train", {b"fine_labels": fine, b"coarse_labels": coarse,
                            b"data": np.stack([cifar_row(im) for im in x])})
    dump(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                           b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    images, labels, info = read_h5(pack(folder, tmp_path / "c100.h5", format="cifar"))
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, fine)
    assert len(info.class_names) == 100 and info.class_names[42] == "c42"


def test_cifar_pickle_with_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    dump(folder / "test_batch", {b"data": print})  # a pickle that references a callable
    with pytest.raises(ValueError, match="refusing to load"):
        data.pack_cifar(folder, split="test")
    with pytest.raises(ValueError, match="data_batch_1"):
        (folder / "data_batch_1").unlink()
        data.pack_cifar(folder, split="train")


# --------------------------------------------------------------------------------------------- folders


def test_folder_round_trip_sorted_classes_and_files(tmp_path):
    root = tmp_path / "imgs"
    expected, labels = [], []
    for k, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for j, name in enumerate(["a.png", "b.png", "c.png"]):
            x = rand_u8((6, 5, 3), 10 * k + j)
            Image.fromarray(x).save(root / cls / name)
            expected.append(x)
            labels.append(k)
    (root / "dog" / "notes.txt").write_text("not an image")
    Image.fromarray(expected[3]).save(root / "dog" / "a.png")  # rewrite, same content: order stays by name
    assert data.guess_format(root) == "folder"
    images, got_labels, info = read_h5(pack(root, tmp_path / "f.h5"))
    np.testing.assert_array_equal(images, np.stack(expected))
    np.testing.assert_array_equal(got_labels, labels)
    assert info.class_names == ("cat", "dog")


def test_folder_grayscale_and_mixed(tmp_path):
    gray = tmp_path / "gray"
    gray.mkdir()
    g = [rand_u8((4, 7), s) for s in range(3)]
    for i, x in enumerate(g):
        Image.fromarray(x, mode="L").save(gray / f"{i}.png")
    images, labels, info = read_h5(pack(gray, tmp_path / "g.h5"))
    np.testing.assert_array_equal(images[..., 0], np.stack(g))
    assert images.shape[-1] == 1 and info.class_names == () and (labels == 0).all()
    rgb = rand_u8((4, 7, 3), 9)
    Image.fromarray(rgb).save(gray / "3.png")  # one colour image: everything becomes RGB
    images, _, _ = read_h5(pack(gray, tmp_path / "m.h5"))
    assert images.shape == (4, 4, 7, 3)
    np.testing.assert_array_equal(images[0], np.repeat(g[0][..., None], 3, axis=-1))
    np.testing.assert_array_equal(images[3], rgb)


def test_folder_errors(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.fromarray(rand_u8((4, 4, 3))).save(root / "a" / "0.png")
    Image.fromarray(rand_u8((5, 4, 3))).save(root / "a" / "1.png")
    with pytest.raises(ValueError, match="1.png"):
        pack(root, tmp_path / "x.h5", format="folder")
    (root / "a" / "1.png").unlink()
    Image.fromarray(rand_u8((4, 4, 3))).save(root / "loose.png")
    with pytest.raises(ValueError, match="loose"):
        pack(root, tmp_path / "x.h5", format="folder")
    (root / "a" / "0.png").write_bytes(b"broken")
    (root / "loose.png").unlink()
    with pytest.raises(ValueError, match="cannot read image"):
        pack(root, tmp_path / "x.h5", format="folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.pack_folder(tmp_path / "empty")


# --------------------------------------------------------------------------------------------- arrays, digits


def test_npz_and_npy_layouts(tmp_path):
    x = rand_u8((5, 6, 4, 3), 4)
    y = np.array([2, 0, 1, 2, 2])
    np.savez(tmp_path / "nhwc.npz", images=x, labels=y, class_names=np.array(["a", "b", "c"]))
    images, labels, info = read_h5(pack(tmp_path / "nhwc.npz", tmp_path / "a.h5"))
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)
    assert info.class_names == ("a", "b", "c")
    np.savez(tmp_path / "nchw.npz", x=x.transpose(0, 3, 1, 2), y=y.astype(np.int32))
    images, labels, info = read_h5(pack(tmp_path / "nchw.npz", tmp_path / "b.h5"))
    np.testing.assert_array_equal(images, x)
    assert info.class_names == ("0", "1", "2")
    np.save(tmp_path / "gray.npy", x[..., 0])
    images, labels, info = read_h5(pack(tmp_path / "gray.npy", tmp_path / "c.h5", split="test"))
    np.testing.assert_array_equal(images, x[..., :1])
    assert (labels == 0).all() and info.class_names == () and info.split == "test"


def test_array_errors(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        write_h5(tmp_path / "a.h5", np.zeros((2, 4, 4), np.float32), split="train", source="t")
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        write_h5(tmp_path / "a.h5", np.full((2, 4, 4), 300, np.int16), split="train", source="t")
    with pytest.raises(ValueError, match="channels"):
        write_h5(tmp_path / "a.h5", np.zeros((2, 4, 4, 2), np.uint8), split="train", source="t")
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        write_h5(tmp_path / "a.h5", np.zeros((2, 4, 4), np.uint8), np.zeros(3, np.int64), split="train", source="t")
    with pytest.raises(ValueError, match="labels < 2"):
        write_h5(tmp_path / "a.h5", np.zeros((2, 4, 4), np.uint8), np.array([0, 2]), split="train", source="t",
                 class_names=["a", "b"])
    with pytest.raises(ValueError, match="split"):
        write_h5(tmp_path / "a.h5", np.zeros((2, 4, 4), np.uint8), split="val", source="t")
    np.savez(tmp_path / "other.npz", z=np.zeros(3))
    with pytest.raises(ValueError, match="'images'"):
        pack(tmp_path / "other.npz", tmp_path / "a.h5")
    assert not list(tmp_path.glob("*.h5")) and not list(tmp_path.glob(".*.tmp"))


def test_digits_match_sklearn(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    train = read_h5(pack("digits", tmp_path / "train.h5"))
    test = read_h5(pack("digits", tmp_path / "test.h5", split="test"))
    assert len(train[0]) + len(test[0]) == len(d.images) and len(test[0]) == data.DIGITS_TEST_SIZE
    u = np.concatenate([train[0], test[0]])[..., 0].astype(np.float64)
    v = d.images
    assert np.abs(u - v * 255 / 16).max() <= 0.5  # u is the nearest integer to 255 v / 16 ...
    assert u[v == 0].max() == 0 and u[v == 16].min() == 255  # ... with 0 -> 0 and 16 -> 255
    np.testing.assert_array_equal(np.concatenate([train[1], test[1]]), d.target)
    assert np.bincount(test[1]).min() >= 30  # every class in the test split
    assert "load_digits" in train[2].source and train[2].class_names == tuple("0123456789")


# --------------------------------------------------------------------------------------------- writing, reading


def test_write_is_atomic(tmp_path):
    out = write_h5(tmp_path / "d.h5", rand_u8((3, 4, 4)), split="train", source="first")

    def failing_chunks():
        yield rand_u8((2, 4, 4, 1)), np.zeros(2, np.int64)
        raise RuntimeError("source died")

    broken = data.Packed(4, (4, 4, 1), failing_chunks(), (), "second")
    with pytest.raises(RuntimeError, match="source died"):
        data.write_packed(out, broken, split="train")
    assert read_info(out).source == "first"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]  # and no temporary file is left


def test_layout_on_disk(tmp_path):
    x, y = rand_u8((5, 3, 4, 3)), np.arange(5)
    out = write_h5(tmp_path / "d.h5", x, y, split="test", source="unit", class_names=list("abcde"))
    with h5py.File(out, "r") as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (5, 3, 4, 3) and f["images"].fletcher32
        assert f["labels"].dtype == np.int64
        assert f.attrs["source"] == "unit" and f.attrs["split"] == "test" and f.attrs["layout"] == 1
        assert list(f.attrs["class_names"]) == list("abcde")
    it = list(data.iter_h5(out, batch_size=2))
    assert [len(b[0]) for b in it] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in it]), x)


def chunk_offset(path):
    with h5py.File(path, "r") as f:
        info = f["images"].id.get_chunk_info(0)
        return info.byte_offset, info.size


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file .*missing.h5"):
        H5Dataset(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="folder"):
        read_info(tmp_path)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        H5Dataset(tmp_path / "text.h5")
    good = write_h5(tmp_path / "good.h5", rand_u8((40, 16, 16, 3)), split="train", source="t")
    raw = good.read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        H5Dataset(tmp_path / "cut.h5")
    offset, size = chunk_offset(good)
    bad = bytearray(raw)
    bad[offset + size // 2] ^= 0xFF
    (tmp_path / "flip.h5").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="checksum"):
        read_h5(tmp_path / "flip.h5")
    lazy = H5Dataset(tmp_path / "flip.h5", in_memory=False)  # metadata is fine: the damage shows on reading
    with pytest.raises(ValueError, match="checksum"):
        lazy[0]
    with h5py.File(tmp_path / "nolabels.h5", "w") as f:
        f["images"] = rand_u8((2, 4, 4, 1))
    with pytest.raises(ValueError, match=r"missing dataset\(s\) \['labels'\]"):
        H5Dataset(tmp_path / "nolabels.h5")
    with h5py.File(tmp_path / "float.h5", "w") as f:
        f["images"] = np.zeros((2, 4, 4, 1), np.float32)
        f["labels"] = np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="'images' uint8"):
        H5Dataset(tmp_path / "float.h5")


# --------------------------------------------------------------------------------------------- the Dataset


@pytest.fixture
def gray_file(tmp_path):
    x = rand_u8((9, 28, 28, 1), 5)
    return write_h5(tmp_path / "g.h5", x, np.arange(9) % 3, split="train", source="t", class_names="abc"), x


def test_scaling_layout_and_labels(gray_file, tmp_path):
    path, x = gray_file
    ds = H5Dataset(path)
    assert len(ds) == 9 and ds.num_classes == 3 and ds.class_names == ("a", "b", "c")
    img, label = ds[4]
    assert img.dtype == torch.float32 and img.shape == (1, 28, 28) and label == 1
    np.testing.assert_allclose(img[0].double().numpy(), x[4, ..., 0].astype(np.float64) / 127.5 - 1, atol=1e-7)
    rgb = rand_u8((2, 3, 5, 3), 6)
    img, _ = H5Dataset(write_h5(tmp_path / "rgb.h5", rgb, split="train", source="t"))[-1]
    np.testing.assert_allclose(img.permute(1, 2, 0).double().numpy(), rgb[1] / 127.5 - 1, atol=1e-7)
    with pytest.raises(IndexError):
        ds[9]


def test_uint8_round_trip_and_clamp():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = x_from_uint8(u)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(uint8_from_x(x), u)
    assert torch.equal(uint8_from_x(torch.tensor([-1.7, 1.2, 0.0])), torch.tensor([0, 255, 128], dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        x_from_uint8(u.float())


def test_pad_with_background(gray_file):
    path, x = gray_file
    img, _ = H5Dataset(path, size=32)[0]
    assert img.shape == (1, 32, 32)
    np.testing.assert_allclose(img[0, 2:30, 2:30].double().numpy(), x[0, ..., 0] / 127.5 - 1, atol=1e-7)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (img[0][border] == -1).all()
    odd = data.pad_to(torch.zeros(1, 27, 26), 32)
    assert odd.shape == (1, 32, 32)
    assert (odd[0, 2:29, 3:29] == 0).all() and odd.eq(0).sum() == 27 * 26  # top 2 / bottom 3, left 3 / right 3


def test_resize_matches_pil(tmp_path):
    x = rand_u8((1, 24, 30, 1), 8)
    img, _ = H5Dataset(write_h5(tmp_path / "r.h5", x, split="train", source="t"), size=16, fit="resize")[0]
    crop = x[0, :, 3:27, 0].astype(np.float32) / 127.5 - 1  # centre square 24 x 24
    pil = np.asarray(Image.fromarray(crop, mode="F").resize((16, 16), resample=Image.BILINEAR))
    np.testing.assert_allclose(img[0].numpy(), pil, atol=1e-5)


def test_flip_frequency_and_determinism():
    p, n = 0.3, 20_000
    u = np.array([hash_uniform(7, 0, i) for i in range(n)])
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs((u < p).sum() - p * n) < 5 * np.sqrt(n * p * (1 - p))  # binomial, 5 standard deviations
    v = np.array([hash_uniform(7, 1, i) for i in range(n)])
    assert abs(((u < 0.5) == (v < 0.5)).mean() - 0.5) < 5 * 0.5 / np.sqrt(n)  # epochs are independent draws
    assert hash_uniform(7, 0, 11) == u[11]


def test_flip_in_dataset(gray_file):
    path, _ = gray_file
    plain = H5Dataset(path, size=32)
    never, always = H5Dataset(path, size=32, flip_p=0.0), H5Dataset(path, size=32, flip_p=1.0)
    half = H5Dataset(path, size=32, flip_p=0.5, seed=3)
    flipped = 0
    for i in range(len(plain)):
        x = plain[i][0]
        assert torch.equal(never[i][0], x) and torch.equal(always[i][0], x.flip(-1))
        y = half[i][0]
        is_flipped = hash_uniform(3, 0, i) < 0.5
        assert torch.equal(y, x.flip(-1) if is_flipped else x)
        flipped += is_flipped
    assert 0 < flipped < len(plain)
    half.set_epoch(1)
    assert any(not torch.equal(half[i][0], H5Dataset(path, size=32, flip_p=0.5, seed=3)[i][0]) for i in range(9))


def test_batched_and_lazy_reads_agree(gray_file):
    path, _ = gray_file
    mem = H5Dataset(path, size=32, flip_p=0.5)
    lazy = H5Dataset(path, size=32, flip_p=0.5, in_memory=False)
    assert mem.in_memory and not lazy.in_memory and lazy._file is None  # nothing opened in __init__
    idx = [8, 0, 3, 3, -1]
    for (a, la), (b, lb), (c, lc) in zip(mem.__getitems__(idx), lazy.__getitems__(idx), [mem[i] for i in idx]):
        assert torch.equal(a, b) and torch.equal(a, c) and la == lb == lc
    parent_handle = lazy._file
    lazy._pid = -1  # as seen from a forked DataLoader worker: the inherited handle belongs to another process
    lazy[0]
    assert lazy._file is not parent_handle and not pickle.loads(pickle.dumps(lazy))._file


def test_dataloader_workers_match_single_process(gray_file):
    path, _ = gray_file
    ds = H5Dataset(path, size=32, flip_p=0.5, in_memory=False)
    ds[0]  # the parent opens its handle: workers must not reuse it

    def batches(workers):
        return [b for b in DataLoader(ds, batch_size=4, num_workers=workers)]

    ref, par = batches(0), batches(2)
    assert len(ref) == len(par) == 3
    for (x0, y0), (x1, y1) in zip(ref, par):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_dataset_argument_errors(gray_file):
    path, _ = gray_file
    with pytest.raises(ValueError, match="size: expected >= the image size"):
        H5Dataset(path, size=16)
    with pytest.raises(ValueError, match="size: expected an int >= 1"):
        H5Dataset(path, size=0, fit="resize")
    with pytest.raises(ValueError, match="fit"):
        H5Dataset(path, size=32, fit="crop")
    with pytest.raises(ValueError, match="flip_p"):
        H5Dataset(path, flip_p=1.5)
    with pytest.raises(ValueError, match="epoch"):
        H5Dataset(path).set_epoch(-1)


@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 8))
def test_pad_to_property(h, w, extra):
    size = max(h, w) + extra
    x = torch.rand(2, h, w)
    y = data.pad_to(x, size)
    top, left = (size - h) // 2, (size - w) // 2
    assert y.shape == (2, size, size)
    assert torch.equal(y[:, top:top + h, left:left + w], x)
    assert y.sum() == pytest.approx(x.sum().item() - (size * size - h * w) * 2, rel=1e-5, abs=1e-3)


# --------------------------------------------------------------------------------------------- command line


def test_cli_pack_and_info(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", images=rand_u8((3, 4, 4, 3)), labels=np.array([1, 0, 1]))
    assert data.main(["pack", str(tmp_path / "a.npz"), "--out", str(tmp_path / "a.h5"), "--split", "test",
                      "--class-names", "no,yes"]) == 0
    assert "3 images 4x4x3" in capsys.readouterr().out
    assert read_info(tmp_path / "a.h5").class_names == ("no", "yes")
    assert data.main(["info", str(tmp_path / "a.h5")]) == 0
    assert "split 'test'" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        data.main(["pack", str(tmp_path / "nothing"), "--out", str(tmp_path / "b.h5")])
    assert e.value.code == 2 and "no such file or folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- hardening


def test_sixteen_bit_grey_png_keeps_its_levels(tmp_path):
    """64 grey levels in a 16-bit PNG pack to 64 levels, round(v / 257), not to {0, 255}."""
    folder = tmp_path / "wide"
    folder.mkdir()
    v = (np.arange(64, dtype=np.int64) * 1040).reshape(8, 8)  # 0 .. 65520
    Image.fromarray(v.astype(np.uint16)).save(folder / "a.png")
    images, _, _ = read_h5(pack(folder, tmp_path / "w.h5", format="folder"))
    expected = np.floor(v / 257.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(images[0, ..., 0], expected)
    assert len(np.unique(images)) == 64


def _class_folders(root, names, per_class=1):
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rand_u8((4, 4), seed=10 * k + i)).save(root / name / f"{i}.png")


def test_folder_class_names_must_match_the_folders(tmp_path):
    _class_folders(tmp_path / "src", ["cat", "dog"])
    with pytest.raises(ValueError, match=r"^class_names: expected 2 names"):
        pack(tmp_path / "src", tmp_path / "o.h5", format="folder", class_names=["a"])
    with pytest.raises(SystemExit):
        data.main(["pack", str(tmp_path / "src"), "--out", str(tmp_path / "o.h5"), "--class-names", "a"])


def test_folder_with_an_empty_class_folder_is_an_error(tmp_path):
    _class_folders(tmp_path / "src", ["a", "c"])
    (tmp_path / "src" / "b").mkdir()
    with pytest.raises(ValueError, match=r"^source: class folder\(s\) \['b'\].*hold no images"):
        pack(tmp_path / "src", tmp_path / "o.h5", format="folder")


def test_dataset_rejects_labels_outside_the_class_names(tmp_path):
    with h5py.File(tmp_path / "bad.h5", "w") as f:  # written around the packers, which refuse such labels
        f["images"] = rand_u8((3, 4, 4, 1))
        f["labels"] = np.array([0, 1, 2], dtype=np.int64)
        f.attrs.create("class_names", data=["a", "b"], dtype=h5py.string_dtype())
    with pytest.raises(ValueError, match=r"^path: .*labels in \[0, 2\], expected \[0, 1\]"):
        H5Dataset(tmp_path / "bad.h5")
    with pytest.raises(ValueError, match=r"^labels: expected labels >= 0, got min -1"):
        write_h5(tmp_path / "neg.h5", rand_u8((2, 4, 4)), np.array([-1, 1]), split="train", source="t")


def test_dataset_index_must_be_an_int(tmp_path):
    ds = H5Dataset(write_h5(tmp_path / "d.h5", rand_u8((3, 4, 4)), split="train", source="t"))
    with pytest.raises(TypeError, match=r"^index: expected an int, got float"):
        ds[1.5]
    assert torch.equal(ds[np.int64(1)][0], ds[1][0])


def test_python_dash_m_kdiff_data_runs(tmp_path):
    import os
    import subprocess
    import sys

    out = write_h5(tmp_path / "d.h5", rand_u8((3, 4, 4)), split="train", source="t")
    run = subprocess.run([sys.executable, "-m", "kdiff.data", "info", str(out)], capture_output=True, text=True,
                         env=dict(os.environ))
    assert run.returncode == 0 and "3 images 4x4x1" in run.stdout
