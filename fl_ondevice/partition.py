"""`python -m fl_ondevice.partition dataset=... partition=... num_clients=...`: its report.

Writes ``partition.csv``, ``partition.json`` and ``partition.png`` (``fl_ondevice.data.report``)
of the composed config into Hydra's run directory, without training anything.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fl_ondevice.config import DatasetConfig, PartitionConfig, to_dataclass
from fl_ondevice.data import load_dataset, make_partitions, write_partition_report
from fl_ondevice.errors import FlOnDeviceError


def _describe(cfg: PartitionConfig) -> str:
    if cfg._target_ is not None:
        return f"{cfg._target_.rpartition('.')[2]}(by {cfg.partition_by})"
    params = {
        "iid": "",
        "dirichlet": f"alpha={cfg.alpha:g}",
        "shards": f"{cfg.shards_per_client} shards of {cfg.shard_size}",
        "label_quantity": f"k={cfg.labels_per_client}",
    }[cfg.name]
    return f"{cfg.name}({params})" if params else cfg.name


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Write the partition report of the composed config into Hydra's run directory.

    Reads ``cfg.dataset``, ``cfg.partition``, ``cfg.num_clients`` and ``cfg.seed``; prints the
    summary line and the output directory.
    """
    try:
        line, name = _report(cfg, HydraConfig.get().runtime.output_dir)
    except FlOnDeviceError as err:  # bad input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{name}: {line}")
    print(f"written to {HydraConfig.get().runtime.output_dir}")


def _report(cfg: DictConfig, out_dir: str) -> tuple[str, str]:
    dataset_cfg = to_dataclass(DatasetConfig, cfg.dataset, "dataset")
    partition_cfg = to_dataclass(PartitionConfig, cfg.partition, "partition")
    seed = int(cfg.seed)
    dataset = load_dataset(dataset_cfg, seed)
    partitions = make_partitions(dataset, int(cfg.num_clients), partition_cfg, seed)
    description = f"{dataset.name}, {_describe(partition_cfg)}, seed {seed}"
    line = write_partition_report(
        partitions, dataset.y_train, dataset.num_classes, out_dir, description
    )
    return line, f"{dataset.name} / {_describe(partition_cfg)}"


if __name__ == "__main__":
    main()
