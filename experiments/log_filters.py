"""Keeps experiment output readable: library INFO chatter is dropped, warnings stay."""

import logging

from absl import logging as absl_logging


class _QuietLibraries(logging.Filter):
    """Drops INFO chatter from orbax, tfds and XLA's backend probing; warnings still show."""
    NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/xla_bridge.py")

    def filter(self, record):
        return record.levelno >= logging.WARNING or not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs() -> None:
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
