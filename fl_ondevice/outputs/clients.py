"""``clients.csv``: one row per client, its data and what it did in the run."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from fl_ondevice.outputs.results import write_csv

CLIENTS_CSV = "clients.csv"  # one row per client: its data, rounds taken part, local accuracy


@dataclass
class ClientRecord:
    """One row of ``clients.csv``: a client's data and what it did in the run."""

    client: int
    examples: int  # local train split
    test_examples: int  # local test split
    labels: str  # the labels it holds (train and local test), e.g. "0;3;7"
    num_labels: int
    rounds: int = 0  # training rounds in which its update was valid and the round not skipped
    train_rounds: str = ""  # which ones, e.g. "2;9;14" (a resumed run keeps those it reached)
    last_eval_round: int | None = None  # the last round it was evaluated in (None: never)
    local_acc_global: float | None = None  # the global model's accuracy on its local test split
    local_acc_personal: float | None = None  # ... fine-tuned (personalize.epochs > 0)
    local_epsilon: float | None = None  # with LocalDpMod: its local epsilon over its rounds


CLIENT_COLUMNS = tuple(f.name for f in fields(ClientRecord))


def write_clients(records: Sequence[ClientRecord], path: str | os.PathLike[str]) -> None:
    """Write ``clients.csv``: one row per client, in client order."""
    rows = [{c: getattr(r, c) for c in CLIENT_COLUMNS} for r in records]
    write_csv(Path(path), CLIENT_COLUMNS, rows)


def resumed_clients(
    records: Sequence[ClientRecord], path: str | os.PathLike[str], resumed_round: int
) -> list[ClientRecord]:
    """``records`` with what an interrupted run's ``clients.csv`` at ``path`` says about
    rounds up to ``resumed_round`` (the round the run continues after); a local accuracy from
    a later round is dropped, the one before it unknown. A missing file changes nothing."""
    if not Path(path).is_file():
        return list(records)
    with Path(path).open() as f:
        saved = {int(row["client"]): row for row in csv.DictReader(f)}
    out = []
    for record in records:
        row = saved.get(record.client)
        if row is None:
            out.append(record)
            continue
        taken = [r for r in row["train_rounds"].split(";") if r and int(r) <= resumed_round]
        evaluated = bool(row["last_eval_round"]) and int(row["last_eval_round"]) <= resumed_round
        out.append(
            replace(
                record,
                rounds=len(taken),
                train_rounds=";".join(taken),
                last_eval_round=int(row["last_eval_round"]) if evaluated else None,
                local_acc_global=_float(row["local_acc_global"]) if evaluated else None,
                local_acc_personal=_float(row["local_acc_personal"]) if evaluated else None,
            )
        )
    return out


def _float(cell: str) -> float | None:
    return float(cell) if cell else None
