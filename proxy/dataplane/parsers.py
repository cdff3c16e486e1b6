"""How graygate sets up httptools' parsers: the one leniency each needs, on every parser
it makes (request, response, shadow answer) and again after a restart, which clears it.
"""

from __future__ import annotations

import httptools


def lenient(parser: httptools.HttpRequestParser | httptools.HttpResponseParser) -> None:
    """RFC 9112 7.1.1 allows whitespace after a chunk size (before a chunk extension);
    llhttp refuses it unless told."""
    parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
