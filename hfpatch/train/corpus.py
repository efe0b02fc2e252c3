"""The embedded default corpus: Python's own help topics, split into sections.

``pydoc_data.topics`` ships with every CPython: ~80 topics of real English and code,
~460K characters. Split at their section headings they give ~200 documents from a
few dozen characters to ~25K -- the wide spread of lengths packing is for.
"""

from __future__ import annotations

import hashlib
import re

NAME = "pydoc-topics"

# A heading is a line underlined by a run of =, -, * or ~.
_SECTION_START = re.compile(r"\n(?=[^\n]+\n[=\-*~]{3,}\n)")


def default_documents() -> list[str]:
    """The corpus as a list of documents, in a fixed order."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        docs.extend(part.strip() for part in _SECTION_START.split(topics[name]) if part.strip())
    return docs


def fingerprint(docs: list[str]) -> str:
    """A short hash of the corpus text, so caches follow the Python version."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:12]
