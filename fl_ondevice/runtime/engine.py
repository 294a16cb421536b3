"""Flower's simulation engine, started once and kept running across the runs of one process.

Starting the engine costs seconds (Ray, then one worker process per core), more than a small
run itself. The engine runs ``flwr.simulation.run_simulation`` in a background thread with a
ServerApp that serves runs from a queue, so the jobs of a sweep, or the runs of a test session,
share one start-up. Simulated nodes are executors that hold no client state (the server names
each message's clients), which is what makes them shareable.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fl_ondevice.errors import EngineError
from fl_ondevice.runtime.cluster import start_ray
from fl_ondevice.server.prepare import Prepared
from fl_ondevice.server.server import run_server

log = logging.getLogger(__name__)


@dataclass
class _Job:
    prep: Prepared
    engine_workers: int
    overrides: dict[str, Any] | None
    model_files: bool
    done: threading.Event = field(default_factory=threading.Event)
    summary: dict[str, Any] | None = None
    error: BaseException | None = None


class Engine:
    """A running simulation engine with ``nodes`` simulated nodes and ``client_app``.

    Parameters
    ----------
    nodes
        Simulated nodes: at least the engine messages of a run's largest round.
    backend_config
        Flower's backend config (Ray resources per client, ``ray.init`` arguments), plus
        ``node_config``: the settings of every simulated node (``fl_ondevice.wire.node``), which
        ``fl_ondevice.runtime.cluster.start_ray`` gives the workers.
    client_app
        The ClientApp every node runs.
    """

    def __init__(self, nodes: int, backend_config: dict[str, Any], client_app: ClientApp) -> None:
        self.nodes, self.backend_config, self.client_app = nodes, backend_config, client_app
        start_ray(backend_config)  # Flower's engine uses it instead of starting its own
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        server_app = ServerApp()
        server_app.main()(self._serve)
        self._thread = threading.Thread(
            target=self._simulate, args=(server_app,), name="fl_ondevice-engine", daemon=True
        )
        self._thread.start()

    def fits(self, nodes: int, backend_config: dict[str, Any], client_app: ClientApp) -> bool:
        """Whether a run needing these can run on this engine."""
        return (
            not self._stopped.is_set()
            and nodes <= self.nodes
            and backend_config == self.backend_config
            and client_app is self.client_app
        )

    def run(
        self,
        prep: Prepared,
        engine_workers: int,
        overrides: dict[str, Any] | None = None,
        model_files: bool = True,
    ) -> dict[str, Any]:
        """Run ``prep`` to the end on this engine and return its summary (or raise its error).

        ``engine_workers``: the clients the engine trains at once
        (``fl_ondevice.runtime.cluster.engine_workers``).

        ``model_files=False``: without ``global_model.ckpt`` and ``.tflite``
        (``fl_ondevice.server.server.write_model_files`` writes them later).
        """
        job = _Job(prep, engine_workers, overrides, model_files)
        self._jobs.put(job)
        while not job.done.wait(0.2):
            if self._stopped.is_set():
                raise EngineError(
                    f"the simulation engine stopped during the run ({self._error!r}); the log "
                    "above has its error"
                )
        if job.error is not None:
            raise job.error
        assert job.summary is not None
        return job.summary

    def close(self) -> None:
        """Stop the engine after the current run: Ray and its workers end."""
        if not self._stopped.is_set():
            self._jobs.put(None)
            self._thread.join()

    def _simulate(self, server_app: ServerApp) -> None:
        from flwr.simulation import run_simulation

        try:
            run_simulation(
                server_app=server_app,
                client_app=self.client_app,
                num_supernodes=self.nodes,
                backend_config=self.backend_config,  # type: ignore[arg-type]
            )
        except BaseException as err:  # noqa: BLE001 - reported to the waiting run
            self._error = err
        finally:
            self._stopped.set()

    def _serve(self, grid: Grid, context: Context) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.summary = run_server(
                    grid,
                    job.prep,
                    job.overrides,
                    engine_workers=job.engine_workers,
                    model_files=job.model_files,
                )
            except BaseException as err:  # noqa: BLE001 - handed to the caller of run()
                job.error = err
            finally:
                job.done.set()


_ENGINE: list[Engine] = []  # this process's engine, if one runs


def engine_for(nodes: int, backend_config: dict[str, Any], client_app: ClientApp) -> Engine:
    """This process's engine if it fits the run, else a new one (the old one is stopped).

    A new engine gets at least as many nodes as the last one had, so that a sweep (or a test
    session) restarts only when its runs grow, not back and forth.
    """
    if _ENGINE and _ENGINE[0].fits(nodes, backend_config, client_app):
        return _ENGINE[0]
    nodes = max(nodes, _ENGINE[0].nodes if _ENGINE else 1)
    close_engine()
    _ENGINE.append(Engine(nodes, backend_config, client_app))
    return _ENGINE[0]


def close_engine() -> None:
    """Stop this process's engine, if one runs."""
    while _ENGINE:
        _ENGINE.pop().close()


def abandon_engine() -> None:
    """Forget the engine without waiting for its run (Ctrl-C): it ends with the process."""
    _ENGINE.clear()


# Flower's simulation runs non-daemon threads, which the interpreter joins at exit before it
# runs `atexit` handlers: an engine still up then would never stop. Hooks registered with
# threading's own exit list run before that join (concurrent.futures relies on the same hook).
getattr(threading, "_register_atexit", atexit.register)(close_engine)
