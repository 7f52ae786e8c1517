"""The list of (file, label) pairs that every pipeline reads, built once the same way for all.

Class indices follow torchvision's ImageFolder: class folders sorted by name, files with an image
extension (case-insensitive) sorted within each folder. Both the DALI and the torchvision pipeline
read this list, so their labels agree by construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """The data folder is not usable; the message names the folder or file."""


@dataclass(frozen=True)
class FileIndex:
    files: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, keep: list[int]) -> FileIndex:
        return FileIndex([self.files[i] for i in keep], [self.labels[i] for i in keep], self.classes)


def find_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataError(f"data folder {split_dir} does not exist or is not a folder")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise DataError(f"data folder {split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    return classes


def build_file_index(split_dir: str | Path, classes: list[str] | None = None) -> FileIndex:
    """Index `split_dir/<class>/<image>`. Pass `classes` (from the training split) to index a
    validation split with the training split's class indices."""
    split_dir = Path(split_dir)
    found = find_classes(split_dir)
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(
                f"{split_dir} has class folders absent from the training data: {', '.join(extra[:5])}"
                + (" ..." if len(extra) > 5 else "")
            )
    files: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        names = sorted(
            entry.name
            for entry in os.scandir(folder)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not names:
            empty.append(name)
        files.extend(str(folder / n) for n in names)
        labels.extend([label] * len(names))
    if empty:
        raise DataError(
            f"class folders without images in {split_dir}: {', '.join(empty[:5])}" + (" ..." if len(empty) > 5 else "")
        )
    return FileIndex(files, labels, list(classes))
