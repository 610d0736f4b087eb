"""TFDS image data sets read by random access (``tfds`` data sources, no TensorFlow).

``digits`` is embedded (built from scikit-learn's bundled copy on first use, ~2 s, offline);
``mnist``, ``cifar10``, ``celeb_a`` and ``imagenet256`` (from TFDS ``imagenet2012``) must be prepared beforehand by TFDS in the
``array_record`` format. Before anything calls into TFDS we look for the prepared files
ourselves: offline, TFDS's own lookup retries DNS for minutes before failing.
"""

from __future__ import annotations

import glob
import os
from typing import Callable, NamedTuple, Optional

import numpy as np

from diffjax.data.spec import DatasetSpec, default_data_dir

CELEBA_CROP = 140  # central crop of the 218x178 CelebA images before resizing (Song et al. 2021)
CELEBA_SIZE = 64
IMAGENET_SIZE = 256  # ImageNet 256x256 (ADM, LDM, DiT)


def center_crop_resize(image, crop: int = CELEBA_CROP, size: int = CELEBA_SIZE) -> np.ndarray:
    """Central ``crop`` x ``crop`` square, resized to ``size`` x ``size`` (PIL bicubic), uint8."""
    from PIL import Image  # noqa: PLC0415

    image = np.asarray(image)
    h, w = image.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    square = Image.fromarray(image[top:top + crop, left:left + crop])
    return np.asarray(square.resize((size, size), Image.BICUBIC), np.uint8)


def center_square_resize(image, size: int = IMAGENET_SIZE) -> np.ndarray:
    """The central min(H, W) square, resized to ``size`` x ``size`` (PIL bicubic), uint8: ADM's
    ``center_crop_arr`` framing (ADM resizes before cropping, with a box filter down to 2 x size first)."""
    image = np.asarray(image)
    return center_crop_resize(image, crop=min(image.shape[:2]), size=size)


class TfdsImages(NamedTuple):
    """A TFDS image data set: its spec, TFDS name, feature keys and a per-image preprocessing."""

    spec: DatasetSpec
    tfds_name: str
    label_key: Optional[str]  # None: unconditional, labels are zeros
    preprocess: Optional[Callable] = None  # uint8 image -> uint8 image of spec.shape
    embedded: bool = False  # built by diffjax itself (offline) on first use


IMAGE_DATASETS = {
    "digits": TfdsImages(DatasetSpec((8, 8, 1), 10, 8, "image"), "digits", "label", embedded=True),
    "mnist": TfdsImages(DatasetSpec((28, 28, 1), 10, 8, "image"), "mnist", "label"),
    "cifar10": TfdsImages(DatasetSpec((32, 32, 3), 10, 8, "image"), "cifar10", "label"),
    "celeb_a": TfdsImages(DatasetSpec((CELEBA_SIZE, CELEBA_SIZE, 3), None, 8, "image"), "celeb_a",
                          None, center_crop_resize),
    "imagenet256": TfdsImages(DatasetSpec((IMAGENET_SIZE, IMAGENET_SIZE, 3), 1000, 8, "image"), "imagenet2012",
                              "label", center_square_resize),
}


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS data set is not prepared (as array_record) in any of the data dirs searched."""


def search_dirs(data_dir: Optional[str] = None) -> list[str]:
    """Data dirs searched for a prepared TFDS set: ``data_dir`` alone if given, else diffjax's
    default dir and then TFDS's ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    if data_dir is not None:
        return [default_data_dir(data_dir)]
    tfds_default = os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
    return list(dict.fromkeys([default_data_dir(), tfds_default]))


def _version_key(path: str):
    """Sort key of a version dir ``.../1.2.3``; () for anything else."""
    parts = os.path.basename(path).split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()


def find_prepared(tfds_name: str, data_dir: str) -> tuple[Optional[str], list[str]]:
    """The newest ``<data_dir>/<name>[/<config>]/<version>`` holding array_record files (or None),
    and the prepared version dirs found without them (e.g. built as tfrecord)."""
    infos = glob.glob(os.path.join(data_dir, tfds_name, "*", "dataset_info.json"))
    infos += glob.glob(os.path.join(data_dir, tfds_name, "*", "*", "dataset_info.json"))
    dirs = [os.path.dirname(p) for p in infos]
    # only finished builds: TFDS writes into "incomplete.*" dirs and renames them when done
    dirs = sorted((d for d in dirs if _version_key(d)), key=_version_key, reverse=True)
    with_records = [d for d in dirs if glob.glob(os.path.join(d, f"{tfds_name}-*.array_record*"))]
    return (with_records[0] if with_records else None), [d for d in dirs if d not in with_records]


def _not_prepared_message(name: str, dirs: list[str], other_formats: list[str]) -> str:
    found = (f" Found {', '.join(other_formats)} without array_record files: tfds.data_source "
             "reads only array_record, so rebuild with --file_format=array_record."
             if other_formats else "")
    return (
        f"Data set '{name}' is not prepared in {' or '.join(dirs)} (looked for "
        f"{name}/<version>/dataset_info.json with {name}-*.array_record* files).{found} "
        "diffjax reads TFDS data sets by random access without TensorFlow, so TFDS must build them "
        "beforehand, in the array_record format. Where internet and TensorFlow are available run\n"
        f"    tfds build {name} --data_dir {dirs[0]} --file_format=array_record\n"
        f"(on another machine, copy its {name}/ folder into {dirs[0]} here afterwards), or point "
        "data_dir= / $DIFFJAX_DATA_DIR at a dir that has it. Offline, use the embedded data set "
        "instead: --config.data.dataset=digits."
    )


def _build_digits(data_dir: str) -> str:
    """Build the embedded ``digits`` set into ``data_dir`` unless it is there; its version dir."""
    from diffjax.data.digits import Builder  # noqa: PLC0415 (imports tensorflow_datasets)

    builder = Builder(data_dir=data_dir)
    try:
        builder.download_and_prepare()  # a no-op when already prepared
    except OSError:
        # processes building at once: TFDS renames each one's finished build into place, and
        # every rename but the first fails; the winner's build is as good as ours
        if find_prepared(builder.name, data_dir)[0] is None:
            raise
    return os.fspath(builder.data_path)


def prepare(name: str, data_dir: Optional[str] = None) -> str:
    """The prepared version dir of image set ``name``: builds ``digits``, fails fast for others."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"{name!r} is not a TFDS image data set (toy sets need no preparation); "
                         f"image data sets: {', '.join(sorted(IMAGE_DATASETS))}")
    entry = IMAGE_DATASETS[name]
    if entry.embedded:
        found, _ = find_prepared(entry.tfds_name, default_data_dir(data_dir))
        return found or _build_digits(default_data_dir(data_dir))
    dirs, other_formats = search_dirs(data_dir), []
    for d in dirs:
        found, others = find_prepared(entry.tfds_name, d)
        if found:
            return found
        other_formats += others
    raise DatasetNotPreparedError(_not_prepared_message(entry.tfds_name, dirs, other_formats))


def open_split(name: str, split: str, data_dir: Optional[str] = None):
    """A random-access ``tfds`` data source over ``split`` of image set ``name`` (no TensorFlow)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    path = prepare(name, data_dir)
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
        raise ValueError(f"data set '{name}' in {path} has no split {split!r}; "
                         f"it has {sorted(builder.info.splits.keys())}")
    return builder.as_data_source(split)


def decode(entry: TfdsImages, example) -> dict:
    """A TFDS example -> {"image": uint8 (*spec.shape), "label": int32} (label 0 if unlabelled)."""
    image = example["image"]
    if entry.preprocess is not None:
        image = entry.preprocess(image)
    image = np.asarray(image, np.uint8)
    if image.shape != entry.spec.shape:
        raise ValueError(f"data set '{entry.tfds_name}': expected images of shape {entry.spec.shape}, "
                         f"got {image.shape}")
    label = example[entry.label_key] if entry.label_key else 0
    return {"image": image, "label": np.int32(label)}
