"""Data sets as decoded, resized uint8 arrays in memory, with an on-disk cache.

Every image goes through :func:`edgemeta.runtime.preprocess.to_uint8` (the device's
own decoder, and the exported model's own resize graph) once; the result is cached as
``.npz`` so later runs start in seconds. Training then only normalizes (the same
arithmetic as the runtime), so a model meets on the device the very arrays it trained on.

Sources: Omniglot (official archives or extracted folders; downloaded and
checksum-verified when missing and online), any image folder (``root/<class>/*``,
as a folder or a zip), Tiny-ImageNet (an image folder with ``words.txt``), and
scikit-learn's bundled digits.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgemeta.runtime.errors import DataError, InputError
from edgemeta.runtime.preprocess import decode, to_pixels, to_uint8
from edgemeta.runtime.spec import PreprocessSpec

__all__ = [
    "ImageSet",
    "data_dir",
    "cache_dir",
    "load_omniglot",
    "omniglot_splits",
    "load_image_folder",
    "load_tiny_imagenet",
    "load_digits",
    "load_dataset",
    "load_for_model",
    "novel_images",
    "base_images",
    "recorded_dataset",
    "base_classes",
    "novel_classes",
    "folder_classes",
    "ClassSplit",
    "split_classes",
    "NOVEL_MIN",
    "recorded_split",
    "NAMED",
    "NOVEL_SPLITS",
    "is_data_name",
    "IMAGE_EXTENSIONS",
    "native_images",
    "NativeReader",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip"
# Upstream checksums (the archives of github.com/brendenlake/omniglot)
OMNIGLOT_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
# 2: photos turned by their EXIF orientation, transparency flattened onto white;
# 3: resized by the pixels graph's resize instead of Pillow's
_CACHE_VERSION = 3


@dataclass
class ImageSet:
    """Images of one split: ``images`` uint8 [N, H, W, C], ``labels`` int64 [N] into ``classes``.

    ``groups`` optionally names a super-class per class (an Omniglot alphabet);
    ``paths`` optionally gives the source of each image (for episode files): a member of
    ``source``, the folder or zip archive the images were decoded from, when there is one.
    ``native`` holds images made in memory as they were before resizing (the digits), so
    that :func:`native_images` can give them back at their own size as files are.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str
    spec: PreprocessSpec
    groups: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    source: str = ""
    native: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        h.update(json.dumps(self.classes).encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        h.update(hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).digest())
        return h.hexdigest()[:16]

    def select_classes(self, keep: Sequence[int], name: str | None = None) -> ImageSet:
        """The subset holding only classes ``keep`` (relabelled 0..len(keep)-1, in that order)."""
        keep = list(keep)
        remap = np.full(self.num_classes, -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        mask = remap[self.labels] >= 0
        return ImageSet(
            images=self.images[mask],
            labels=remap[self.labels[mask]],
            classes=[self.classes[i] for i in keep],
            name=name or self.name,
            spec=self.spec,
            groups=[self.groups[i] for i in keep] if self.groups else [],
            paths=[p for p, m in zip(self.paths, mask) if m] if self.paths else [],
            source=self.source,
            native=self.native[mask] if self.native is not None else None,
        )

    def drop_classes(self, names: Iterable[str], name: str | None = None) -> ImageSet:
        """The subset without the classes named in ``names`` (the others keep their order)."""
        drop = set(names)
        return self.select_classes([i for i, c in enumerate(self.classes) if c not in drop], name)

    def with_rotations(self, angles: Iterable[int] = (90, 180, 270)) -> ImageSet:
        """Add each rotation of every class as a new class (Snell et al.'s Omniglot protocol)."""
        angles = [a for a in angles if a % 360]
        if not angles:
            return self
        if any(a % 90 for a in angles):
            raise InputError(f"rotations must be multiples of 90 degrees, got {angles}")
        if self.spec.size[0] != self.spec.size[1]:
            raise InputError("rotations need square images")
        images, labels, classes = [self.images], [self.labels], list(self.classes)
        for j, a in enumerate(angles, start=1):
            images.append(np.rot90(self.images, k=a // 90, axes=(1, 2)))
            labels.append(self.labels + j * self.num_classes)
            classes += [f"{c}@rot{a}" for c in self.classes]
        return ImageSet(
            images=np.ascontiguousarray(np.concatenate(images)),
            labels=np.concatenate(labels),
            classes=classes,
            name=self.name,
            spec=self.spec,
            groups=self.groups * (len(angles) + 1) if self.groups else [],
        )

    def check_episode_size(self, n_way: int, per_class: int) -> None:
        """Raise a clear DataError when an N-way episode of ``per_class`` images cannot be drawn."""
        if n_way > self.num_classes:
            raise DataError(
                f"{self.name} has {self.num_classes} classes, fewer than the {n_way}-way episodes asked; "
                f"lower --n-way to at most {self.num_classes}"
            )
        counts = np.bincount(self.labels, minlength=self.num_classes)
        enough = int((counts >= per_class).sum())
        if enough < n_way:
            raise DataError(
                f"{self.name}: only {enough} classes have at least {per_class} images (K shots + Q queries), "
                f"{n_way} needed; lower --k-shot/--queries or --n-way (smallest class has {int(counts.min())})"
            )


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder: the explicit option, else ``$EDGEMETA_DATA_DIR``, else ``~/.cache/edgemeta/data``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("EDGEMETA_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "edgemeta" / "data"


def cache_dir() -> Path:
    """Where decoded arrays are cached: ``$EDGEMETA_CACHE_DIR`` or ``~/.cache/edgemeta``."""
    env = os.environ.get("EDGEMETA_CACHE_DIR")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "edgemeta"
    return path


def _cached(key: dict, build: Callable[[], ImageSet], spec: PreprocessSpec) -> ImageSet:
    """Load ``build()``'s result from the cache under ``key``, or build and store it."""
    digest = hashlib.sha256(
        json.dumps({**key, "v": _CACHE_VERSION, "spec": spec.to_dict()}, sort_keys=True).encode()
    ).hexdigest()[:20]
    path = cache_dir() / f"{key.get('name', 'data')}-{digest}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                return ImageSet(
                    z["images"],
                    z["labels"],
                    meta["classes"],
                    meta["name"],
                    spec,
                    meta["groups"],
                    meta["paths"],
                    # the key's source, never the file's own: a cache file can be edited, and what
                    # native_images reads is checked against the folder the key was made for
                    source=key.get("source", ""),
                )
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    ds = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        meta = {"classes": ds.classes, "name": ds.name, "groups": ds.groups, "paths": ds.paths, "source": ds.source}
        np.savez(tmp, images=ds.images, labels=ds.labels, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs speed
    return ds


def _progress(items: Sequence, description: str):
    """A rich progress bar over ``items`` when writing to a terminal, else the items."""
    import sys

    if not sys.stderr.isatty() or len(items) < 200:
        return items
    from rich.progress import track

    return track(items, description=description, console=None, transient=True)


def _decode_members(
    open_member: Callable[[str], bytes], members: list[tuple[str, int]], spec: PreprocessSpec, what: str
):
    images = np.empty((len(members), spec.size[0], spec.size[1], spec.channels), dtype=np.uint8)
    for i, (member, _) in enumerate(_progress(members, f"decoding {what}")):
        try:
            images[i] = to_uint8(decode(io.BytesIO(open_member(member))), spec)
        except InputError as e:
            raise DataError(f"{what}: cannot decode {member}: {e}; remove or replace that file") from None
    return images


# ---------------------------------------------------------------- image trees


def _open_tree(root: Path) -> tuple[Callable[[str], bytes], zipfile.ZipFile | None]:
    """(reader of a member by its relative path, the zip archive or None) of a folder or zip archive."""
    if root.is_dir():

        def read_file(m: str) -> bytes:
            try:
                return (root / m).read_bytes()
            except OSError as e:
                raise DataError(f"{root}: cannot read {m} ({e.strerror or e}); restore the file") from None

        return read_file, None
    if not root.is_file():
        raise DataError(f"image folder or archive not found: {root}; check the path or --data-dir")
    try:
        zf = zipfile.ZipFile(root)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{root} is not a readable zip archive ({e}); re-download or re-copy it") from None

    def read(m: str) -> bytes:
        try:
            return zf.read(m)
        except KeyError:
            raise DataError(f"{root} has no member {m}; the archive changed since it was read: load it again") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(f"{root}: member {m} is corrupt ({e}); re-download or re-copy the archive") from None

    return read, zf


def _list_tree(root: str | os.PathLike) -> tuple[Callable[[str], bytes], list[str], str]:
    """List image files of a folder or zip archive: (reader, relative paths, source description)."""
    root = Path(root)
    read, zf = _open_tree(root)
    if zf is None:
        files = sorted(
            str(p.relative_to(root)).replace(os.sep, "/")
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
    else:
        try:
            files = sorted(
                n for n in zf.namelist() if not n.endswith("/") and Path(n).suffix.lower() in IMAGE_EXTENSIONS
            )
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{root} is not a readable zip archive ({e}); re-download or re-copy it") from None
    return read, files, str(root)


def _member_error(ds: ImageSet, member: str) -> DataError:
    return DataError(
        f"{ds.name}: recorded file name {member!r} is not inside {ds.source}; delete the cache folder "
        f"{cache_dir()} and load the data again"
    )


class NativeReader:
    """Reads images of ``ds`` at their own size (see :func:`native_images`), with its folder or zip
    archive opened once for the whole session rather than per call; close it (or use ``with``).

    File names come from the loader or its cache, so each is checked before it is read: a
    relative path with no ``..`` part that stays inside the folder, or a member of the archive.
    """

    def __init__(self, ds: ImageSet) -> None:
        self.ds = ds
        self._read: Callable[[str], bytes] | None = None
        self._zip: zipfile.ZipFile | None = None
        self._root: Path | None = None
        self._members: set[str] = set()

    @property
    def available(self) -> bool:
        """Whether the images can be given: made in memory, or every one from a recorded source."""
        return self.ds.native is not None or (bool(self.ds.source) and len(self.ds.paths) == len(self.ds))

    def _open(self) -> Callable[[str], bytes]:
        if self._read is None:
            root = Path(self.ds.source)
            self._read, self._zip = _open_tree(root)
            if self._zip is not None:
                self._members = set(self._zip.namelist())
            else:
                self._root = Path(os.path.abspath(root))
        return self._read

    def _check(self, member: str) -> None:
        parts = member.split("/")
        if (
            not member
            or member.startswith("/")
            or "\\" in member
            or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise _member_error(self.ds, member)
        if self._zip is not None:
            if member not in self._members:
                raise _member_error(self.ds, member)
        elif not Path(os.path.normpath(self._root / member)).is_relative_to(self._root):
            # lexical, not resolved: links inside the data folder are its owner's, and were read when loading
            raise _member_error(self.ds, member)

    def __call__(self, indices: Sequence[int] | np.ndarray) -> list[np.ndarray] | None:
        indices = np.asarray(indices, dtype=np.int64)
        ds = self.ds
        if ds.native is not None:
            return [np.ascontiguousarray(ds.native[i]) for i in indices]
        if not self.available:
            return None
        read = self._open()
        out = []
        for i in indices:
            member = ds.paths[i]
            self._check(member)
            try:
                out.append(to_pixels(decode(io.BytesIO(read(member))), ds.spec))
            except InputError as e:
                raise DataError(f"{ds.name}: cannot decode {member}: {e}; remove or replace that file") from None
        return out

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        self._read, self._zip, self._root, self._members = None, None, None, set()

    def __enter__(self) -> NativeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def native_images(ds: ImageSet, indices: Sequence[int] | np.ndarray) -> list[np.ndarray] | None:
    """The images ``indices`` of ``ds`` at their own size, as an app decodes them for a model's
    ``pixels`` input (:func:`edgemeta.runtime.preprocess.to_pixels`: EXIF orientation, the
    runtime's mode rules, uint8 [H, W, C]); only those files are read. None when ``ds`` cannot
    give them: images made in memory, or a set whose sources are not recorded (rotated classes).
    Many calls on one set: use a :class:`NativeReader`, which opens a zip archive once.

    Raises:
        DataError: a source file is gone, cannot be decoded any more, or its recorded name
            points outside the folder or archive.
    """
    with NativeReader(ds) as reader:
        return reader(indices)


def _strip_common_root(paths: list[str]) -> tuple[list[str], str]:
    """Drop a single top-level folder shared by all paths (``tiny-imagenet/<class>/x.jpg``)."""
    prefix = ""
    while paths and all("/" in p for p in paths):
        heads = {p.split("/", 1)[0] for p in paths}
        if len(heads) != 1 or all(p.count("/") < 2 for p in paths):
            break
        head = heads.pop()
        prefix += head + "/"
        paths = [p.split("/", 1)[1] for p in paths]
    return paths, prefix


def load_image_folder(
    root: str | os.PathLike,
    spec: PreprocessSpec,
    classes: Sequence[str] | None = None,
    name: str | None = None,
    min_images: int = 1,
) -> ImageSet:
    """Load ``root/<class>/<image>`` (a folder or a zip) into memory, decoded and resized.

    Args:
        root: a folder or a ``.zip`` with one sub-folder per class (a single shared
            top-level folder inside a zip is skipped).
        spec: the preprocessing (size, colour) to decode with.
        classes: the classes to load, in this order; default all, sorted by name.
        min_images: classes with fewer images are an error (an empty class folder is always one).
    """
    read, files, source = _list_tree(root)
    rel, prefix = _strip_common_root(files)
    by_class: dict[str, list[str]] = {}
    for full, r in zip(files, rel):
        if "/" not in r:
            continue  # images directly under root belong to no class
        by_class.setdefault(r.split("/", 1)[0], []).append(full)
    if Path(root).is_dir():  # empty class folders exist only on disk
        base = Path(root) / prefix
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            if d.name not in by_class and not d.name.startswith("."):
                raise DataError(
                    f"class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it"
                )
    if not by_class:
        raise DataError(
            f"{source} holds no class folders with images; expected root/<class>/<image>{IMAGE_EXTENSIONS[0]}"
        )
    wanted = list(classes) if classes is not None else sorted(by_class)
    missing = [c for c in wanted if c not in by_class]
    if missing:
        raise DataError(
            f"{source}: no images for class(es) {', '.join(missing[:5])}; check the class list or the folder"
        )
    small = [c for c in wanted if len(by_class[c]) < min_images]
    if small:
        raise DataError(f"{source}: class {small[0]} has {len(by_class[small[0]])} image(s), {min_images} needed")
    members = [(m, k) for k, c in enumerate(wanted) for m in sorted(by_class[c])]
    ident = {"name": name or Path(root).stem, "source": str(Path(root).resolve()), "classes": wanted}
    if Path(root).is_file():
        st = Path(root).stat()
        ident.update(size=st.st_size, mtime=st.st_mtime_ns)
    else:
        # each file's size and mtime too, so an image edited in place is decoded again
        listing = []
        for m, _ in members:
            try:
                st = (Path(root) / m).stat()
            except OSError as e:
                raise DataError(f"{root}: cannot read {m} ({e.strerror or e}); restore the file") from None
            listing.append(f"{m}\t{st.st_size}\t{st.st_mtime_ns}")
        ident.update(files=hashlib.sha256("\n".join(listing).encode()).hexdigest())

    def build() -> ImageSet:
        images = _decode_members(read, members, spec, ident["name"])
        labels = np.array([k for _, k in members], dtype=np.int64)
        paths = [m for m, _ in members]
        return ImageSet(images, labels, wanted, ident["name"], spec, [], paths, source=ident["source"])

    return _cached(ident, build, spec)


# ---------------------------------------------------------------- Omniglot


def _fetch_omniglot(name: str, dest: Path) -> Path:
    """Download ``name``.zip from the upstream repository and verify its MD5."""
    import urllib.request

    url = OMNIGLOT_URL.format(name=name)
    target = dest / f"{name}.zip"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=30) as r:
            payload = r.read()
    except OSError as e:
        raise DataError(
            f"Omniglot archive {name}.zip not found in {dest} and the download failed ({e}); put "
            f"images_background.zip and images_evaluation.zip in {dest} (or pass --data-dir / set EDGEMETA_DATA_DIR)"
        ) from None
    md5 = hashlib.md5(payload).hexdigest()
    if md5 != OMNIGLOT_MD5[name]:
        raise DataError(f"downloaded {name}.zip has MD5 {md5}, expected {OMNIGLOT_MD5[name]}; retry the download")
    tmp = target.with_suffix(".part")
    tmp.write_bytes(payload)
    os.replace(tmp, target)
    return target


def _find_omniglot(name: str, root: Path, download: bool) -> Path:
    for base in (root / "omniglot", root):
        for candidate in (base / f"{name}.zip", base / name):
            if candidate.exists():
                return candidate
    if not download:
        raise DataError(
            f"Omniglot {name} not found under {root}; put {name}.zip in {root / 'omniglot'} "
            "(or pass --data-dir / set EDGEMETA_DATA_DIR), or allow the download"
        )
    return _fetch_omniglot(name, root / "omniglot")


def load_omniglot(
    split: str = "background",
    root: str | os.PathLike | None = None,
    size: int = 28,
    download: bool = True,
) -> ImageSet:
    """Omniglot ``background`` or ``evaluation``, every character a class ("Alphabet/characterNN").

    Args:
        split: ``background`` (964 characters, for training) or ``evaluation`` (659, for testing).
        root: the data folder (see :func:`data_dir`); archives or extracted folders are found
            in ``root/omniglot`` or ``root``.
        size: side of the square images (28 as in Snell et al.).
        download: fetch the official archives when missing (MD5-verified).
    """
    if split not in ("background", "evaluation"):
        raise InputError(f"unknown Omniglot split {split!r}; use 'background' or 'evaluation'")
    name = f"images_{split}"
    source = _find_omniglot(name, data_dir(root), download)
    spec = omniglot_spec(size)
    read, files, _ = _list_tree(source)
    rel, _ = (
        _strip_common_root(files)
        if source.is_dir()
        else ([f.split("/", 1)[1] if f.startswith(name + "/") else f for f in files], "")
    )
    chars = sorted({"/".join(r.split("/")[:2]) for r in rel if r.count("/") >= 2})
    if not chars:
        raise DataError(
            f"{source} holds no Omniglot characters (expected {name}/<Alphabet>/<characterNN>/*.png); re-copy it"
        )
    index = {c: i for i, c in enumerate(chars)}
    members = sorted((f, index["/".join(r.split("/")[:2])]) for f, r in zip(files, rel) if r.count("/") >= 2)
    st = source.stat()
    ident = {
        "name": f"omniglot-{split}",
        "source": str(source.resolve()),
        "size_bytes": st.st_size,
        "mtime": st.st_mtime_ns,
        "n": len(members),
    }

    def build() -> ImageSet:
        images = _decode_members(read, members, spec, f"Omniglot {split}")
        labels = np.array([k for _, k in members], dtype=np.int64)
        groups = [c.split("/")[0] for c in chars]
        paths = [m for m, _ in members]
        return ImageSet(images, labels, chars, f"omniglot-{split}", spec, groups, paths, source=ident["source"])

    return _cached(ident, build, spec)


def omniglot_spec(size: int = 28) -> PreprocessSpec:
    # Mean and std of Omniglot background pixels at 28x28 (white paper, black ink).
    return PreprocessSpec.create(size, 1, mean=0.9211, std=0.2166)


def omniglot_splits(
    root: str | os.PathLike | None = None,
    size: int = 28,
    val_alphabets: int = 3,
    rotations: bool = True,
    download: bool = True,
) -> tuple[ImageSet, ImageSet]:
    """Snell et al.'s training data: background alphabets minus ``val_alphabets`` held out
    (the last ones by name) for validation; rotations by 90/180/270 added as classes."""
    bg = load_omniglot("background", root, size, download)
    alphabets = sorted(set(bg.groups))
    if not 0 <= val_alphabets < len(alphabets):
        raise InputError(f"val_alphabets must be between 0 and {len(alphabets) - 1}, got {val_alphabets}")
    held = set(alphabets[len(alphabets) - val_alphabets :]) if val_alphabets else set()
    train = bg.select_classes([i for i, g in enumerate(bg.groups) if g not in held], "omniglot-train")
    val = bg.select_classes([i for i, g in enumerate(bg.groups) if g in held], "omniglot-val")
    if rotations:
        train = train.with_rotations()
    return train, val


# ---------------------------------------------------------------- Tiny-ImageNet, digits

TINY_IMAGENET_ZIP = "tiny-imagenet-200-100shot.zip"
TINY_SPLITS = {"train": (0, 120), "val": (120, 150), "test": (150, 200)}


def _tiny_source(root: Path) -> Path:
    for cand in (root / "tiny-imagenet" / TINY_IMAGENET_ZIP, root / TINY_IMAGENET_ZIP, root / "tiny-imagenet", root):
        if cand.is_file() or (cand.is_dir() and (cand / "words.txt").is_file()):
            return cand
    raise DataError(
        f"Tiny-ImageNet not found under {root}; put {TINY_IMAGENET_ZIP} in {root / 'tiny-imagenet'} or pass --data-dir"
    )


def load_tiny_imagenet(split: str, root: str | os.PathLike | None = None, size: int = 64) -> ImageSet:
    """Tiny-ImageNet 120/30/50: classes by line order of ``words.txt`` (train 0-119, val 120-149, test 150-199)."""
    if split not in TINY_SPLITS:
        raise InputError(f"unknown Tiny-ImageNet split {split!r}; use one of {', '.join(TINY_SPLITS)}")
    source = _tiny_source(data_dir(root))
    if source.is_file():
        with zipfile.ZipFile(source) as zf:
            words = next((n for n in zf.namelist() if n.endswith("words.txt")), None)
            if words is None:
                raise DataError(f"{source} has no words.txt; re-copy the archive")
            lines = zf.read(words).decode().splitlines()
    else:
        lines = (source / "words.txt").read_text().splitlines()
    wnids = [ln.split("\t")[0].strip() for ln in lines if ln.strip()]
    lo, hi = TINY_SPLITS[split]
    spec = PreprocessSpec.create(size, 3, mean=(0.480, 0.448, 0.398), std=(0.277, 0.269, 0.282))
    return load_image_folder(source, spec, classes=wnids[lo:hi], name=f"tiny-imagenet-{split}")


def load_digits(spec: PreprocessSpec, invert: bool = True) -> ImageSet:
    """scikit-learn's bundled handwritten digits (8x8, 10 classes), as images at ``spec``'s size.

    ``invert`` draws dark ink on white paper, as Omniglot does.
    """
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError("the digits set needs scikit-learn: pip install 'edgemeta[train]'") from None
    d = sk_digits()
    raw = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    if invert:
        raw = 255 - raw
    if spec.channels == 3:
        raw = np.repeat(raw[..., None], 3, axis=-1)
    images = np.stack([to_uint8(im, spec) for im in raw])
    classes = [str(i) for i in range(10)]
    native = raw if raw.ndim == 4 else raw[..., None]  # as to_uint8 took them: 8x8 before resizing
    return ImageSet(images, d.target.astype(np.int64), classes, "sklearn-digits", spec, native=native)


def load_dataset(name: str, split: str, root: str | os.PathLike | None, spec: PreprocessSpec | None = None) -> ImageSet:
    """Named data sets for the CLI: ``omniglot``, ``tiny-imagenet``, ``digits``, or a folder/zip path."""
    if name == "omniglot":
        size = spec.size[0] if spec else 28
        if split in ("train", "val"):
            return omniglot_splits(root, size)[0 if split == "train" else 1]
        if split == "test":
            split = "evaluation"
        return load_omniglot(split, root, size)
    if name == "tiny-imagenet":
        return load_tiny_imagenet(split, root, spec.size[0] if spec else 64)
    if name == "digits":
        return load_digits(spec or omniglot_spec())
    path = Path(name)
    if path.exists():
        if spec is None:
            raise InputError(f"loading the image folder {path} needs the preprocessing (--size, --channels)")
        return load_image_folder(path, spec)
    raise InputError(
        f"unknown data set {name!r}; use omniglot, tiny-imagenet, digits, or a folder/zip of class folders"
    )


NAMED = ("omniglot", "tiny-imagenet", "digits")
# the named sets with a split of classes that edgemeta's training never uses (its novel classes)
NOVEL_SPLITS = {"omniglot": "evaluation", "tiny-imagenet": "test"}


def is_data_name(name: str) -> bool:
    """Whether ``name`` names data :func:`load_for_model` can load: a named set, or an existing folder or zip."""
    return name in NAMED or (bool(name) and Path(name).exists())


def _square(preprocess: PreprocessSpec, what: str, option: str) -> int:
    h, w = preprocess.size
    if h != w:
        raise InputError(f"{what} images are square; the model takes {h}x{w}: pass {option} with a folder of images")
    return h


def _match_channels(ds: ImageSet, preprocess: PreprocessSpec, option: str) -> ImageSet:
    if ds.images.shape[-1] == preprocess.channels:
        return ds
    if ds.images.shape[-1] == 1 and preprocess.channels == 3:  # PIL's L -> RGB repeats the grey value
        ds.images = np.repeat(ds.images, 3, axis=-1)
        ds.spec = preprocess
        return ds
    raise InputError(
        f"{ds.name} has colour images but the model takes "
        f"{preprocess.channels} channel(s); pass {option} with matching images"
    )


def load_for_model(
    dataset: str, split: str, preprocess: PreprocessSpec, data_dir: str | os.PathLike | None, option: str = "--data"
) -> ImageSet:
    """A split of a named data set (or a folder of class folders), at the model's size and
    channels (grey images are repeated for an RGB model). ``option``: the command-line option
    that names the data, for the errors' fix."""
    if dataset == "omniglot":
        ds = load_omniglot(split, data_dir, _square(preprocess, "Omniglot", option))
    elif dataset == "tiny-imagenet":
        ds = load_tiny_imagenet(split, data_dir, _square(preprocess, "Tiny-ImageNet", option))
    elif dataset == "digits":
        ds = load_digits(preprocess)
    else:
        ds = load_image_folder(Path(dataset), preprocess)
    ds = _match_channels(ds, preprocess, option)
    # the arrays are the model's size and channels; their normalization must be the model's
    # too (a data set's default differs from a pretrained backbone's): export verification
    # and int8 calibration normalize with ``ds.spec``
    ds.spec = replace(ds.spec, mean=preprocess.mean, std=preprocess.std)
    return ds


def novel_images(
    dataset: str | None,
    preprocess: PreprocessSpec,
    data_dir: str | os.PathLike | None = None,
    option: str = "--data",
    split: ClassSplit | None = None,
) -> ImageSet:
    """Images of classes the model was not trained on: Omniglot evaluation, Tiny-ImageNet test,
    the digits, or a folder of class folders. ``split``: the class split recorded in the checkpoint
    of a model trained on a folder or on ``digits`` (the sets without a novel split of their own);
    the classes it names as base or validation classes are left out, by name, whatever the data,
    so they are never counted as novel."""
    if not dataset:
        raise InputError(
            f"no verification data: the checkpoint records none; pass {option} omniglot|tiny-imagenet|FOLDER"
        )
    split_name = NOVEL_SPLITS.get(dataset, "")
    if not is_data_name(dataset):
        raise InputError(
            f"unknown data set {dataset!r}; use omniglot, tiny-imagenet, "
            f"digits, or a folder of class folders ({option})"
        )
    ds = load_for_model(dataset, split_name, preprocess, data_dir, option)
    if split is None:
        return ds
    return novel_classes(ds, split, f"pass {option} with a folder of classes the model never saw")


def novel_classes(ds: ImageSet, split: ClassSplit, fix: str) -> ImageSet:
    """``ds`` without the classes that trained or validated the model (by name, in any folder);
    ``fix``: what the error says to do when fewer than two classes are left."""
    novel = ds.drop_classes(split.seen, ds.name + "-novel")
    if novel.num_classes < 2:
        raise DataError(
            f"{ds.name}: {ds.num_classes - novel.num_classes} of its {ds.num_classes} classes trained the "
            f"model (base or validation classes recorded in its checkpoint), {novel.num_classes} left; {fix}"
        )
    return novel


def base_classes(ds: ImageSet, split: ClassSplit | None) -> ImageSet:
    """``ds`` without the classes ``split`` holds out as novel (for int8 calibration, which must never see them)."""
    if split is None:
        return ds
    base = ds.drop_classes(split.novel, ds.name + "-base")
    if base.num_classes == 0:
        raise DataError(
            f"{ds.name}: every class is a novel class of the model "
            "(held out in training); pass images of its base classes"
        )
    return base


def base_images(
    dataset: str | None,
    preprocess: PreprocessSpec,
    data_dir: str | os.PathLike | None = None,
    split: ClassSplit | None = None,
) -> ImageSet:
    """Images of training (base) classes for int8 calibration: Omniglot background,
    Tiny-ImageNet train, or a folder given explicitly, or ``digits`` for a model whose recorded
    ``split`` names its base classes (without the novel classes ``split`` holds out, whatever the
    data). Never the evaluation classes, so the reported int8 accuracy is not inflated by
    calibrating on the test set."""
    if dataset in ("omniglot", "tiny-imagenet"):
        named = load_for_model(
            dataset,
            "background" if dataset == "omniglot" else "train",
            preprocess,
            data_dir,
            option="--calibration-data",
        )
        return base_classes(named, split)
    # digits has no base split of its own: only a split recorded by training on it names one
    if (dataset == "digits" and split is not None) or (dataset and dataset not in NAMED and Path(dataset).exists()):
        return base_classes(load_for_model(dataset, "", preprocess, data_dir, option="--calibration-data"), split)
    raise InputError(
        f"int8 calibration needs images of the training classes, and {dataset or 'this model'} "
        "has no known base split; pass --calibration-data FOLDER (never the evaluation classes)"
    )


def recorded_dataset(info: dict) -> str | None:
    """The data set a checkpoint was trained on (from its training config, ``Checkpoint.info``), if recorded."""
    name = (info.get("config") or {}).get("dataset")
    return str(name) if name else None


def recorded_split(info: dict) -> ClassSplit | None:
    """The class split of the image folder a checkpoint was trained on, if recorded."""
    return ClassSplit.from_dict(info.get("class_split"))


# ---------------------------------------------------------------- class splits of image folders

# novel classes held out of a folder: verification and evaluation draw 5-way episodes from them
NOVEL_MIN = 5


@dataclass(frozen=True)
class ClassSplit:
    """How training divided the classes of an image folder: ``base`` classes trained the model,
    ``val`` classes chose its best weights, ``novel`` classes were held out for verification,
    calibration checks and evaluation. Recorded in the checkpoint (``info["class_split"]``) and in
    the exported model's metadata."""

    base: tuple[str, ...]
    val: tuple[str, ...]
    novel: tuple[str, ...]
    seed: int = 0

    @property
    def seen(self) -> frozenset[str]:
        """The classes training saw (base and validation)."""
        return frozenset(self.base) | frozenset(self.val)

    def to_dict(self) -> dict:
        return {"base": list(self.base), "val": list(self.val), "novel": list(self.novel), "seed": self.seed}

    @classmethod
    def from_dict(cls, doc: object) -> ClassSplit | None:
        """The split a checkpoint or model records, or None when it records none (named data sets)."""
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("base", "val", "novel")):
            return None
        return cls(
            tuple(map(str, doc["base"])),
            tuple(map(str, doc["val"])),
            tuple(map(str, doc["novel"])),
            int(doc.get("seed", 0)),
        )


def folder_classes(root: str | os.PathLike) -> list[str]:
    """The class names of an image folder or zip, sorted, without decoding any image."""
    _, files, source = _list_tree(root)
    rel, _ = _strip_common_root(files)
    classes = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    if not classes:
        raise DataError(
            f"{source} holds no class folders with images; expected root/<class>/<image>{IMAGE_EXTENSIONS[0]}"
        )
    return classes


def split_classes(
    classes: Sequence[str], n_way: int, val_n_way: int, seed: int = 0, name: str = "the folder"
) -> ClassSplit:
    """Divide a folder's classes (seeded) into base, validation and novel classes: a fifth each for
    validation and novel where there are enough classes, never fewer than ``val_n_way`` and
    :data:`NOVEL_MIN`, and never so many that fewer than ``n_way`` base classes are left.

    Raises InputError naming the minimum number of classes and the fix that helps."""
    n = len(classes)
    need = n_way + val_n_way + NOVEL_MIN
    if n < need:
        floor = 2 + 2 + NOVEL_MIN  # 2-way training and validation episodes
        if n >= 2 + val_n_way + NOVEL_MIN:
            fix = f"lower --n-way to at most {n - val_n_way - NOVEL_MIN}, or add class folders"
        elif n >= floor:
            fix = f"lower --n-way and --val-n-way so that they add up to at most {n - NOVEL_MIN}, or add class folders"
        else:
            fix = f"add class folders: training on a folder needs at least {floor} classes (2-way episodes)"
        raise InputError(
            f"{name} has {n} classes; training {n_way}-way on it needs at least {need}: {n_way} "
            f"base classes (--n-way), {val_n_way} held out for validation (--val-n-way) and "
            f"{NOVEL_MIN} held out as novel classes for verification and evaluation; {fix}"
        )
    spare = n - need
    n_val = val_n_way + min(max(n // 5 - val_n_way, 0), spare // 2)
    n_novel = NOVEL_MIN + min(max(n // 5 - NOVEL_MIN, 0), spare - (n_val - val_n_way))
    perm = np.random.default_rng(seed).permutation(n)
    pick = lambda idx: tuple(sorted(classes[i] for i in idx))  # noqa: E731
    return ClassSplit(pick(perm[n_novel + n_val :]), pick(perm[n_novel : n_novel + n_val]), pick(perm[:n_novel]), seed)
