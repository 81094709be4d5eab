"""Runtimes without a federation: one aggregation round over adapter folders."""

from fedlora.offline.aggregate import AggregationError, aggregate_folders

__all__ = ["AggregationError", "aggregate_folders"]
