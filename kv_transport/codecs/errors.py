"""The one exception the codec library raises for bad input or an unusable profile."""

from __future__ import annotations


class CodecError(ValueError):
    """A blob is corrupt, truncated or foreign, or a profile cannot encode the given tensors.

    A subclass of ValueError so that callers which already treat malformed wire data as a
    ValueError (the connector's pull path) handle it without a new except clause.
    """
