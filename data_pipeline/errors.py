"""Errors raised by the data pipeline. Each names the file, key or value at fault."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user (a config value, a file that is not what it should be): command-line tools print
    the message, which names the key or file, as one line and exit with code 2."""


class ShardNotFoundError(FileNotFoundError):
    """A shard pattern matched no file (or a listed shard is missing)."""


class ShardUrlError(ValueError):
    """A shard URL the pipeline refuses to open: ``pipe:`` without ``allow_pipe``, a scheme neither our HTTP
    reader nor fsspec knows, or one whose optional package (s3fs, gcsfs, ...) is not installed."""


class RemoteShardError(OSError):
    """A remote shard that could not be read: a 4xx answer, or failures past the retries. The tar reader counts
    the shard as ``remote_error`` (samples read before are kept). The message names the URL and the cause;
    ``missing`` says the source answered that there is no such file (HTTP 404/410, FileNotFoundError)."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


class NoValidSampleError(ValueError):
    """A source in which no sample passed the checks; nothing was written."""


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class DataQualityError(RuntimeError):
    """Too many bad samples: the configured maximum bad fraction was exceeded."""


# Every reason a sample can be skipped for, in the order reports list them.
REASONS = (
    "truncated_tar",  # the shard ends in the middle of a sample or header (one count per truncated shard)
    "unreadable_tar",  # not a tar file at all, or a garbled header (one count per shard)
    "remote_error",  # a remote shard not found (4xx) or still failing after the retries (one count per shard)
    "missing_image",
    "zero_byte",
    "undecodable_image",
    "too_many_pixels",
    "too_small",
    "bad_aspect",
    "missing_caption",
    "non_utf8_caption",
    "bad_latent",
    "missing_label",  # a .json field (data.fields) or a label map (data.maps) the config asks for is absent
    "bad_label",  # a label map that is not a one-channel image of the image's size, or a malformed box
)
