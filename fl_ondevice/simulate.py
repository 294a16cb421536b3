"""`python -m fl_ondevice.simulate`: compose the Hydra config, validate it, run the simulation."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

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
from hydra.experimental.callback import Callback  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fl_ondevice.config import Config, parse_config  # noqa: E402
from fl_ondevice.errors import EngineError, FlOnDeviceError  # noqa: E402
from fl_ondevice.outputs.results import summary_line  # noqa: E402
from fl_ondevice.outputs.sweep import record_error, sweep_summary  # noqa: E402

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

    from fl_ondevice.server.prepare import Prepared

log = logging.getLogger("fl_ondevice")


def backend_config(cfg: Config) -> dict[str, Any]:
    """Ray settings: one actor per ``client.num_cpus`` of the machine's cores, or of the
    cluster's at ``backend.address``; and the node config of the simulated nodes
    (``fl_ondevice.wire.node``), which the engine gives its workers."""
    from fl_ondevice.wire.node import BACKEND_KEY, local_node_config

    init: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if cfg.backend.address is None:  # "local": a new instance even if `ray start` ran here
        init.update(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False)
    else:
        init.update(address=cfg.backend.address)
    return {
        "client_resources": {"num_cpus": cfg.client.num_cpus, "num_gpus": 0.0},
        "init_args": init,
        BACKEND_KEY: local_node_config(cfg),
    }


def engine_nodes(prep: Prepared, engine_workers: int) -> int:
    """Simulated nodes a run needs: the engine messages of its largest round.

    The round sizes come from the strategy's sampling settings (``fraction_train``,
    ``min_train_nodes``, and the evaluate pair) where it has them, else every client. More nodes
    than messages cost Flower's engine a look at every node on each 0.1 s poll.
    """
    from fl_ondevice.server.strategy import sample_size, setting
    from fl_ondevice.wire.grouping import messages_per_round

    cfg, strategy = prep.cfg, prep.strategy
    n = cfg.num_clients
    largest = n
    fraction = setting(strategy, "fraction_train")
    if fraction is not None:
        largest = sample_size(n, fraction, int(setting(strategy, "min_train_nodes")))
        evaluate = float(setting(strategy, "fraction_evaluate"))
        if evaluate > 0:
            minimum = int(setting(strategy, "min_evaluate_nodes"))
            largest = max(largest, sample_size(n, evaluate, minimum))
    return messages_per_round(min(largest, n), engine_workers, cfg.client.clients_per_message)


def import_flower_simulation() -> None:
    """Import Flower's simulation package without the TensorFlow it would import.

    ``flwr.simulation.ray_transport.utils`` runs ``import tensorflow`` whenever TensorFlow is
    installed, for a GPU-growth helper that fl_ondevice never calls: in this process that costs
    ~660 MiB for the whole run and prints TensorFlow's start-up lines to the console. Blocked
    here as in the workers (``fl_ondevice.runtime.cluster.SETUP_HOOK``), for this import only: a
    later ``import tensorflow`` (a conversion, the final checkpoint) works as usual.
    """
    from fl_ondevice.ondevice.interpreters import (
        allow_tensorflow,
        block_tensorflow,
        tensorflow_imported,
    )

    if "flwr.simulation" in sys.modules or tensorflow_imported():
        return
    block_tensorflow()
    try:
        import flwr.simulation  # noqa: F401 - imported for the engine, which uses it later
    finally:
        allow_tensorflow()


def simulate(
    cfg: Config,
    overrides: dict[str, Any] | None = None,
    client_app: ClientApp | None = None,
    keep_engine: bool = False,
) -> dict[str, Any]:
    """Run one simulation end to end and return its summary.

    Everything that can fail on bad input (data, partitions, model, strategy, config) is
    checked here, before the simulation engine starts. ``keep_engine`` leaves the engine up
    for the next run of this process (a sweep's next job; ``fl_ondevice.runtime.engine``).
    ``client_app`` replaces fl_ondevice's ClientApp (e.g. a misbehaving device in a test).
    """
    from fl_ondevice.client.client_app import app as default_client_app
    from fl_ondevice.console import native_stderr_to_log, quiet_libraries
    from fl_ondevice.runtime.cluster import check_cpus, connect, engine_workers
    from fl_ondevice.runtime.engine import abandon_engine, close_engine, engine_for
    from fl_ondevice.server.prepare import prepare
    from fl_ondevice.server.server import write_model_files

    with native_stderr_to_log():  # the TF converter's and TFLite runtime's own lines
        prep = prepare(cfg)
    quiet_libraries()
    backend = backend_config(cfg)
    # backend.address: join the Ray cluster now, or say why not; an engine of a sweep's earlier
    # job on another Ray is stopped first.
    connect(cfg, backend, stop_engine=close_engine)
    check_cpus(cfg)
    workers = engine_workers(cfg)
    import_flower_simulation()  # before the engine's thread imports it, importing TensorFlow
    engine = engine_for(engine_nodes(prep, workers), backend, client_app or default_client_app)
    try:
        # A run that stops the engine writes the TensorFlow-made files after it: TensorFlow
        # (~660 MiB) and the Ray workers are then never resident at once.
        summary = engine.run(prep, workers, overrides, model_files=keep_engine)
    except KeyboardInterrupt:
        abandon_engine()  # do not wait for the round in flight: it ends with the process
        raise
    if not keep_engine:
        close_engine()
        write_model_files(prep)
    return summary


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final accuracy (for Hydra sweepers)."""
    from fl_ondevice.console import quiet_console

    quiet_console()
    hc = HydraConfig.get()
    overrides = dict(o.split("=", 1) for o in hc.overrides.task if "=" in o)
    run_dir = hc.runtime.output_dir
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops a run as Ctrl-C does
    try:
        cfg = parse_config(dcfg)
        if cfg.resume:
            from fl_ondevice.server.resume import resumed_config

            ignored = sorted(set(overrides) - {"resume"})
            if ignored:
                log.warning("resume: the run's saved config is used; ignoring %s", ignored)
            cfg = resumed_config(cfg.resume)
        run_dir = cfg.output_dir
        summary = simulate(cfg, overrides, keep_engine=hc.mode == RunMode.MULTIRUN)
    except EngineError as err:  # its threads would hold the process at exit: leave at once
        log.error("%s; the run directory keeps each completed round (resume=%s)", err, run_dir)
        _exit_now(1)
    except FlOnDeviceError as err:
        log.error("%s", err)
        if hc.mode == RunMode.MULTIRUN:
            # The sweep goes on; the summary lists this job with its error.
            record_error(hc.runtime.output_dir, overrides, err)
            return None
        sys.exit(2)
    except KeyboardInterrupt as stop:
        _stop(run_dir, stop.args[0] if stop.args else signal.SIGINT)
    print(summary_line(summary, cfg.output_dir))
    return float(summary["final_accuracy"])


class SweepSummaryCallback(Callback):
    """Hydra callback (conf/hydra/default.yaml): when a sweep ends, stop the engine its jobs
    shared and write summary.csv/png."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from fl_ondevice.runtime.engine import close_engine

        close_engine()
        sweep_summary(config.hydra.sweep.dir)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signum)


def _stop(run_dir: str, signum: int) -> NoReturn:
    """After Ctrl-C or SIGTERM: say which round the run directory keeps and how to go on, stop
    Ray, and exit with 128 + the signal's number.

    The engine's threads are not waited for: the round in flight would hold the exit for its
    whole length, and Flower's executor would hang at the interpreter's exit. Stopping at any
    moment is safe because every file of a round is written aside and renamed, ``state.json``
    last (``fl_ondevice.server.resume``).
    """
    from fl_ondevice.server.resume import SAVING, log_stopped

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C while stopping changes nothing
    SAVING.acquire(timeout=SAVE_WAIT_SECONDS)  # no round is saved after this one is read
    log_stopped(signum, run_dir, "fl_ondevice.simulate")
    _exit_now(128 + signum)


def _exit_now(code: int) -> NoReturn:
    """Stop the Ray processes this process started and exit without waiting for the engine's
    threads."""
    for name in ["flwr", "ray", *logging.root.manager.loggerDict]:
        if name.split(".")[0] in ("flwr", "ray"):  # the engine's threads report what Ray drops
            logging.getLogger(name).disabled = True
    _stop_local_ray()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


SAVE_WAIT_SECONDS = 5.0  # the longest a stop waits for a round being saved


def _stop_local_ray() -> None:
    # SIGTERM to the processes of a Ray instance this process started and their children (a
    # cluster it joined keeps running). Not ray.shutdown(): it shuts this process's
    # Ray worker down first, and an engine thread that submits a client meanwhile makes Ray
    # end the process with exit code 1 instead of ours.
    if "ray" not in sys.modules:
        return
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not node.is_head():
        return
    from fl_ondevice.processes import descendants, process_table

    started = {info.process.pid for infos in node.all_processes.values() for info in infos}
    for pid in started | descendants(started, process_table()):  # the agents of the raylet
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


if __name__ == "__main__":
    main()
