"""The paper's cost model moved to :mod:`kvagent.analysis.economics`; this name stays importable.

``kvagent.economics`` is the same module object as ``kvagent.analysis.economics`` (not a copy), so every
name, private ones included, and every monkeypatch behave as before.
"""

from __future__ import annotations

import sys

from .analysis import economics as _economics

sys.modules[__name__] = _economics
