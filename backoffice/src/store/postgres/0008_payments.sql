-- Version 8: payments asked by services (Parlay X Payment).
--
-- A transfer of kind 'payment' is a charge or a refund a service asked for
-- one of its products (`pid`), under the service's reference code.
ALTER TABLE transfers DROP CONSTRAINT transfers_kind_check;
ALTER TABLE transfers ADD COLUMN reference text;
ALTER TABLE transfers ADD CONSTRAINT transfers_kind_check
    CHECK (kind IN ('deposit', 'withdrawal', 'use', 'correction', 'payment'));
ALTER TABLE transfers ADD CONSTRAINT transfers_payment_check
    CHECK ((kind = 'payment') = (pid IS NOT NULL AND reference IS NOT NULL AND batch IS NULL));

-- Each request that changed something (`payments::PaymentRequest`), by its
-- service and reference code: the same code answers the first outcome
-- again. Written in the transaction of its transfers and hold events;
-- never changed.
CREATE TABLE payment_requests (
    service text NOT NULL,
    reference text NOT NULL CHECK (octet_length(reference) BETWEEN 1 AND 255),
    operation text NOT NULL,
    digest text NOT NULL CHECK (digest ~ '^[0-9a-f]{64}$'),
    description text NOT NULL,
    at_ms bigint NOT NULL,
    transfers bigint[] NOT NULL,
    hold bigint CHECK (hold >= 0),
    -- Confirmation references given as evidence (`payment_evidence`).
    evidence text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (service, reference),
    CHECK (cardinality(transfers) > 0 OR hold IS NOT NULL)
);

-- Each confirmation reference is evidence for one request only.
CREATE TABLE payment_evidence (
    reference text PRIMARY KEY,
    service text NOT NULL,
    request text NOT NULL,
    FOREIGN KEY (service, request) REFERENCES payment_requests (service, reference)
);

CREATE FUNCTION refuse_changing_payment_requests() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payment requests are never changed or deleted';
END
$$;
CREATE TRIGGER payment_requests_are_kept_for_good
    BEFORE UPDATE OR DELETE ON payment_requests
    FOR EACH ROW EXECUTE FUNCTION refuse_changing_payment_requests();
CREATE TRIGGER payment_requests_are_never_truncated
    BEFORE TRUNCATE ON payment_requests
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_changing_payment_requests();
CREATE TRIGGER payment_evidence_is_kept_for_good
    BEFORE UPDATE OR DELETE ON payment_evidence
    FOR EACH ROW EXECUTE FUNCTION refuse_changing_payment_requests();
CREATE TRIGGER payment_evidence_is_never_truncated
    BEFORE TRUNCATE ON payment_evidence
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_changing_payment_requests();

-- The service (PID) that placed a hold: it alone may charge and release
-- it; and a reservation by volume's rating parameters.
ALTER TABLE hold_events ADD COLUMN placed_by text CHECK (placed_by IS NULL OR kind = 'placed');
ALTER TABLE hold_events ADD COLUMN rating text CHECK (rating IS NULL OR placed_by IS NOT NULL);
