"""The files a model config names, kept inside the model's directory: one rule for all of them.

A config (``config.pbtxt``, or the override of the repository load API merged over it) names
files by a path relative to a directory of the model, as Triton does:

=========================  =============================  ==========================
field                      directory                      at most
=========================  =============================  ==========================
``default_model_filename``  ``<model>/<version>/``          any size (ONNX Runtime reads it)
warm-up ``input_data_file`` ``<model>/warmup/``             the bytes its input needs
output ``label_filename``   ``<model>/``                    :data:`MAX_LABEL_BYTES`
``config.pbtxt`` itself     ``<model>/``                    :data:`MAX_CONFIG_BYTES`
=========================  =============================  ==========================

The rule (:func:`contained_file`): the name is relative, without ``..`` components; what it
names, with every symlink resolved, lies inside the resolved directory; it is a regular file (not
a FIFO, device or directory); it is no larger than its bound. :func:`read_contained` opens it with
``O_NONBLOCK | O_NOFOLLOW`` (a FIFO swapped in after the check cannot block the load, a symlink
swapped in cannot be followed) and checks the opened file again.

Every name that leaves the directory is refused with the same message, whether or not something
exists where it points, so a caller of the load API learns nothing about files outside the model
directory. Inside it, the message says what is wrong (missing, not a regular file, too large).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from onnxgate.errors import ModelLoadError
from onnxgate_client.pb import model_config_pb2 as mc

MAX_LABEL_BYTES = 4 * 1024 * 1024  # a label file: a few MiB holds millions of class names
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # config.pbtxt
MAX_NAME_BYTES = 1024  # a file name in a config

VERSION_DIR = "the model's version directory"
WARMUP_DIR = "the model's warmup directory"
MODEL_DIR = "the model directory"


def outside(what: str, where: str) -> ModelLoadError:
    """The one refusal of a name that leaves its directory (it says nothing of what is there)."""
    return ModelLoadError(f"{what} must name a file inside {where} (a relative path without '..')")


def check_name(relative: str, what: str, where: str) -> None:
    """Refuse a name that could leave its directory by its spelling alone: empty, absolute, with a
    ``..`` component, a NUL byte, or too long. Touches no file."""
    parts = PurePosixPath(relative).parts
    if (
        not relative
        or "\0" in relative
        or len(relative.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES
        or relative.startswith("/")
        or ".." in parts
        or all(p == "." for p in parts)
    ):
        raise outside(what, where)


def warmup_what(warmup: str, input_name: str) -> str:
    return f"model_warmup '{warmup}' input '{input_name}': input_data_file"


def label_what(output: str) -> str:
    return f"output '{output}': label_filename"


def check_names(config: mc.ModelConfig) -> None:
    """Every file name ``config`` gives, by its spelling alone (:func:`check_name`), so that a bad
    name is refused before any session is made; where it leads is checked when it is read."""
    if config.default_model_filename:
        check_name(config.default_model_filename, "default_model_filename", VERSION_DIR)
    for w in config.model_warmup:
        for input_name, item in sorted(w.inputs.items()):
            if item.WhichOneof("input_data_type") == "input_data_file":
                check_name(item.input_data_file, warmup_what(w.name, input_name), WARMUP_DIR)
    for out in config.output:
        if out.label_filename:
            check_name(out.label_filename, label_what(out.name), MODEL_DIR)


def check_paths(config: mc.ModelConfig, model_dir: Path, versions: Sequence[int]) -> None:
    """Where every file name of ``config`` leads (:func:`resolve_inside`): the model file in each of
    ``versions``, warm-up files and label files, so that every name that leaves the model's
    directories is refused the same way before any session is made. Nothing is opened."""
    check_names(config)
    if config.default_model_filename:
        for v in versions:
            resolve_inside(model_dir / str(v), config.default_model_filename, "default_model_filename",
                           where=VERSION_DIR)
    for w in config.model_warmup:
        for input_name, item in sorted(w.inputs.items()):
            if item.WhichOneof("input_data_type") == "input_data_file":
                resolve_inside(model_dir / "warmup", item.input_data_file, warmup_what(w.name, input_name),
                               where=WARMUP_DIR)
    for out in config.output:
        if out.label_filename:
            resolve_inside(model_dir, out.label_filename, label_what(out.name), where=MODEL_DIR)


def read_labels(model_dir: Path, config: mc.ModelConfig) -> dict[str, list[str]]:
    """Each output's labels (one per line of its ``label_filename`` in ``<model>/``, at most
    :data:`MAX_LABEL_BYTES`, UTF-8), for the classification extension's ``value:index:label``."""
    labels: dict[str, list[str]] = {}
    for out in config.output:
        if not out.label_filename:
            continue
        what = label_what(out.name)
        raw = read_contained(model_dir, out.label_filename, what, MAX_LABEL_BYTES, where=MODEL_DIR)
        try:
            labels[out.name] = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"{what}: {out.label_filename} is not UTF-8 text at byte {exc.start}") from None
    return labels


def resolve_inside(root: Path, relative: str, what: str, *, where: str = MODEL_DIR) -> Path:
    """Where ``relative`` leads from ``root``, every symlink resolved; raises the one refusal
    (:func:`outside`) unless that is inside the resolved ``root``. Nothing needs to exist there."""
    check_name(relative, what, where)
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, relative))
    if not is_inside(path, base):
        raise outside(what, where)
    return Path(path)


def contained_file(root: Path, relative: str, what: str, max_bytes: int | None = None, *,
                   where: str = MODEL_DIR) -> Path:
    """The regular file ``relative`` names inside ``root``, as a resolved path; raises
    :class:`ModelLoadError` otherwise (see the module docstring). ``root``'s own symlinks are the
    repository's layout and are followed; the name's may not lead out of it."""
    path = str(resolve_inside(root, relative, what, where=where))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelLoadError(f"{what}: missing {relative}") from None
    except OSError as exc:
        raise ModelLoadError(f"{what}: cannot read {relative}: {exc.strerror}") from None
    _check_stat(st, relative, what, max_bytes)
    return Path(path)


def read_contained(root: Path, relative: str, what: str, max_bytes: int, *, where: str = MODEL_DIR) -> bytes:
    """The bytes of the file :func:`contained_file` finds, read without ever blocking on it or
    following a symlink swapped in since; at most ``max_bytes``."""
    path = contained_file(root, relative, what, max_bytes, where=where)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ModelLoadError(f"{what}: cannot read {relative}: {exc.strerror}") from None
    try:
        _check_stat(os.fstat(fd), relative, what, max_bytes)
        opened = _opened_path(fd)
        if opened is not None and not is_inside(opened, os.path.realpath(root)):
            raise outside(what, where)
        os.set_blocking(fd, True)  # a regular file: reads never wait; the flag only mattered for open
        chunks, left = [], max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise ModelLoadError(f"{what}: cannot read {relative}: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:  # it grew since the check
        raise _too_large(relative, what, len(data), max_bytes)
    return data


def read_config_file(model_dir: Path, name: str = "config.pbtxt") -> str:
    """``<model>/config.pbtxt`` as text, by the same rule (at most :data:`MAX_CONFIG_BYTES`)."""
    try:
        raw = read_contained(model_dir, name, name, MAX_CONFIG_BYTES)
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot read {name}: {exc.message.removeprefix(name + ': ')}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{name} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None


def is_inside(path: str | Path, base: str | Path) -> bool:
    """``path`` lies strictly below ``base`` (both taken as given: resolve them first)."""
    path, base = str(path), str(base)
    return path != base and path.startswith(base.rstrip(os.sep) + os.sep)


def _check_stat(st: os.stat_result, relative: str, what: str, max_bytes: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(f"{what}: {relative} is not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise _too_large(relative, what, st.st_size, max_bytes)


def _too_large(relative: str, what: str, size: int, max_bytes: int) -> ModelLoadError:
    return ModelLoadError(f"{what}: {relative} has {size} bytes, more than the {max_bytes} allowed")


def _opened_path(fd: int) -> str | None:
    """Where the open file really is (Linux's /proc), or None where that cannot be told."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
