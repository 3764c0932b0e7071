"""The adaptive sweep's decision log, read back for the report.

`steerscale run --adaptive` (orchestrator/adaptive.py) writes `<results_dir>/adaptive.jsonl`
beside the rows: every cell it chose and why, each round's target intervals, and why it stopped.
The analysis side only reads it, so that anyone looking at a report can see which cells were run on
purpose and how far the intervals narrowed for the compute spent — without the orchestrator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from analysis.io import resolve

LOG_NAME = "adaptive.jsonl"


@dataclass(frozen=True)
class Decisions:
    """The events of one results directory's log, split by kind (each keeps the log's order)."""

    choices: list[dict]
    rounds: list[dict]
    stops: list[dict]
    stopped: bool = False  # the log ends at a stop: no round, choice or resume came after the last one

    @property
    def final_targets(self) -> list[dict]:
        """The intervals of the latest round or stop that fitted anything (a stop repeats its round's;
        after a resume, the new rounds' are the latest)."""
        fitted = [event for event in self.rounds + self.stops if event.get("targets")]
        latest = max(fitted, key=lambda event: (event["round"], event["event"] == "stop"), default=None)
        return latest["targets"] if latest else []

    def width_history(self) -> dict[tuple[str, str], list[tuple[float, float]]]:
        """(target, unit) -> [(post-training FLOPs spent, interval width)] over the fitted rounds: the wider of its
        stored and fresh-noise widths, both of which the stop holds to the goal (logs without the latter: the stored).
        A round at the FLOPs of the point before it (a stopped run rerun: it fits the same rows again) replaces it."""
        history: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for event in self.rounds:
            for target in event["targets"]:
                widths = [w for w in (target.get("width"), target.get("fresh_width")) if w is not None]
                if not widths:
                    continue
                points = history.setdefault((target["target"], target["unit"]), [])
                if points and points[-1][0] == event["flops_spent"]:
                    points.pop()
                points.append((event["flops_spent"], max(widths)))
        return history


def read_decisions(results_dir: str) -> Decisions | None:
    """The log of `results_dir`, or None when the sweep was not run with --adaptive."""
    fs, root = resolve(results_dir)
    try:
        with fs.open_input_stream(f"{root}/{LOG_NAME}") as stream:
            text = stream.read().decode()
    except FileNotFoundError:
        return None
    return parse_decisions(text)


def parse_events(text: str) -> list[dict]:
    """The log's events in order, one JSON object a line (what the orchestrator's loop also resumes from)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def parse_decisions(text: str) -> Decisions:
    by_kind: dict[str, list[dict]] = {"choice": [], "round": [], "stop": []}
    events = parse_events(text)
    for event in events:
        by_kind.get(event.get("event", ""), []).append(event)
    stopped = bool(events) and events[-1].get("event") == "stop"
    return Decisions(by_kind["choice"], by_kind["round"], by_kind["stop"], stopped)
