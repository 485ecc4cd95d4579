-- Version 7: holds (`holds::HoldBook`): money reserved on an account until
-- it is captured, released or expires. One row per event, numbered from 0,
-- never changed (like transfers); a capture names the transfer that took
-- the money, written in the same transaction.
CREATE TABLE hold_events (
    number bigint PRIMARY KEY CHECK (number >= 0),
    hold bigint NOT NULL CHECK (hold >= 0),
    at_ms bigint NOT NULL,
    kind text NOT NULL CHECK (kind IN ('placed', 'adjusted', 'captured', 'released', 'expired')),
    account text,
    amount numeric(30, 9),
    expires_ms bigint,
    note text,
    -- A transfer takes money from one hold at most.
    transfer bigint UNIQUE REFERENCES transfers (id),
    CHECK ((kind = 'placed') = (account IS NOT NULL)),
    CHECK ((kind IN ('placed', 'adjusted')) = (expires_ms IS NOT NULL)),
    CHECK (kind = 'adjusted' OR amount IS NULL OR amount > 0),
    CHECK ((kind IN ('placed', 'adjusted', 'captured')) = (amount IS NOT NULL)),
    CHECK ((kind = 'captured') = (transfer IS NOT NULL))
);
CREATE INDEX hold_events_by_hold ON hold_events (hold, number);

CREATE FUNCTION refuse_changing_hold_events() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'hold events are never changed or deleted';
END
$$;
CREATE TRIGGER hold_events_are_kept_for_good
    BEFORE UPDATE OR DELETE ON hold_events
    FOR EACH ROW EXECUTE FUNCTION refuse_changing_hold_events();
CREATE TRIGGER hold_events_are_never_truncated
    BEFORE TRUNCATE ON hold_events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_changing_hold_events();
-- A node that keeps the book in memory reads it again when anyone else
-- wrote (the ledger epoch, migration 6).
CREATE TRIGGER hold_events_raise_ledger_epoch AFTER INSERT ON hold_events
    FOR EACH STATEMENT EXECUTE FUNCTION raise_ledger_epoch();
