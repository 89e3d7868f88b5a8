"""The round lifecycle: deadlines and presence, starting a round (selection, assignments), closing
it (the method's aggregate, checked, the history row), a failed round, the final evaluation.

The decisions themselves are the pure functions of :mod:`edge_runtime.round.server`; this class
applies them to the coordinator's persisted state and publishes the result.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from typing import TYPE_CHECKING

from broker_server import downlink
from broker_server.run_state import OPEN, Phase
from edge_runtime.algorithms.aggregation import Update
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.round.phases import describe_phases, round_phases
from edge_runtime.round.server import (aggregate_checked, as_update,
                                       configurator_row, describe_bytes, failed_row,
                                       note_privacy, record_eval, round_row,
                                       score_reports, select_participants)
from edge_runtime.service.faults import crash_point

if TYPE_CHECKING:
    from broker_server.coordinator import Coordinator

log = logging.getLogger("broker_server.coordinator")


class Rounds:
    """The coordinator's round steps; ``run`` is the coordinator (its state, store, fleet, method)."""

    def __init__(self, run: "Coordinator") -> None:
        self.run = run
        self._ticked_at = self._expired_at = 0.0
        self._eligible_since: float | None = None   # waiting for a later round: since when anyone is eligible

    def tick(self, force: bool = False) -> None:
        """Deadlines, presence, registry writes and round decisions. They walk the whole registry, so
        between messages they run at most every 0.1 s (``force``: now, after an accepted update)."""
        now = self.run.clock()
        if not force and now - self._ticked_at < 0.1:
            return
        self._ticked_at = now
        if now - self._expired_at >= 1.0:   # heartbeat timeouts are tens of seconds: once a second is enough
            self._expired_at = now
            gone = self.run.fleet.expire(now)
            if gone:
                log.info("no heartbeat from %s: marked offline", gone if len(gone) <= 10 else f"{len(gone)} devices")
        if self.run.fleet.dirty and now - self.run.flushed_at >= 1.0:   # registry changes: one append a second at most
            self.run.flush_registry()
        s = self.run.state
        if now < self.run.grace_until:   # just restarted: let the devices reappear before deciding anything
            eligible = set(self.run.fleet.eligible_ids(now))
            expected = s["participants"] or (s["history"][-1]["participants"] if s["history"] else [])
            if expected and not set(expected) <= eligible:
                return
            log.info("restart: every device of round %d is back; resuming", s["round"])
            self.run.grace_until = 0.0
        if s["phase"] == Phase.WAITING:
            nxt = s.get("next")
            eligible = self.run.fleet.eligible_ids(now)
            # a later round: as soon as --min-devices are back, or fewer once they have been back for the
            # grace period (a fleet that shrank below --min-devices still finishes its run)
            self._eligible_since = (self._eligible_since or now) if eligible else None
            if nxt and eligible and (len(eligible) >= self.run.cfg.min_devices
                                     or now - self._eligible_since >= self.run.cfg.restart_grace_s):
                self._start_round(nxt["round"], nxt["phase"])
            elif not nxt and len(eligible) >= self.run.cfg.min_devices:
                # methods that score layers first (FedPepTAO) open with a score round 0
                self._start_round(0, Phase.SCORE) if self.run.method.scoring else self._start_round(1, Phase.TRAIN)
        elif s["phase"] in OPEN:
            self._maybe_close(now)

    def _quorum_count(self) -> int:
        return max(1, math.ceil(self.run.cfg.quorum * len(self.run.state["participants"])))

    def _maybe_close(self, now: float) -> None:
        s = self.run.state
        accepted, participants = s["accepted"], s["participants"]
        if not participants:   # (a state saved by an older version) a round never runs without participants
            self._start_round(s["round"], s["phase"])
            return
        online = set(self.run.fleet.online_ids())
        waiting_on = [p for p in participants if p not in accepted and p in online]
        everyone = len(accepted) == len(participants)
        enough = len(accepted) >= self._quorum_count()
        if everyone or (enough and not waiting_on) or (enough and now >= s["deadline_at"]):
            self._close_round(now)
        elif now >= s["deadline_at"] and accepted and any(p not in accepted and p not in online
                                                          for p in participants):
            # participants that went offline do not hold the round hostage: they leave it, the quorum
            # is taken over those still in it (the next tick closes the round if that is enough)
            gone = [p for p in participants if p not in accepted and p not in online]
            s["participants"] = [p for p in participants if p not in gone]
            log.warning("round %d: %s offline at the deadline; they leave the round (%d/%d updates)", s["round"],
                        gone, len(accepted), len(s["participants"]))
            self.run.save()
            self.run.publish_manifest()
        elif now >= s["deadline_at"]:
            # not enough updates: keep what was accepted, open the round to every eligible device again
            eligible = set(self.run.fleet.eligible_ids(now))
            room = max(0, self.run.cfg.max_participants - len(participants))
            extra = sorted(eligible - set(participants))[:room]
            s["participants"] = sorted(set(participants) | set(extra))
            self._assign(extra)
            s["deadline_at"] = now + (self.run.cfg.eval_deadline_s if s["phase"] == Phase.EVALUATE else self.run.cfg.deadline_s)
            log.warning("round %d: %d/%d updates at the deadline; extending, adding %s", s["round"], len(accepted),
                        self._quorum_count(), extra)
            self.run.save()
            self.run.publish_manifest()

    def _select(self, round_: int) -> list[str]:
        """Eligible devices (online and heartbeating), sampled to ``devices_per_round``, capped at
        ``max_participants`` (keeping the devices that have done rounds first)."""
        pool = [d for d in self.run.fleet.eligible_ids(self.run.clock()) if self.run.may_speak(d)]
        return select_participants(pool, round_, self.run.cfg.seed, self.run.cfg.devices_per_round, self.run.cfg.max_participants,
                                   {d: self.run.fleet.devices[d].rounds_done for d in pool})

    def _start_round(self, round_: int, phase: Phase) -> None:
        self.run.ingest.dropped_payloads.clear()  # ids of the last round's refused payloads: their chunks are stale now
        s = self.run.state
        participants = self._select(round_)
        if not participants:   # nobody to run it: wait (persisted) until a device is eligible
            s.update(phase=Phase.WAITING.value, next={"round": round_, "phase": Phase(phase).value}, participants=[], accepted={})
            self.run.save()
            log.warning("round %d (%s) cannot start: no device is online and heartbeating; waiting", round_, phase)
            return
        s.pop("next", None)
        s.update(round=round_, phase=Phase(phase).value, participants=participants, accepted={},
                 round_started_at=self.run.clock(), assignments={}, configurator={},
                 deadline_at=self.run.clock() + (self.run.cfg.eval_deadline_s if phase == Phase.EVALUATE else self.run.cfg.deadline_s))
        if phase == Phase.TRAIN:
            self._assign(s["participants"])
        self.run.save()
        crash_point("round:after_save")
        self.run.notifier.status(self.run.status_line())
        log.info("round %d (%s) started: participants %s", round_, phase,
                 s["participants"] if len(s["participants"]) <= 20 else f"{len(s['participants'])} devices")
        self.run.publish_retained()

    def _assign(self, devices: list[str]) -> None:
        """The method's per-device settings for ``devices`` this round (DropPEFT's bandit: dropout
        configurations that fit each device's memory); earlier assignments of the round stay."""
        s = self.run.state
        if s["phase"] != Phase.TRAIN or not devices:
            return
        profiles = {d: (self.run.fleet.devices[d].profile if d in self.run.fleet.devices else {}) for d in devices}
        try:
            overrides, info = self.run.method.assign(self.run.configurator_state, profiles, self.run.spec,
                                                     s["round"])
        except (EdgeRuntimeError, OSError, ValueError) as exc:   # e.g. the model's config unreadable for the memory model
            log.error("round %d: the configurator failed (%s); devices train with the profile's own settings",
                      s["round"], exc)
            return
        s["assignments"] = {**overrides, **s.get("assignments", {})}
        s["configurator"] = {**info, **s.get("configurator", {})}
        for d in devices:
            if d in info:
                log.info("round %d: %s gets %s", s["round"], d, overrides[d])

    def _close_round(self, now: float) -> None:
        s = self.run.state
        r, accepted = s["round"], s["accepted"]
        if s["phase"] == Phase.SCORE:
            self._close_score_round(accepted)
            return
        self._record_eval(r - 1, accepted)
        if s["phase"] == Phase.EVALUATE:
            s["history"][-1]["final"] = True
            if self.run.on_done:  # outputs first: a crash before "done" is saved just redoes them
                self.run.on_done({**s, "devices": self.run.fleet.to_json()}, self.run.global_state)
            crash_point("done:before_save")
            s["phase"] = Phase.DONE.value
            self.run.save()
            self.run.publish_summary(s["history"][-1])
            self.run.publish_manifest()
            log.info("run %s done after %d rounds", self.run.run_id, self.run.cfg.rounds)
            return
        t_agg = time.perf_counter()
        updates = [as_update(dev, a, self.run.store.read_tensors(self.run.store.resolve(a["file"])))
                   for dev, a in sorted(accepted.items())]
        crash_point("close:before_aggregate")
        try:
            new_global, server_state, configurator_state, defence = aggregate_checked(
                self.run.method, self.run.global_state, updates, self.run.server_state, self.run.configurator_state,
                self.run.spec, self.run.fleet.active_count(accepted), r, self.run.sample_caps(accepted))
        except Exception as exc:  # noqa: BLE001 - a method's failure fails the round, never the server
            self._round_failed(now, updates, exc)
            return
        s["failed_rounds"] = 0
        self._persist_method_state(r, server_state, configurator_state)
        new_global = downlink.compress_global(self.run, r, new_global)   # what devices will hold, bit for bit
        path = self.run.store.global_path(r)
        self.run.global_blob = self.run.store.write_tensors(path, new_global)
        crash_point("close:after_global_write")
        self.run.global_state = new_global
        for dev in accepted:
            self.run.fleet.worked(dev)
        s["history"].append(round_row(r, s["participants"], accepted, len(self.run.global_blob), now - s["round_started_at"],
                                      configurator_row(self.run.method, s["configurator"], updates)
                                      if s.get("configurator") else None, defence,
                                      len(self.run.delta_blob) if self.run.delta_blob else None))
        s["history"][-1]["phases"] = round_phases(accepted, s["round_started_at"], now, time.perf_counter() - t_agg)
        note_privacy(s["history"], self.run.spec)
        s["global_file"] = self.run.store.relative(path)
        log.info("round %d closed: %d update(s) averaged; %s; %s", r, len(accepted), describe_bytes(s["history"][-1]),
                 describe_phases(s["history"][-1]) or "no phase timings")
        self._start_round(r + 1, Phase.EVALUATE if r >= self.run.cfg.rounds else Phase.TRAIN)
        self._prune(r)

    def _round_failed(self, now: float, updates: list[Update], exc: Exception) -> None:
        """The method could not aggregate: the round is skipped (the global stays), the failure is in the
        history and in ``errors``; after ``max_failed_rounds`` in a row the run is failed."""
        s, r = self.run.state, self.run.state["round"]
        log.error("round %d: aggregating %d update(s) failed (%s: %s); the global stays as it was", r,
                  len(updates), type(exc).__name__, exc)
        self.run.record_error(f"aggregating round {r}", exc)
        s["failed_rounds"] = s.get("failed_rounds", 0) + 1
        prev = self.run.store.global_path(r - 1)
        downlink.clear_delta(self.run)   # devices hold this global already
        self.run.global_blob = self.run.store.write_tensors(self.run.store.global_path(r), self.run.global_state)
        s["history"].append(failed_row(r, s["participants"], s["accepted"], now - s["round_started_at"],
                                       f"{type(exc).__name__}: {exc}", prev.name))
        s["global_file"] = self.run.store.relative(self.run.store.global_path(r))
        if s["failed_rounds"] >= self.run.cfg.max_failed_rounds:
            s.update(phase=Phase.FAILED.value, participants=[], accepted={})
            self.run.save()
            log.error("run %s failed: %d rounds in a row could not be aggregated (last: %s)", self.run.run_id,
                      s["failed_rounds"], exc)
            return
        self._start_round(r + 1, Phase.EVALUATE if r >= self.run.cfg.rounds else Phase.TRAIN)

    def _close_score_round(self, accepted: dict) -> None:
        """Score round: the devices' layer scores give the global its layout; training starts."""
        reports = score_reports(accepted)
        new_global, info = self.run.method.select(self.run.global_state, reports, self.run.spec)
        path = self.run.store.global_path(0)
        downlink.clear_delta(self.run)   # a new layout: devices fetch it whole
        self.run.global_blob = self.run.store.write_tensors(path, new_global)
        self.run.global_state = new_global
        self.run.state["selection"] = {**info, "devices": sorted(accepted)}
        log.info("score round closed (%d device(s)): shared layers %s", len(accepted), info.get("shared_layers"))
        self._start_round(1, Phase.TRAIN)

    def _record_eval(self, global_round: int, accepted: dict) -> None:
        """Devices evaluated the global they received (the one after ``global_round``): fill that row in."""
        row = record_eval(self.run.state["history"], global_round, accepted)
        if row is not None and self.run.state["phase"] != Phase.EVALUATE:
            self.run.publish_summary(row)

    def _persist_method_state(self, r: int, server_state: dict, configurator_state: dict) -> None:
        """The method's server tensors and configurator state after round ``r``: each file written
        before the state points at it (a crash redoes the round from the old ones), the state held
        in memory only once both are on disk; an empty one points at no file."""
        s, root = self.run.state, self.run.store.root
        files = {}
        if server_state:
            files["server_file"] = root / "server" / f"round_{r:05d}.safetensors"
            self.run.store.write_tensors(files["server_file"], server_state)
        if configurator_state:
            files["configurator_file"] = root / "server" / f"configurator_{r:05d}.json"
            self.run.store.write_json(files["configurator_file"], configurator_state)
        for key in ("server_file", "configurator_file"):
            if key in files:
                s[key] = self.run.store.relative(files[key])
            else:
                s.pop(key, None)
        self.run.server_state, self.run.configurator_state = server_state, configurator_state

    def _prune(self, closed_round: int) -> None:
        """Keep the update files of the last two rounds (older ones were aggregated and persisted)."""
        old = self.run.store.root / "updates" / f"round_{closed_round - 2:05d}"
        if closed_round >= 2 and old.exists():
            shutil.rmtree(old, ignore_errors=True)
        if closed_round >= 2:  # the method's server state: the current one and the one before suffice
            (self.run.store.root / "server" / f"round_{closed_round - 2:05d}.safetensors").unlink(missing_ok=True)
            (self.run.store.root / "server" / f"configurator_{closed_round - 2:05d}.json").unlink(missing_ok=True)
            downlink.prune(self.run, closed_round)
