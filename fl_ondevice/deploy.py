"""``python -m fl_ondevice.deploy``: the run of ``fl_ondevice.simulate`` on Flower's Deployment
Engine, with one SuperLink and ``num_nodes`` SuperNodes started on this machine.

Same config groups as ``simulate`` plus ``num_nodes`` and ``insecure`` (``conf/deploy.yaml``).
It checks the config as ``simulate`` does, packages this run as a Flower app (fl_ondevice's code
and a pyproject.toml whose run config is the whole composed config), starts the SuperLink and
SuperNodes (TLS and SuperNode authentication unless ``insecure=true``;
``fl_ondevice.runtime.federation``),
submits the app with ``flwr run``, shows the ServerApp's progress lines, and writes the same run
directory as ``simulate``. Each SuperNode owns one partition (``partition-id=i
num-partitions=num_nodes``), so ``num_clients`` is ``num_nodes``. Every process it started is
stopped on success, on error and on Ctrl-C; ``RUN_DIR/deploy/`` keeps their logs, the
certificates, keys and the SuperNode commands (``nodes.json``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import hydra
from flwr.common.config import unflatten_dict
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import fl_ondevice
from fl_ondevice.config import Config, DeployConfig, to_dataclass, to_run_config
from fl_ondevice.errors import FlOnDeviceError
from fl_ondevice.runtime.federation import CONNECTION, Federation, FederationError, become_subreaper

log = logging.getLogger("fl_ondevice.deploy")

_OUR_LINE = re.compile(r"^\[[^\]]*\]\[(fl_ondevice[\w.]*)\]\[(\w+)\] - (.*)$")
WATCH_SECONDS = 0.5  # how often the SuperLink's process is looked at during the run


def parse_deploy(node: DictConfig) -> tuple[Config, DeployConfig]:
    """The run's ``Config`` and the deploy settings, validated (``ConfigError`` on bad input)."""
    deploy = to_dataclass(DeployConfig, node, "config")
    names = {f.name for f in fields(Config)}
    cfg = Config(**{k: v for k, v in vars(deploy).items() if k in names})
    return cfg, deploy


def write_app(directory: Path, cfg: Config) -> Path:
    """This run as a Flower app: fl_ondevice's package and a pyproject.toml whose run config is
    ``cfg`` (any strategy's arguments and mods included, which ``flwr run --run-config`` could
    not add to pyproject's keys)."""
    import tomli_w

    shutil.rmtree(directory, ignore_errors=True)
    package = Path(fl_ondevice.__file__).parent
    shutil.copytree(
        package, directory / "fl_ondevice", ignore=shutil.ignore_patterns("__pycache__")
    )
    project = {
        "project": {
            "name": "fl-ondevice",
            "version": "0.1.0",
            "description": "fl_ondevice run packaged by python -m fl_ondevice.deploy",
            "license": "Apache-2.0",
            "dependencies": [],  # the nodes' environment has them; no install per run
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fl_ondevice",
                    "components": {
                        "serverapp": "fl_ondevice.server.server_app:app",
                        "clientapp": "fl_ondevice.client.client_app:app",
                    },
                    "config": unflatten_dict(to_run_config(cfg)),
                }
            }
        },
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(project))
    return directory


def deploy(cfg: Config, insecure: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on a SuperLink and ``cfg.num_clients`` SuperNodes started here; return the
    run's summary. Raises ``FlOnDeviceError`` subclasses with what went wrong."""
    from fl_ondevice.console import native_stderr_to_log
    from fl_ondevice.server.prepare import prepare
    from fl_ondevice.wire.node import local_node_config

    with native_stderr_to_log():
        prepare(cfg)  # bad input fails here, before any process starts; warms the model cache
    out = Path(cfg.output_dir)
    work = out / "deploy"
    app = write_app(work / "app", cfg)
    with Federation(work, cfg.num_clients, insecure, local_node_config(cfg)) as fed:
        fed.start()
        log.info(
            "%d SuperNodes online (%s); logs in %s",
            cfg.num_clients,
            "insecure" if insecure else "TLS, authenticated",
            work,
        )
        run_id = str(fed.flwr_json("run", str(app), CONNECTION)["run-id"])
        _follow(fed, run_id, work / "serverapp.log")
    doc = json.loads((out / "metrics.json").read_text())
    return dict(doc["summary"])


def _follow(fed: Federation, run_id: str, log_path: Path) -> None:
    # Show the ServerApp's lines as they come (`flwr log --stream`, which ends with the run),
    # watch the SuperLink meanwhile, then read how the run ended.
    stream = subprocess.Popen(
        fed.flwr_command("log", run_id, CONNECTION, "--stream"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=fed.cli_env(),
    )
    relay = threading.Thread(target=_relay, args=(stream, log_path), daemon=True)
    relay.start()
    try:
        while stream.poll() is None:
            fed.check()
            time.sleep(WATCH_SECONDS)
    finally:
        if stream.poll() is None:
            stream.kill()
        stream.wait()
        relay.join(timeout=5)
    run = fed.flwr_json("list", CONNECTION, "--run-id", run_id)["runs"][0]
    if run["status"] != "finished:completed":
        raise FederationError(
            f"the run ended {run['status']}: {run.get('status-details', '')}; the ServerApp's "
            f"log: {log_path}"
        )


def _relay(stream: subprocess.Popen, log_path: Path) -> None:
    assert stream.stdout is not None
    with open(log_path, "a") as keep:
        for line in stream.stdout:
            keep.write(line)
            keep.flush()
            match = _OUR_LINE.match(line.rstrip("\n"))
            if match:
                name, level, message = match.groups()
                level_no = logging.getLevelNamesMapping().get(level, logging.INFO)
                logging.getLogger(name).log(level_no, "%s", message)


@hydra.main(config_path="../conf", config_name="deploy", version_base=None)
def main(dcfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final accuracy."""
    from fl_ondevice.console import quiet_console
    from fl_ondevice.outputs.results import summary_line

    quiet_console()
    become_subreaper()
    run_dir = HydraConfig.get().runtime.output_dir
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cfg, settings = parse_deploy(dcfg)
        if cfg.resume:
            from fl_ondevice.server.resume import resumed_config

            cfg = resumed_config(cfg.resume)
        run_dir = cfg.output_dir
        summary = deploy(cfg, settings.insecure)
    except FlOnDeviceError as err:
        log.error("%s", err)
        _resume_hint(run_dir)
        sys.exit(2)
    except KeyboardInterrupt as stop:  # the processes are stopped by now (Federation.stop)
        from fl_ondevice.server.resume import log_stopped

        signum = stop.args[0] if stop.args else signal.SIGINT
        log_stopped(signum, run_dir, "fl_ondevice.deploy")
        logging.shutdown()
        sys.exit(128 + signum)
    print(summary_line(summary, cfg.output_dir))
    return float(summary["final_accuracy"])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signum)


def _resume_hint(run_dir: str) -> None:
    from fl_ondevice.server.resume import completed_round

    done = completed_round(run_dir)
    if done is not None:
        log.error(
            "the run directory keeps rounds up to %d; continue with: "
            "python -m fl_ondevice.deploy resume=%s",
            done,
            run_dir,
        )


if __name__ == "__main__":
    # conf/config.yaml's schema, for this process only: importing this module (tests, other
    # tools) leaves `simulate`'s schema alone.
    ConfigStore.instance().store(name="schema", node=DeployConfig)
    main()
