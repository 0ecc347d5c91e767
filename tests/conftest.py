"""Shared fixtures: the ``../shared`` reference folder (skipped cleanly when absent), the ORL faces in it, synthetic
data, and tiny model checkpoints to embed with."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch

from facesearch.model import assets
from facesearch.model.checkpoint import save_checkpoint
from facesearch.model.config import preset
from facesearch.model.network import FaceNet


def _shared_path() -> Path:
    """The library's own resolution ($FACESEARCH_SHARED, else ../shared beside the checkout)."""
    return assets.shared_dir() or Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` next to the repository root (or ``$FACESEARCH_SHARED``); skips the test when absent."""
    path = _shared_path()
    if not path.is_dir():
        pytest.skip(f"shared reference folder {path} is absent (set ${assets.SHARED_ENV} to point at it)")
    return path


@pytest.fixture(scope="session")
def orl_dir(shared_dir: Path) -> Path:
    """The AT&T/ORL database: ``s{1..40}/{1..10}.pgm``, 92x112 grey; skips the test when absent."""
    path = shared_dir / "data" / "orl"
    if not (path / "s1" / "1.pgm").is_file():
        pytest.skip(f"ORL faces not found under {path}")
    return path


@pytest.fixture(scope="session")
def yunet_path(shared_dir: Path) -> Path:
    """The YuNet ONNX model from the shared folder; skips the test when absent."""
    path = shared_dir / assets.YUNET_IN_SHARED
    if not path.is_file():
        pytest.skip(f"YuNet model not found at {path}")
    return path


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic data set in every layout, generated once per session (seeded, ~2 s)."""
    from facesearch.model.faces.synth import SynthConfig, generate_faces

    out = tmp_path_factory.mktemp("synth") / "data"
    generate_faces(
        SynthConfig(
            out=out,
            seed=7,
            identities=24,
            images_per_identity=8,
            celeba_images=600,
            celeba_images_per_identity=12,
            probe_identities=4,
            probe_images_per_identity=5,
            distractors=60,
            size=96,
            workers=1,
        )
    )
    return out


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialised Fast model (width 0.125, 56x48 input, d = 32) saved as a weights checkpoint."""
    torch.manual_seed(seed)
    cfg = preset("fast", width=0.125, input_size=(56, 48), num_identities=8, embedding_dim=32, attribute_hidden=16)
    save_checkpoint(path, cfg, FaceNet(cfg).state_dict())
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny weights checkpoint, one per test module."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "weights.safetensors")


@pytest.fixture
def make_checkpoint() -> Callable[..., Path]:
    """:func:`tiny_checkpoint` itself, for tests that need a second, different model."""
    return tiny_checkpoint


@contextmanager
def _stuck_fifo(path: Path, patience: float = 10.0) -> Iterator[list[float]]:
    """A named pipe at ``path`` that nothing writes to.  After ``patience`` seconds a watchdog releases whatever is
    blocked reading it (the reader sees end-of-file) and notes the time in the yielded list: the bug under test then
    fails an assertion instead of hanging the run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    released: list[float] = []
    stop = threading.Event()

    def watchdog() -> None:
        if stop.wait(patience):
            return
        while not stop.is_set():
            fd = os.open(path, os.O_WRONLY)  # blocks until a reader has the pipe open (or the teardown below opens it)
            if not stop.is_set():
                released.append(time.monotonic())
            os.close(fd)  # no writer left: the reader sees end-of-file
            stop.wait(0.1)  # a released reader closes the pipe meanwhile; without this pause the loop would spin

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        yield released
    finally:
        stop.set()
        unblock = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets a watchdog waiting in open() return
        try:
            thread.join(10)
            assert not thread.is_alive(), f"the watchdog of {path} did not stop"
        finally:
            os.close(unblock)


@pytest.fixture(scope="session")
def fifo() -> Callable[..., AbstractContextManager[list[float]]]:
    """``with fifo(path) as released:`` a named pipe nobody writes to, released by a watchdog after 10 s."""
    return _stuck_fifo


@pytest.fixture(autouse=True, scope="session")
def _screened_batches_everywhere() -> Iterator[None]:
    """Resident galleries screen batches on every machine under test, so the screened batch path is exercised even
    where the CPU's low-precision products are too slow for it to pay (its own test checks that choice)."""
    from facesearch.indexer import screen

    saved = dict(screen.BATCH_SCREEN_PAYS)
    screen.BATCH_SCREEN_PAYS.update({torch.bfloat16: True, torch.float16: True, torch.int8: True})
    yield
    screen.BATCH_SCREEN_PAYS.clear()
    screen.BATCH_SCREEN_PAYS.update(saved)
