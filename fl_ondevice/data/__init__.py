"""Datasets, their partition among clients, and the partition report.

- ``datasets``: digits, Fashion-MNIST and MNIST as uint8 arrays (:func:`load_dataset`);
- ``partitioners``: iid, dirichlet, shards, label_quantity as indices into one training set;
- ``report``: ``partition.csv``, ``partition.json`` and ``partition.png``.
"""

from fl_ondevice.data.datasets import Dataset, load_dataset
from fl_ondevice.data.partitioners import Partition, make_partitions
from fl_ondevice.data.report import label_counts, write_partition_report

__all__ = [
    "Dataset",
    "Partition",
    "label_counts",
    "load_dataset",
    "make_partitions",
    "write_partition_report",
]
