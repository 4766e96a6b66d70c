"""docs/stream-states.md, written from the state table itself.

``python -m tunnel._core.render > docs/stream-states.md`` regenerates it;
``tests/core/test_states.py`` fails while the committed copy differs.  One
matrix per half and end: a row per state, a column per input that end feeds
to that half, the outcome in each cell.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from .states import (
    CLIENT_INPUTS,
    MEANING,
    REQUEST,
    RESPONSE,
    SERVER_INPUTS,
    Fatal,
    Go,
    Ignore,
    Input,
    Misuse,
    RequestState,
    Reset,
    ResponseState,
    Row,
)

__all__ = ["markdown"]

_HEADER = """\
# Stream states

Generated from `tunnel/_core/states.py` by
`python -m tunnel._core.render > docs/stream-states.md`; do not edit by hand
(a test compares the two).  The theory of operation is that module's
docstring; in short: a stream is two halves, the *request* half (the tunnel
client's messages) and the *response* half (the tunnel server's headers and
messages, ending with `close_stream`).  Each end keeps the state of both.
The application's calls are inputs of the half its end sends; frames from
the peer are inputs of the half the peer sends.

Cells: **→ STATE** (allowed: the half moves there), **reset STATUS** (the
stream ends with that status, the tunnel lives on), **misuse**
(`LocalProtocolError`, nothing changes), **tunnel-fatal**
(`RemoteProtocolError`, the tunnel ends), **ignored**.  Where a unary half
(one message) differs from a streaming one, the cell says so.  A dash is a
state that end never reaches with that input.

Checks on bytes rather than states (a message over the size limit, data
beyond the window, a half-close or a `close_stream` in the middle of a
message) follow in `tunnel/_core/flow.py` once a row allowed the input.
Frames for an id that is not in the stream table are routed by id first: an
id already used is late and ignored, any other ends the tunnel.  After a
tunnel-fatal error every later frame raises again and no stream can be
opened.
"""

_STATES: Mapping[str, type[enum.IntEnum]] = {"request": RequestState, "response": ResponseState}
#: The end whose calls are inputs of each half (the other end receives it).
_SENDER = {"request": "tunnel client", "response": "tunnel server"}
_TITLES = {
    "request": "Request half (tunnel client → tunnel server)",
    "response": "Response half (tunnel server → tunnel client)",
}
_LABELS = {
    Input.SEND_HEADERS: "`send_headers()`",
    Input.SEND_MESSAGE: "`send_message()`",
    Input.HALF_CLOSE: "`half_close()`",
    Input.CANCEL: "`cancel()`",
    Input.CLOSE_STREAM: "`close_stream()`",
    Input.NEW_STREAM_SENT: "new_stream leaves",
    Input.RECV_REQUEST_MESSAGE: "request_message",
    Input.RECV_MORE_REQUEST_DATA: "more_request_data",
    Input.RECV_HALF_CLOSE: "half_close",
    Input.RECV_CANCEL: "cancel",
    Input.RECV_RESPONSE_HEADERS: "response_headers",
    Input.RECV_RESPONSE_MESSAGE: "response_message",
    Input.RECV_MORE_RESPONSE_DATA: "more_response_data",
    Input.RECV_CLOSE_STREAM: "close_stream",
    Input.RECV_WINDOW_UPDATE: "window_update",
    Input.RECV_SETTINGS: "settings",
    Input.RECV_EMPTY: "empty frame",
}


def _outcome(outcome: object) -> str:
    if isinstance(outcome, Go):
        text = f"→ {outcome.next.name}"
        return f"{text} ({outcome.note})" if outcome.note else text
    if isinstance(outcome, Reset):
        return f"reset {outcome.status.name}: {outcome.message}"
    if isinstance(outcome, Misuse):
        return f"misuse: {outcome.message}"
    if isinstance(outcome, Fatal):
        return f"tunnel-fatal: {outcome.message}"
    if isinstance(outcome, Ignore):
        return f"ignored ({outcome.why})"
    raise TypeError(outcome)


def _cell(row: Row[RequestState] | Row[ResponseState] | None) -> str:
    if row is None:
        return "—"
    text = _outcome(row.outcome)
    if row.unary is not None:
        text += f"; unary: {_outcome(row.unary)}"
    return text.format(stream_id="N", kind="KIND").replace("|", "\\|")


def _matrix(half: str, end: str, inputs: tuple[Input, ...]) -> list[str]:
    table: Mapping[tuple[object, Input], Row[RequestState] | Row[ResponseState]]
    table = REQUEST if half == "request" else RESPONSE  # type: ignore[assignment]
    states = list(_STATES[half])
    if end == "tunnel server" and half == "response":
        states.remove(ResponseState.IDLE)  # the server's streams start announced
    lines = [
        f"| {end}: state | " + " | ".join(_LABELS[i] for i in inputs) + " |",
        "|---" * (len(inputs) + 1) + "|",
    ]
    for state in states:
        cells = [_cell(table.get((state, i))) for i in inputs]
        lines.append(f"| **{state.name}** | " + " | ".join(cells) + " |")
    return lines


def markdown() -> str:
    """The whole page."""
    out = [_HEADER]
    for half in ("request", "response"):
        out.append(f"## {_TITLES[half]}\n")
        for state, meaning in MEANING[half].items():
            out.append(f"- **{state.name}**: {meaning}")
        out.append("")
        for end, inputs in (
            ("tunnel client", CLIENT_INPUTS[half]),
            ("tunnel server", SERVER_INPUTS[half]),
        ):
            kind = "calls" if end == _SENDER[half] else "frames received"
            out.append(f"### The {end}'s {kind}\n")
            out.extend(_matrix(half, end, inputs))
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
