"""Ground-truth feedback on the local v2 API: ``POST /v2/models/{name}[/versions/{v}]/feedback``.

KServe v2 has no way to tell a server the right answer to an earlier request; this endpoint
adds one in the protocol's style (JSON objects, the request's ``id``, ``{"error": ...}``):

    {"id": "<request id>", "label": 3}                   one-row request: a class index ...
    {"id": "<request id>", "label": "cat"}               ... or a class name
    {"id": "<request id>", "labels": [3, null, "cat"]}   one label per request row (null: skip)
    {"items": [{"id": ..., "label": ...}, ...]}          up to MAX_FEEDBACK_ITEMS at once

Every object may carry ``parameters`` (ignored). The request id is the v2 ``id`` the client
sent with its inference request, or the one the response carried when it sent none.

Answers: a single item gets 200 ``{"model_name", "id", "model_version", "counted", "skipped"}``,
404 for an unknown, already labelled or expired id (or an unknown model or version), 400 for
a malformed body or a label that names no class. A batch gets 200 with one result per item
(``{"id", "error", "outcome"}`` for one that was not counted: per-item problems are counted,
not raised) and the rows ``counted`` in all; a malformed batch is a 400 for all of it.

Owns the body's shape (``parse_feedback``) and the endpoint's answer (``answer_feedback``).
Does not own routing (``edge_agent.api.app``), limits and metrics (``edge_agent.api.endpoints``)
nor the memory and the counts (``edge_agent.serving.ground_truth``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from edge_agent import strict_json
from edge_agent.errors import InputValidationError, UnknownRequestError
from edge_agent.serving.ground_truth import MAX_FEEDBACK_ITEMS, MAX_ID_CHARS
from edge_agent.serving.service import InferenceService

__all__ = ["MAX_FEEDBACK_BYTES", "FeedbackItem", "answer_feedback", "parse_feedback"]

#: Largest feedback body accepted (also capped by ``[api] max_request_bytes``).
MAX_FEEDBACK_BYTES: Final = 1024 * 1024
_ITEM_KEYS: Final = frozenset({"id", "label", "labels", "parameters"})
_BATCH_KEYS: Final = frozenset({"items", "parameters"})


@dataclass(frozen=True)
class FeedbackItem:
    """One request's truth: its id, and one label (``rows`` False) or one per row (True)."""

    request_id: str
    label: Any
    rows: bool


def _invalid(message: str, field: str | None = None) -> InputValidationError:
    return InputValidationError(message, field=field, reason="schema")


def _error(message: str) -> InputValidationError:
    return InputValidationError(message, reason="json")


def _item(d: Any, where: str) -> FeedbackItem:
    if not isinstance(d, Mapping):
        raise _invalid(f"{where} must be an object")
    unknown = set(d) - _ITEM_KEYS
    if unknown:
        raise _invalid(f"{where} has unknown key(s) {sorted(unknown)[:5]}", sorted(unknown)[0])
    rid = d.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_CHARS:
        raise _invalid(f"{where}: 'id' must be a string of 1..{MAX_ID_CHARS} characters", "id")
    if ("label" in d) == ("labels" in d):
        raise _invalid(f"{where}: give exactly one of 'label' and 'labels'", "label")
    if "labels" in d and not isinstance(d["labels"], list):
        raise _invalid(f"{where}: 'labels' must be a list", "labels")
    params = d.get("parameters", {})
    if not isinstance(params, Mapping):
        raise _invalid(f"{where}: 'parameters' must be an object", "parameters")
    rows = "labels" in d
    return FeedbackItem(rid, d["labels"] if rows else d["label"], rows)


def parse_feedback(body: bytes) -> tuple[list[FeedbackItem], bool]:
    """The items of a feedback body, and whether it was a batch (``items``).

    Raises:
        InputValidationError: not strict JSON (reason ``json``), or not one of the shapes in
            the module docstring (reason ``schema``; ``field`` names the key).
    """
    doc = strict_json.loads(body, max_bytes=MAX_FEEDBACK_BYTES, what="feedback body", error=_error)
    if not isinstance(doc, Mapping):
        raise _invalid("a feedback body must be a JSON object")
    if "items" not in doc:
        return [_item(doc, "feedback")], False
    unknown = set(doc) - _BATCH_KEYS
    if unknown:
        raise _invalid(f"a feedback batch has unknown key(s) {sorted(unknown)[:5]}", "items")
    items = doc["items"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_FEEDBACK_ITEMS:
        raise _invalid(f"'items' must be a list of 1..{MAX_FEEDBACK_ITEMS} objects", "items")
    return [_item(d, f"items[{i}]") for i, d in enumerate(items)], True


def answer_feedback(
    service: InferenceService, name: str, version: str | None, body: bytes
) -> dict[str, Any]:
    """The endpoint's 200 document for ``body``.

    Raises:
        InputValidationError: a malformed body; for a single item, also a bad id or label.
        UnknownRequestError: a single item whose request is not (or no longer) remembered.
        ModelNotFoundError: no such model or version.
    """
    items, batch = parse_feedback(body)
    if not batch:
        item = items[0]
        got = service.feedback(name, version, item.request_id, item.label, rows=item.rows)
        return {"model_name": name, **got.to_dict()}
    results: list[dict[str, Any]] = []
    counted = 0
    for item in items:
        try:
            got = service.feedback(name, version, item.request_id, item.label, rows=item.rows)
        except UnknownRequestError as exc:
            outcome = "expired" if exc.expired else "unknown_id"
            results.append({"id": item.request_id, "error": str(exc), "outcome": outcome})
            continue
        except InputValidationError as exc:
            results.append({"id": item.request_id, "error": str(exc), "outcome": "bad_label"})
            continue
        counted += got.counted
        results.append(got.to_dict())
    return {"model_name": name, "counted": counted, "results": results}
