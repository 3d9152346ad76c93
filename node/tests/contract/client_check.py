"""Calls a running node through the client openapi-python-client generated
from docs/openapi.json, and checks what comes back.

Run by node/tests/contract.rs:
    python client_check.py BASE_URL CLIENT_PARENT_DIR
with AUDIT_CONTRACT_READER and AUDIT_CONTRACT_AUDITOR set to tokens.
Exits 0 and prints "client check: OK" when every check passes.
"""

import os
import sys


def main() -> None:
    base_url, client_dir = sys.argv[1], sys.argv[2]
    sys.path.insert(0, client_dir)

    from order_audit_trail_client import AuthenticatedClient, Client
    from order_audit_trail_client.api.dead_letters import get_dead_letter, list_dead_letters
    from order_audit_trail_client.api.events import get_event, list_events
    from order_audit_trail_client.api.health import healthz
    from order_audit_trail_client.api.streams import list_stream_events
    from order_audit_trail_client.models import DeadLetterDetail, DeadLetterPage, EventPage, EventView, Problem

    reader = AuthenticatedClient(
        base_url=base_url, token=os.environ["AUDIT_CONTRACT_READER"], raise_on_unexpected_status=True
    )
    auditor = AuthenticatedClient(
        base_url=base_url, token=os.environ["AUDIT_CONTRACT_AUDITOR"], raise_on_unexpected_status=True
    )
    stranger = AuthenticatedClient(base_url=base_url, token="not-a-token", raise_on_unexpected_status=True)
    anonymous = Client(base_url=base_url, raise_on_unexpected_status=True)

    # Open route, no token.
    health = healthz.sync_detailed(client=anonymous)
    assert health.status_code == 200, health
    assert health.parsed == "ok", health.parsed

    # A page of events, then the next one: typed, no overlap.
    first = list_events.sync(client=reader, limit=5, event_type=["order.*"])
    assert isinstance(first, EventPage), first
    assert len(first.events) == 5, f"expected 5 events, got {len(first.events)}"
    assert isinstance(first.next_cursor, str), first.next_cursor
    for event in first.events:
        assert isinstance(event, EventView), event
        assert event.event_type.startswith("order."), event.event_type
    second = list_events.sync(client=reader, limit=5, cursor=first.next_cursor, event_type=["order.*"])
    assert isinstance(second, EventPage), second
    seen = {e.event_id for e in first.events}
    assert not seen & {e.event_id for e in second.events}, "pages overlap"
    assert all(isinstance(e.seq, int) for e in second.events), "seq is an integer"

    # Readers see protected fields redacted.
    created = [e for e in first.events + second.events if e.event_type == "order.created"]
    for event in created:
        email = event.payload["customer"]["email"]
        assert email == {"$redacted": True}, f"reader saw {email!r}"

    # One event by id, the same as in the page.
    one = get_event.sync(first.events[0].event_id, client=reader)
    assert isinstance(one, EventView), one
    assert one.event_id == first.events[0].event_id
    assert one.seq == first.events[0].seq
    assert one.chain.id == first.events[0].chain.id

    # The stream of that event, in order.
    stream = list_stream_events.sync(one.stream_id, client=reader, limit=100)
    assert isinstance(stream, EventPage), stream
    assert stream.events, "the stream has events"
    assert all(e.stream_id == one.stream_id for e in stream.events)
    assert one.event_id in {e.event_id for e in stream.events}

    # Dead letters: the raw bytes only for auditors.
    letters = list_dead_letters.sync(client=reader, limit=10)
    assert isinstance(letters, DeadLetterPage), letters
    if letters.dead_letters:
        letter_id = letters.dead_letters[0].id
        withheld = get_dead_letter.sync(letter_id, client=reader)
        assert isinstance(withheld, DeadLetterDetail), withheld
        assert withheld.raw_withheld and withheld.raw_value is None
        shown = get_dead_letter.sync(letter_id, client=auditor)
        assert isinstance(shown, DeadLetterDetail), shown
        assert not shown.raw_withheld

    # Errors are typed problems: a bad token, an unknown event.
    refused = get_event.sync_detailed(first.events[0].event_id, client=stranger)
    assert refused.status_code == 401, refused.status_code
    assert isinstance(refused.parsed, Problem) and refused.parsed.status == 401, refused.parsed
    missing = get_event.sync_detailed("00000000-0000-4000-8000-000000000000", client=reader)
    assert missing.status_code == 404, missing.status_code
    assert isinstance(missing.parsed, Problem) and "00000000" in missing.parsed.detail, missing.parsed

    print(
        f"client check: OK ({len(first.events) + len(second.events)} events, "
        f"{len(stream.events)} in stream {one.stream_id}, {len(letters.dead_letters)} dead letters)"
    )


if __name__ == "__main__":
    main()
