"""torch.onnx.export without the exporter's own chatter, for the DiT's graph and the VAE decoder's alike."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_export() -> Iterator[io.StringIO]:
    """Collect what torch.onnx prints (kept in the yielded buffer for a failure's message) and drop its
    warnings: it logs one per torchvision op it cannot register (torchvision is not a dependency) and
    torch.export raises deprecation FutureWarnings of its own internals. None of it is the user's."""
    log = io.StringIO()
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield log
    finally:
        logger.setLevel(level)
