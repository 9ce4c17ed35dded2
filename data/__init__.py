"""Activation data: sources, the HDF5 sequence cache and the LightningDataModule."""

from data.cache import ActivationCache
from data.cache_format import CacheMismatchError, CacheSpec
from data.cache_writer import build_cache
from data.datamodule import ActivationDataModule
from data.lm_source import LMSource, SourceUnavailableError
from data.sources import ActivationSource, SourceChunk
from data.synthetic import FeatureGroup, SyntheticSource

__all__ = [
    "ActivationCache",
    "ActivationDataModule",
    "ActivationSource",
    "CacheMismatchError",
    "CacheSpec",
    "FeatureGroup",
    "LMSource",
    "SourceChunk",
    "SourceUnavailableError",
    "SyntheticSource",
    "build_cache",
]
