"""Runs as resources: inspect, reattach, stop; and a session's runs.

* ``GET /v1/runs/{run_id}``: the run's record (owner only; others get 404).
* ``GET /v1/runs/{run_id}/events``: the run's native events from the start,
  or after ``Last-Event-ID: <run_id>:<seq>`` / ``?after=<seq>``, then live
  until the terminal event; NDJSON with ``Accept: application/x-ndjson``,
  else SSE. A reader here only watches: leaving does not cancel the run.
  Past retention: 410.
* ``POST /v1/runs/{run_id}/cancel``: the Stop button (reason
  ``client_stop``); idempotent; answers the record with the final status.
* ``GET /v1/sessions/{session_id}``: the current run and recent runs.
"""

from __future__ import annotations

import re
from typing import Any

import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio

from ..cluster.records import result_of
from ..core.events import CancelReason
from ..core.registry import Gone
from ..core.result import RunResult
from ..core.run import Run
from ..store import StoreError
from ..wire import NativeNdjsonEncoder, NativeSseEncoder
from ..wire.native import usage_dict
from .errors import ApiError
from .remote_stream import RemoteStream
from .requests import parse_session_id
from .state import AppState
from .streaming import RunStream, StreamResponse

RECENT_RUNS = 10
SEQ = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also takes "²"
# What server.core.run.new_run_id makes. Anything else is no run of ours and
# never reaches the shared state (a run id is part of its key names).
RUN_ID = re.compile(r"run_[0-9a-f]{32}")


def run_json(result: RunResult) -> dict[str, Any]:
    """A run's record as the API shows it: a live run's snapshot, an ended
    run's result, or what the store kept (``events`` and ``finish_reason``
    then ``null``)."""
    error = result.error
    return {
        "id": result.run_id,
        "object": "run",
        "session_id": result.session_id,
        "status": result.status.value,
        "cancel_reason": result.cancel_reason,
        "finish_reason": result.finish_reason,
        "text": result.text,
        "usage": usage_dict(result.usage) if result.usage is not None else None,
        "error": {"code": error.code, "message": error.message} if error is not None else None,
        "events": result.events,
        "created_at": result.created_at,
        "finished_at": result.finished_at,
    }


def parse_after(run_id: str) -> int:
    """The last seq the client has: from Last-Event-ID or ``?after``; -1 for none."""
    last_event_id = request.headers.get("Last-Event-ID")
    after = request.args.get("after")
    if last_event_id is not None:
        owner, _, seq = last_event_id.rpartition(":")
        if owner != run_id or not SEQ.fullmatch(seq):
            raise ApiError(400, "invalid_last_event_id", f"Last-Event-ID must be '{run_id}:<seq>'.")
        return int(seq)
    if after is not None:
        if not SEQ.fullmatch(after) and after != "-1":
            raise ApiError(400, "invalid_after", "'after' must be a seq number (or -1).")
        return int(after)
    return -1


def install_run_routes(app: QuartTrio, state: AppState) -> None:
    def lookup(run_id: str) -> tuple[str, Run | Gone | None]:
        principal = state.keyring.authenticate(request.headers.get("Authorization"))
        if not RUN_ID.fullmatch(run_id):
            raise ApiError(404, "run_not_found", "No such run.")
        return principal, state.running_manager().runs.lookup(principal, run_id)

    def find_run(run_id: str) -> Run:
        _, found = lookup(run_id)
        if isinstance(found, Gone):
            raise ApiError(
                410, "run_gone", "The run's events are past retention and no longer kept."
            )
        if found is None:
            raise ApiError(404, "run_not_found", "No such run.")
        return found

    async def stored_or_missing(principal: str, run_id: str, found: Gone | None) -> Response:
        """The record from the store, else (cluster mode) from the shared
        state, else 410 (known, forgotten) or 404."""
        if state.store is not None:
            try:
                record = await state.store.get_for_principal(principal, run_id)
            except StoreError as exc:
                info = exc.error_info
                raise ApiError(503, info.code, info.message, headers={"Retry-After": "1"}) from None
            if record is not None:
                return jsonify(run_json(record.result))
        if state.cluster is not None:
            shared = await state.cluster.run_record(principal, run_id)
            if shared is not None:
                return jsonify(run_json(result_of(shared)))
        if isinstance(found, Gone):
            raise ApiError(410, "run_gone", "The run is past retention and no longer kept.")
        raise ApiError(404, "run_not_found", "No such run.")

    @app.get("/v1/runs/<run_id>")
    async def get_run(run_id: str) -> Response:
        principal, found = lookup(run_id)
        if isinstance(found, Run):
            return jsonify(run_json(found.result))
        return await stored_or_missing(principal, run_id, found)

    async def remote_events(run_id: str) -> Response:
        """Cluster mode: a run of another node, from the shared state."""
        assert state.cluster is not None
        principal, _ = lookup(run_id)
        after = parse_after(run_id)
        record = await state.cluster.run_record(principal, run_id)
        if record is None:
            find_run(run_id)  # 410 or 404, as for a local run
        assert record is not None
        ndjson = "application/x-ndjson" in request.headers.get("Accept", "")
        encoder = NativeNdjsonEncoder() if ndjson else NativeSseEncoder()
        stream = RemoteStream(
            state.cluster,
            principal,
            run_id,
            record["session_id"],
            encoder,
            state.settings.heartbeat_interval,
            after=after,
        )
        headers = {"X-Run-Id": run_id, "X-Session-Id": record["session_id"]}
        return StreamResponse(stream, headers)

    @app.get("/v1/runs/<run_id>/events")
    async def run_events(run_id: str) -> Response:  # noqa: ASYNC124
        if state.cluster is not None and not isinstance(lookup(run_id)[1], Run):
            return await remote_events(run_id)
        run = find_run(run_id)
        after = parse_after(run_id)
        if after >= len(run.log):
            if not run.ended:
                raise ApiError(
                    400, "invalid_after", "That seq has not been published for this run."
                )
            after = len(run.log) - 1  # nothing more will come
        ndjson = "application/x-ndjson" in request.headers.get("Accept", "")
        encoder = NativeNdjsonEncoder() if ndjson else NativeSseEncoder()
        stream = RunStream(
            run,
            encoder,
            heartbeat_interval=state.settings.heartbeat_interval,
            send_timeout=state.settings.send_timeout,
            after=after,
            cancel_on_close=False,
        )
        headers = {"X-Run-Id": run.run_id, "X-Session-Id": run.session_id}
        return StreamResponse(stream, headers)

    @app.post("/v1/runs/<run_id>/cancel")
    async def cancel_run(run_id: str) -> Response:
        principal, found = lookup(run_id)
        if not isinstance(found, Run) and state.cluster is not None:
            # Cluster mode: a run of another node is stopped there (acknowledged).
            stopped = await state.cluster.stop_run(principal, run_id)
            if stopped is not None:
                return jsonify(run_json(result_of(stopped)))
        if not isinstance(found, Run):
            # Ended long ago: stopping it changes nothing; answer its record.
            return await stored_or_missing(principal, run_id, found)
        found.cancel(CancelReason.CLIENT_STOP)
        # The cleanup budget bounds the wait; an agent that ignores
        # cancellation gets the record as it stands.
        with trio.move_on_after(state.settings.cleanup_budget + 1):
            await found.wait_ended()
        return jsonify(run_json(found.result))

    @app.get("/v1/sessions/<session_id>")
    async def get_session(session_id: str) -> Response:
        """Runs in memory first (this process's, newest first), then older
        ones from the store (before a restart, or past in-memory retention)."""
        principal = state.keyring.authenticate(request.headers.get("Authorization"))
        parse_session_id(session_id)
        manager = state.running_manager()
        live = manager.runs.for_session(principal, session_id, RECENT_RUNS)
        recent = [run_json(run.result) for run in live]
        if len(recent) < RECENT_RUNS and state.store is not None:
            try:
                stored = await state.store.recent_for_session(principal, session_id, RECENT_RUNS)
            except StoreError as exc:
                if not recent:
                    info = exc.error_info
                    raise ApiError(
                        503, info.code, info.message, headers={"Retry-After": "1"}
                    ) from None
                stored = []  # what memory holds will do
            known = {run.run_id for run in live}
            recent += [run_json(record.result) for record in stored if record.run_id not in known]
            del recent[RECENT_RUNS:]
        if state.cluster is not None:
            # Cluster mode: runs of every node, newest first, for the retention window.
            shared = await state.cluster.session_runs(principal, session_id, RECENT_RUNS)
            known_ids = {entry["id"] for entry in recent}
            recent += [
                run_json(result_of(record))
                for record in shared
                if record["run_id"] not in known_ids
            ]
            recent.sort(key=lambda entry: entry["created_at"], reverse=True)
            del recent[RECENT_RUNS:]
        session = manager.find_session(principal, session_id)
        if session is not None and session.current is not None:
            current = {"id": session.current.run_id, "status": session.current.status.value}
        elif recent:
            current = {"id": recent[0]["id"], "status": recent[0]["status"]}
        else:
            raise ApiError(404, "session_not_found", "No such session.")
        return jsonify(
            {
                "id": session_id,
                "object": "session",
                "current_run": current,
                "recent_runs": recent,
            }
        )
