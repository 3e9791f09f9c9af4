"""Griffe extension for the API reference: adapt the docstrings' reST habits to Markdown.

The docstrings use the Google style with a singular ``Example:`` heading and reST roles
such as ``:meth:`step```. Griffe's Google parser reads only ``Examples:`` as an examples
section (``>>>`` lines and their output become highlighted code); ``Example:`` would render
as a text admonition, where doctest output such as ``[0.5, 0.5]`` reads as a Markdown
reference. reST roles have no meaning in Markdown. When an object is loaded, before its
docstring is parsed, this extension renames the heading and turns each role into inline
code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:meth|func|class|mod|attr|data|exc|obj):`~?([^`]+)`")


class DoctestExamples(griffe.Extension):
    """Read ``Example:`` as ``Examples:`` and ``:role:`name``` as ``name``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _HEADING.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(r"``\1``", text)
