"""Dataset loading: everything comes from local files, nothing is ever downloaded.

All loaders end in the same preparation so that models see the same kind of input whatever the
source: images as float32 NCHW, resized (bilinear) to ``image_size``, adapted to ``in_channels``
and normalised per channel with the *training* split's mean and std; labels as int64.
"""

from __future__ import annotations

import importlib
import inspect
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

ACCEPTED_SPECS = "accepted: 'digits', 'npz:PATH', 'torchvision:NAME[:ROOT]'"
NPZ_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")


def load_dataset(
    spec: str, root: str | None, image_size: int, in_channels: int
) -> tuple[TensorDataset, TensorDataset, int]:
    """Load ``(train, test, num_classes)`` for a dataset spec.

    - ``digits``: scikit-learn's bundled 8x8 digits (shipped with the package, so it works
      offline and in CI), stratified 75/25 split with a fixed seed;
    - ``npz:PATH``: a local .npz holding x_train, y_train, x_test, y_test (images NCHW, NHW or
      NHWC, uint8 scaled by 1/255 or float kept as is; labels integers from 0);
    - ``torchvision:NAME[:ROOT]``: a torchvision dataset already on disk under ROOT (``root``
      when the spec gives none), opened with download=False.
    """
    if image_size < 1 or in_channels < 1:
        raise ValueError(f"image_size and in_channels must be >= 1, got {image_size} and {in_channels}")
    kind, _, rest = spec.strip().partition(":")
    num_classes: int | None = None
    if kind == "digits" and not rest:
        x_train, y_train, x_test, y_test = _digits()
    elif kind == "npz" and rest:
        x_train, y_train, x_test, y_test = _npz(rest)
    elif kind == "torchvision" and rest:
        name, _, tv_root = rest.partition(":")
        x_train, y_train, x_test, y_test, num_classes = _torchvision(name, tv_root or root)
    else:
        raise ValueError(f"unknown dataset {spec!r}; {ACCEPTED_SPECS}")
    train_x = _prepare_images(x_train, image_size, in_channels, "train")
    test_x = _prepare_images(x_test, image_size, in_channels, "test")
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    train_y = _prepare_labels(y_train, len(train_x), "train")
    test_y = _prepare_labels(y_test, len(test_x), "test")
    max_label = int(max(train_y.max(), test_y.max()))
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise ValueError(f"dataset {spec!r} has label {max_label} but only {num_classes} classes")
    train = TensorDataset((train_x - mean) / std, train_y)
    test = TensorDataset((test_x - mean) / std, test_y)
    return train, test, num_classes


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test


def _npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz dataset {path!r} not found")
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise ValueError(
                f"npz dataset {path!r} lacks arrays {missing}; it must hold {', '.join(NPZ_KEYS)}"
            )
        return tuple(archive[key] for key in NPZ_KEYS)  # type: ignore[return-value]


def _torchvision(
    name: str, root: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int | None]:
    """Read a torchvision dataset's raw arrays (and its class count, when it lists classes)."""
    if not name:
        raise ValueError(f"torchvision dataset needs a name; {ACCEPTED_SPECS}")
    if not root:
        raise ValueError(
            f"torchvision dataset {name!r} needs a root: 'torchvision:{name}:ROOT' or a data root"
        )
    try:
        datasets = importlib.import_module("torchvision.datasets")
    except ImportError as exc:
        raise ImportError(
            f"torchvision is not installed, so 'torchvision:{name}' cannot be loaded; "
            "install torchvision or export the data to an .npz and use 'npz:PATH'"
        ) from exc
    cls = getattr(datasets, name, None)
    if not inspect.isclass(cls):
        raise ValueError(f"torchvision.datasets has no dataset class {name!r}")
    params = inspect.signature(cls).parameters
    splits = []
    for train in (True, False):
        if "train" in params:
            kwargs: dict[str, object] = {"train": train}
        elif "split" in params:
            kwargs = {"split": "train" if train else "test"}
        else:
            raise ValueError(f"torchvision dataset {name!r} has neither a 'train' nor a 'split' argument")
        try:
            splits.append(cls(root, download=False, **kwargs))
        except (RuntimeError, FileNotFoundError) as exc:
            raise FileNotFoundError(
                f"torchvision dataset {name!r} not found under {root!r} (downloads are disabled; "
                f"put the files there first): {exc}"
            ) from exc
    arrays = []
    for ds in splits:
        labels = getattr(ds, "targets", getattr(ds, "labels", None))
        if not hasattr(ds, "data") or labels is None:
            raise ValueError(
                f"torchvision dataset {name!r} does not expose .data and .targets/.labels; "
                "export it to an .npz and use 'npz:PATH'"
            )
        arrays += [np.asarray(ds.data), np.asarray(labels)]
    classes = getattr(splits[0], "classes", None)
    return arrays[0], arrays[1], arrays[2], arrays[3], len(classes) if classes else None


def _prepare_images(x: np.ndarray, image_size: int, in_channels: int, split: str) -> torch.Tensor:
    """Turn images of any accepted layout into float32 NCHW of the requested size and channels."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"{split} images must be a non-empty NHW, NCHW or NHWC array, got shape {x.shape}")
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) * scale
    if images.shape[-2:] != (image_size, image_size):
        shrinking = min(images.shape[-2:]) > image_size
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrinking
        )
    channels = images.shape[1]
    if channels == in_channels:
        return images.contiguous()
    if channels == 1:
        return images.expand(-1, in_channels, -1, -1).contiguous()
    if in_channels == 1:
        return images.mean(dim=1, keepdim=True)
    raise ValueError(f"{split} images have {channels} channels; cannot adapt them to {in_channels}")


def _prepare_labels(y: np.ndarray, n: int, split: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{split} labels must be a 1-D array of {n} entries, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) and not np.array_equal(y, np.round(y)):
        raise ValueError(f"{split} labels must be integers")
    labels = torch.from_numpy(y.astype(np.int64))
    if labels.min() < 0:
        raise ValueError(f"{split} labels must be >= 0")
    return labels
