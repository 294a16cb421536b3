"""Every conf/experiment/*.yaml composes, validates and (slow) trains for one tiny round."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from fl_ondevice.config import Config, parse_config
from fl_ondevice.errors import DataError

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_experiment(name: str, *overrides: str, output_dir: str = ".") -> Config:
    """The real composition of ``experiment=name`` (plus overrides), validated."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        dcfg = compose(
            "config", overrides=[f"experiment={name}", *overrides, f"output_dir={output_dir}"]
        )
    return parse_config(dcfg)


def sweep_grid(name: str) -> list[list[str]]:
    """The jobs ``python -m fl_ondevice.simulate -m experiment=name`` would run, as overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        hcfg = compose(
            "config",
            overrides=[f"experiment={name}", "output_dir=."],
            return_hydra_config=True,
        )
    node = hcfg.hydra.sweeper.params
    params = OmegaConf.to_container(node) if node is not None else {}
    assert isinstance(params, dict)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def test_there_are_experiment_configs_for_every_reproduction():
    prefixes = {"ondevice_fmnist", "mcmahan", "niid_bench"}
    assert {p for p in prefixes if any(e.startswith(p) for e in EXPERIMENTS)} == prefixes


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_sweep_job_composes_and_validates(name):
    jobs = sweep_grid(name)

    configs = [compose_experiment(name, *job) for job in jobs or [[]]]

    assert all(isinstance(cfg, Config) for cfg in configs)
    assert len({repr(cfg) for cfg in configs}) == len(configs)  # no two jobs are the same run


def test_mcmahan_configs_name_mnist_and_their_fmnist_variants_differ_only_in_data():
    for model in ("2nn", "cnn"):
        paper = compose_experiment(f"mcmahan_{model}")
        ours = compose_experiment(f"mcmahan_{model}_fmnist")

        assert paper.dataset.name == "mnist" and ours.dataset.name == "fashion_mnist"
        assert (paper.num_clients, paper.strategy["fraction_train"]) == (100, 0.1)
        assert paper.partition == ours.partition and paper.model == ours.model
        assert paper.client == ours.client


def _shrunk(cfg: Config) -> list[str]:
    # One round, one local epoch, two clients per round, 10% of each client's data for training:
    # the partition keeps the experiment's kind and client count.
    n = cfg.num_clients
    # model=transfer pretrains its base first: one epoch is enough to run the round.
    pretrain = ["model.pretrain_epochs=1"] if cfg.model.name == "transfer" else []
    # A DP wrapper (experiment=dp) samples through its inner strategy and must be told how many.
    inner = "strategy.strategy" if "strategy" in cfg.strategy else "strategy"
    sampled = max(int(n * 0.01), min(2, n))
    wrapper = [f"strategy.num_sampled_clients={sampled}"] if inner != "strategy" else []
    return [
        *pretrain,
        *wrapper,
        "num_rounds=1",
        "client.local_epochs=1",
        f"{inner}.fraction_train=0.01",  # int(n * 0.01) = 0 for n < 100: min_train_nodes decides
        f"{inner}.min_train_nodes={min(2, n)}",
        "partition.local_test_fraction=0.9",
        "target_accuracy=null",
    ]


@pytest.fixture(scope="module")
def tflite_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tflite-cache"))


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_one_tiny_round(name, tmp_path, tflite_cache):
    from fl_ondevice.data.datasets import load_dataset
    from fl_ondevice.simulate import simulate

    full = compose_experiment(name)
    cfg = compose_experiment(
        name, *_shrunk(full), f"cache_dir={tflite_cache}", output_dir=str(tmp_path)
    )
    try:  # only data already on this machine: a test never downloads
        load_dataset(dataclasses.replace(cfg.dataset, download=False), cfg.seed)
    except DataError as err:
        pytest.skip(f"{cfg.dataset.name} is not available offline ({err}); config composed fine")

    summary = simulate(cfg)

    assert summary["rounds"] == 1
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    assert (tmp_path / "metrics.json").is_file()


def _fake_run(folder: Path, batch: int | None, accuracies: list[float]) -> None:
    # The parts of a run's metrics.json that experiments/tables.py reads.
    config = {
        "model": {"name": "2nn", "learning_rate": 0.1},
        "partition": {"name": "iid"},
        "client": {"local_epochs": 1, "batch_size": batch},
        "num_clients": 100,
        "seed": 0,
    }
    rounds = [
        {
            "round": i,
            "accuracy": acc,
            "examples": 6000 * (i > 0),
            "clients_sampled": 10 * (i > 0),
            "bytes_down": 100 * (i > 0),
            "bytes_up": 100 * (i > 0),
            "seconds": 1.0 * (i > 0),
            "elapsed_seconds": float(i),
        }
        for i, acc in enumerate(accuracies)
    ]
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"config": config, "rounds": rounds}))


def test_tables_count_rounds_to_target_and_speed_up_over_fedsgd(tmp_path):
    from experiments import tables

    runs = tmp_path / "experiments" / "mcmahan2017" / "runs"
    _fake_run(runs / "fedsgd", None, [0.1, 0.5, 0.6, 0.7, 0.79, 0.8, 0.81, 0.82, 0.83])
    _fake_run(runs / "b10", 10, [0.1, 0.7, 0.81, 0.85])
    _fake_run(runs / "b50", 50, [0.1, 0.6, 0.7])  # never reaches 80%

    text = tables.build("mcmahan2017", tmp_path / "experiments")

    first = text.split("target 75%")[0]  # the 80% table
    rows = {line.split("|")[3].strip(): line for line in first.splitlines() if "|" in line}
    assert "| 5 |" in rows["∞"]  # FedSGD first reaches 80% in round 5
    assert "2 (2.5x)" in rows["10"]  # 5 / 2 rounds
    assert ">2" in rows["50"]
    assert (tmp_path / "experiments" / "mcmahan2017" / "accuracy.png").stat().st_size > 0


def test_device_time_table_gives_simulated_minutes_and_bytes_to_the_target(tmp_path):
    from experiments import tables

    runs = tmp_path / "experiments" / "device_time" / "runs" / "mlp" / "d_deadline"
    for seed, accuracies in [(0, [0.1, 0.6, 0.76, 0.8]), (1, [0.1, 0.5, 0.6, 0.7])]:
        _fake_run(runs / str(seed), 32, accuracies)
        doc = json.loads((runs / str(seed) / "metrics.json").read_text())
        doc["config"] |= {"seed": seed, "round": {"deadline_s": 1.5}}
        doc["config"]["client"]["update_encoding"] = "float32"
        for row in doc["rounds"]:  # 90 simulated seconds a round, 1 straggler, 9 replies
            r = row["round"]
            row |= {"sim_round_seconds": 90.0 * (r > 0), "sim_elapsed_seconds": 90.0 * r}
            row |= {"clients_stragglers": 1 * (r > 0), "clients_replied": 9 * (r > 0)}
        (runs / str(seed) / "metrics.json").write_text(json.dumps(doc))

    text = tables.build("device_time", tmp_path / "experiments")

    row = next(line for line in text.splitlines() if "deadline 1.5 s" in line)
    cells = [c.strip() for c in row.split("|")[1:-1]]
    # Seed 0 reaches 75% in round 2 (180 s, 2 x 200 B); seed 1 never does within 3 rounds.
    assert cells[2:6] == ["0, 1", "2 / >3", "180 / >270", "0 / >0"]
    assert cells[6:8] == ["90.0", "1.0"]


def test_dp_table_regenerates_the_committed_files(tmp_path):
    # experiments/dp's table, CSV and README are what `python -m experiments.tables dp` writes from
    # the committed runs: rebuilt in a copy, they are byte for byte the committed ones.
    import shutil

    from experiments import tables

    committed = Path(__file__).resolve().parents[1] / "experiments" / "dp"
    copy = tmp_path / "experiments" / "dp"
    shutil.copytree(committed / "runs", copy / "runs")
    shutil.copy(committed / "README.md", copy / "README.md")

    text = tables.build("dp", tmp_path / "experiments")

    for name in ("README.md", tables.RESULTS_MD, tables.RESULTS_CSV):
        assert (copy / name).read_bytes() == (committed / name).read_bytes(), name
    assert "FedAvg, no DP" in text and "DP-FedAvg" in text
    for png in (tables.ACCURACY_PNG, tables.DP_PNG):
        assert (copy / png).stat().st_size > 0
