"""Ingestion and batching for recurrent language models.

``from pipeline import BucketBatchSampler, PackedCollator, ...`` needs only torch and numpy.
The names are imported on first use (PEP 562), so a tool that uses none of them —
``python -m pipeline.prepare``, which needs ``datasets``, ``tokenizers`` and pyarrow —
does not pay for importing torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BucketBatchSampler": "pipeline.sampling",
    "PackedBatch": "pipeline.collate",
    "PackedCollator": "pipeline.collate",
    "PadCollator": "pipeline.collate",
    "PaddedBatch": "pipeline.collate",
    "StreamBucketBatcher": "pipeline.streaming",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
