"""Datasets, their partition among clients, and the partition report.

- ``datasets``: digits, Fashion-MNIST or MNIST by name, once per process (:func:`load_dataset`);
- ``dataset``: the :class:`Dataset` type (a fixed train/test split) and class subsets;
- ``digits``, ``idx``, ``download``: the sources (scikit-learn's digits; IDX files, fetched
  into the Keras cache when missing);
- ``partitioners``: iid, dirichlet, shards, label_quantity as indices into one training set;
- ``flower``: any Flower Datasets partitioner named by ``partition._target_``, as indices too;
- ``report``: ``partition.csv``, ``partition.json`` and ``partition.png``.
"""

from fl_ondevice.data.dataset import Dataset
from fl_ondevice.data.datasets import load_dataset
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
