"""Image data: scikit-learn's digits (embedded), image folders and CIFAR-10 (local files)."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.data import Dataset, TensorDataset, random_split

from .loaders import SplitDataModule


def require_dir(path: str, what: str) -> str:
    """`path` if it is a directory, else FileNotFoundError naming it and what belongs there."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: no directory at {os.path.abspath(path)!r}")
    return path


#: What an image folder reads: torchvision's extensions, and GIF, which PIL reads as well.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str):
    """The RGB PIL image of the file at `path`; ValueError naming the file when it is corrupt or
    truncated (PIL alone says "image file is truncated" without the name)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    # UnidentifiedImageError is an OSError; DecompressionBombError (an image past PIL's pixel
    # limit, Image.MAX_IMAGE_PIXELS) is neither.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from e


def _labelled_as(train, split):
    """An evaluation ImageFolder relabelled with the training folder's class indices.

    torchvision numbers each folder's own sorted class folders, so a split without one of
    the training classes would shift the labels after it (val {cat, fox} makes fox 1, which
    is train's dog). Raises ValueError naming class folders the training split lacks.
    """
    unknown = sorted(set(split.classes) - set(train.classes))
    if unknown:
        raise ValueError(f"ImageFolderDataModule: {split.root} has class folders that the training folder "
                         f"{train.root} lacks: {', '.join(unknown)}")
    index = [train.class_to_idx[name] for name in split.classes]
    split.samples = split.imgs = [(path, index[label]) for path, label in split.samples]
    split.targets = [label for _, label in split.samples]
    split.classes, split.class_to_idx = list(train.classes), dict(train.class_to_idx)
    return split


class _Shift(Dataset):
    """Training augmentation for tiny images: a random shift by up to `pixels`; the pixels shifted
    in are `fill` (the background: 0 before standardization, -mean/std after).

    The shifts come from torch's global generator, which the training loader (ResumableLoader)
    seeds for each batch, in the main process and in each worker alike: the run's seed sets
    them, whatever the number of workers, and a resumed run draws the same. (In a worker of a
    plain DataLoader, torch seeds that generator per worker.)"""

    def __init__(self, base: Dataset, pixels: int, fill: float = 0.0):
        self.base, self.pixels, self.fill = base, pixels, fill

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        if self.pixels:
            dy, dx = torch.randint(-self.pixels, self.pixels + 1, (2,)).tolist()
            image = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
            if dy > 0:
                image[:, :dy] = self.fill
            elif dy < 0:
                image[:, dy:] = self.fill
            if dx > 0:
                image[:, :, :dx] = self.fill
            elif dx < 0:
                image[:, :, dx:] = self.fill
        return image, label


class DigitsDataModule(SplitDataModule):
    """scikit-learn's handwritten digits: 1,797 real 8x8 grey images of 0-9, shipped with the package.

    A fixed split (seed `split_seed`): 1,257 train / 270 val / 270 test images. Pixels
    (0-16) are scaled to [0, 1] and standardized by the training set's mean and std.
    Args: batch_size, num_workers, shift (training augmentation: random shifts by up
    to this many pixels, 0 to 7, the background shifted in), split_seed, shuffle (the training
    order; off for exact comparisons).
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, shift: int = 0, split_seed: int = 0,
                 shuffle: bool = True):
        super().__init__(batch_size, num_workers, shuffle)
        self.check_int("shift", shift, 0, " (pixels)")
        if shift > 7:
            raise ValueError(f"{type(self).__name__}: shift must be at most 7 (the images are 8 x 8), got {shift}")
        self.shift, self.split_seed = shift, split_seed
        self.num_classes, self.image_size, self.channels = 10, 8, 1
        self.classes = [str(digit) for digit in range(10)]

    def setup(self, stage: Optional[str] = None):
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        generator = torch.Generator().manual_seed(self.split_seed)
        train, val, test = random_split(range(len(labels)), [1257, 270, 270], generator=generator)
        train_idx = torch.tensor(list(train))
        mean, std = images[train_idx].mean(), images[train_idx].std()
        images = (images - mean) / std

        def subset(idx):
            idx = torch.tensor(list(idx))
            return TensorDataset(images[idx], labels[idx])

        self.train_set = _Shift(subset(train), self.shift, fill=float(-mean / std))
        self.val_set, self.test_set = subset(val), subset(test)


class ImageFolderDataModule(SplitDataModule):
    """Images in class folders (root/train/<class>/*.png, root/val/<class>/*), torchvision's ImageFolder.

    Training: random resized crop and flip; evaluation: resize and center crop; ImageNet
    normalization. Files ending in one of IMAGE_EXTENSIONS are read, others ignored. Without
    test_dir the test split (`zoo test`, `zoo predict`) is the validation folder. A `~` in
    root is the home folder.
    Raises FileNotFoundError naming a missing folder, and (when read) ValueError naming a
    corrupt or truncated image.
    """

    def __init__(self, root: str, image_size: int = 224, batch_size: int = 64, num_workers: int = 4,
                 train_dir: str = "train", val_dir: str = "val", test_dir: Optional[str] = None):
        super().__init__(batch_size, num_workers)
        self.check_int("image_size", image_size, 1)
        self.root, self.image_size = os.path.expanduser(root), image_size
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir

    def setup(self, stage: Optional[str] = None):
        from torchvision import datasets, transforms as T

        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        train_tf = T.Compose([T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                              T.Normalize(mean, std)])
        eval_tf = T.Compose([T.Resize(int(self.image_size * 1.14)), T.CenterCrop(self.image_size), T.ToTensor(),
                             T.Normalize(mean, std)])
        folder = lambda name: require_dir(os.path.join(self.root, name), "ImageFolderDataModule")  # noqa: E731
        def images(name: str, transform):
            path = folder(name)
            try:
                return datasets.ImageFolder(path, transform, loader=load_image, is_valid_file=is_image_file)
            except FileNotFoundError as e:  # torchvision names the empty class folders but not where they are
                raise FileNotFoundError(f"ImageFolderDataModule: {os.path.abspath(path)!r}: {e} (read are files "
                                        f"ending in {', '.join(IMAGE_EXTENSIONS)})") from e

        self.train_set = images(self.train_dir, train_tf)
        for split, name in (("val_set", self.val_dir), ("test_set", self.test_dir or self.val_dir)):
            setattr(self, split, _labelled_as(self.train_set, images(name, eval_tf)))
        self.classes = list(self.train_set.classes)
        self.num_classes = len(self.classes)


def _cifar_problem(root: str) -> str:
    """What is wrong with a CIFAR-10 folder, naming the first file missing or failing its checksum."""
    from torchvision import datasets
    from torchvision.datasets.utils import check_integrity

    cifar = datasets.CIFAR10
    folder = os.path.join(os.path.abspath(root), cifar.base_folder)
    for name, md5 in [*cifar.train_list, *cifar.test_list, [cifar.meta["filename"], cifar.meta["md5"]]]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"CIFAR-10: {path!r} is missing (expected torchvision's {cifar.base_folder} folder under {root!r})"
        if not check_integrity(path, md5):
            return f"CIFAR-10: {path!r} is corrupt (its MD5 is not CIFAR-10's {md5})"
    return f"CIFAR-10 under {folder!r} could not be read"


class CIFAR10DataModule(SplitDataModule):
    """CIFAR-10 from a local copy (torchvision's layout, download=False): 45k/5k train/val split + the test set.

    The validation split is a tenth of the training files, drawn with split_seed.

    Raises FileNotFoundError naming the file that is missing or fails its checksum.
    """

    def __init__(self, root: str, batch_size: int = 256, num_workers: int = 4, augment: bool = True,
                 split_seed: int = 0):
        super().__init__(batch_size, num_workers)
        self.root, self.augment, self.split_seed = root, augment, split_seed
        self.num_classes = 10
        self.classes: Optional[list[str]] = None  # read from the data set's meta file in setup()

    def setup(self, stage: Optional[str] = None):
        from torchvision import datasets, transforms as T

        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        base = [T.ToTensor(), T.Normalize(mean, std)]
        train_tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []) + base)
        try:
            full_train = datasets.CIFAR10(self.root, train=True, download=False, transform=train_tf)
            full_eval = datasets.CIFAR10(self.root, train=True, download=False, transform=T.Compose(base))
            self.test_set = datasets.CIFAR10(self.root, train=False, download=False, transform=T.Compose(base))
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            raise FileNotFoundError(_cifar_problem(self.root)) from e
        self.classes = list(self.test_set.classes)
        generator = torch.Generator().manual_seed(self.split_seed)
        n_val = len(full_train) // 10  # 5000 of CIFAR-10's 50000 (and a tenth of a smaller copy)
        train_idx, val_idx = random_split(range(len(full_train)), [len(full_train) - n_val, n_val], generator=generator)
        self.train_set = torch.utils.data.Subset(full_train, list(train_idx))
        self.val_set = torch.utils.data.Subset(full_eval, list(val_idx))
