"""Helpers shared by test modules (import them from here, never from another test module): small data
folders in the layouts the readers accept, written with the built-in synthetic images."""
import os

import cv2
import numpy as np

from vesselfast.data.synthetic import raw_pair


def write_image(path, arr):
    """Writes ``arr`` (an [H x W] or [H x W x 3] uint8 array) to ``path``, creating its folder."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    assert cv2.imwrite(str(path), arr)


def generic(root, n=2, size=40, fov=False):
    """A generic source folder: ``images/``, ``masks/`` (and ``fov/``) with ``n`` size x size cases."""
    for i in range(n):
        rgb, m, f = raw_pair("source", "train", i, 64)
        write_image(root / "images" / f"c{i}.png", cv2.resize(rgb, (size, size)))
        write_image(root / "masks" / f"c{i}.png",
                    cv2.resize(m * 255, (size, size), interpolation=cv2.INTER_NEAREST))
        if fov:
            write_image(root / "fov" / f"c{i}.png", cv2.resize(f.astype(np.uint8) * 255, (size, size)))
    return root


def octa_split(root, n=2):
    """An OCTA-500-like target folder: ``{train,test}/{image,label}/`` with ``n`` 48 x 48 cases each."""
    for split in ("train", "test"):
        for i in range(n):
            g, m, _ = raw_pair("target", "test", i, 48)
            write_image(root / split / "image" / f"{split}{i}.png", g)
            write_image(root / split / "label" / f"{split}{i}.png", m * 255)
    return root


def read_only_folder(path, monkeypatch):
    """Creates ``path`` as a 0500 folder. Root writes into those anyway, so as root the writability probe
    (``tempfile.NamedTemporaryFile``) is made to meet a read-only file system instead."""
    import errno
    import tempfile

    path.mkdir()
    path.chmod(0o500)
    if os.geteuid() == 0:

        def read_only(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    return path
