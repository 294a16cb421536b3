"""`python -m fl_ondevice.simulate`: compose the Hydra config, validate it, run the simulation."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

# Before flwr is imported: no usage telemetry from research runs.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Ray workers inherit the driver's environment. One TF/BLAS thread per worker: the engine runs
# one client per core, and TF's own thread pools would oversubscribe the cores.
for _var in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# Keep Ray's current behaviour with num_gpus=0 and silence its FutureWarning about changing it.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fl_ondevice.config import Config, parse_config  # noqa: E402
from fl_ondevice.errors import FlOnDeviceError  # noqa: E402
from fl_ondevice.results import record_error  # noqa: E402

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

log = logging.getLogger("fl_ondevice")


def backend_config(cfg: Config) -> dict[str, Any]:
    """Ray settings: one actor per ``client.num_cpus`` of the machine's cores."""
    return {
        "client_resources": {"num_cpus": cfg.client.num_cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
            "include_dashboard": False,
        },
    }


def simulate(
    cfg: Config, overrides: dict[str, Any] | None = None, client_app: ClientApp | None = None
) -> dict[str, Any]:
    """Run one simulation end to end and return its summary.

    Everything that can fail on bad input (data, partitions, model, config) is checked here,
    before the simulation engine starts. ``client_app`` replaces fl_ondevice's ClientApp (e.g.
    a misbehaving device in a test).
    """
    from flwr.simulation import run_simulation

    from fl_ondevice.client_app import app as default_client_app
    from fl_ondevice.server_app import make_server_app, prepare

    prep = prepare(cfg)
    server_app = make_server_app(prep, overrides)
    # Flower prints through its own handler; per-message INFO lines would bury the progress lines.
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    flwr_log.propagate = False
    if not any(isinstance(f, _ClientCrashEcho) for f in flwr_log.filters):
        flwr_log.addFilter(_ClientCrashEcho())
    logging.getLogger("alembic").setLevel(logging.WARNING)
    run_simulation(
        server_app=server_app,
        client_app=client_app or default_client_app,
        num_supernodes=cfg.nodes,  # nodes are executors; the server names their clients
        backend_config=backend_config(cfg),  # type: ignore[arg-type]
    )
    summary = getattr(server_app, "summary", None)
    if summary is None:
        raise RuntimeError(
            "the simulation ended without results; the log above has the ServerApp's error"
        )
    return summary


class _ClientCrashEcho(logging.Filter):
    """Drop the engine's stack dump of a client crash: the strategy logs it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ClientAppException" not in f"{type(record.msg).__name__} {record.msg}"


def summary_line(summary: dict[str, Any], out_dir: str) -> str:
    """One line a researcher reads at the end of a run."""
    parts = [
        f"final accuracy {summary['final_accuracy']:.4f}",
        f"best {summary['best_accuracy']:.4f}",
        f"{summary['rounds']} rounds",
        f"{summary['seconds_per_round']:.2f} s/round",
    ]
    if summary.get("target_accuracy"):
        reached = summary["rounds_to_target"]
        parts.append(
            f"target {summary['target_accuracy']} reached in round {reached}"
            if reached
            else f"target {summary['target_accuracy']} not reached"
        )
    return f"fl_ondevice: {', '.join(parts)} -> {out_dir}"


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final accuracy (for Hydra sweepers)."""
    hc = HydraConfig.get()
    overrides = dict(o.split("=", 1) for o in hc.overrides.task if "=" in o)
    try:
        cfg = parse_config(dcfg)
        if cfg.resume:
            from fl_ondevice.server_app import resumed_config

            ignored = sorted(set(overrides) - {"resume"})
            if ignored:
                log.warning("resume: the run's saved config is used; ignoring %s", ignored)
            cfg = resumed_config(cfg.resume)
        summary = simulate(cfg, overrides)
    except FlOnDeviceError as err:
        log.error("%s", err)
        if hc.mode == RunMode.MULTIRUN:
            # The sweep goes on; the summary lists this job with its error.
            record_error(hc.runtime.output_dir, overrides, err)
            return None
        sys.exit(2)
    print(summary_line(summary, cfg.output_dir))
    return float(summary["final_accuracy"])


if __name__ == "__main__":
    main()
