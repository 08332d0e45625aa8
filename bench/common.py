"""What the bench scripts share: where WikiText-2 is and where its prepared copy is cached."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def prepared_dir(data: Path) -> Path:
    """The folder a bench prepares ``data`` into: ``$TMPDIR/bench-wt2`` for the shared
    WikiText-2 (one copy for every bench), a folder of its own for any other ``--data``
    (``pipeline.prepare`` refuses to replace a folder prepared from other data)."""
    tmp = Path(tempfile.gettempdir())
    data = Path(data).resolve()
    if data == DATA.resolve():
        return tmp / "bench-wt2"
    return tmp / f"bench-{data.name}-{hashlib.sha256(str(data).encode()).hexdigest()[:8]}"
