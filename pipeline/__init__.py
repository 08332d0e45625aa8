"""Ingestion and batching for recurrent language models.

Importing this package is light: only torch and numpy. ``pipeline.prepare`` (the
ingestion stage, which needs ``datasets`` and ``tokenizers``) is imported on demand.
"""
from pipeline.collate import PackedBatch, PackedCollator, PadCollator, PaddedBatch
from pipeline.sampling import BucketBatchSampler
from pipeline.streaming import StreamBucketBatcher

__all__ = ["BucketBatchSampler", "PackedBatch", "PackedCollator", "PadCollator", "PaddedBatch", "StreamBucketBatcher"]
