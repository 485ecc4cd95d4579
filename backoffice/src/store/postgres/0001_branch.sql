-- Version 1: everything one branch keeps, so that any node can answer any
-- request. Money is numeric (exact: 9 decimal places, as `Amount`), never a
-- float; registry records are the same JSON records the sled store keeps
-- (`record`), beside the columns that find them. Keys that are paged in
-- order use the "C" collation: the same order whatever the server's locale.

-- The next number to issue per kind of ID: C (customers), P (products), M
-- (meters), G (grants).
CREATE TABLE serials (
    kind text PRIMARY KEY,
    next bigint NOT NULL CHECK (next >= 1)
);

CREATE TABLE customers (
    cid text PRIMARY KEY,
    -- Lower case: one customer per address, in any case.
    email text NOT NULL UNIQUE,
    record jsonb NOT NULL
);

-- TACA modules by the SHA-256 of their bytes (hex).
CREATE TABLE tacas (
    hash text PRIMARY KEY,
    module bytea NOT NULL
);

CREATE TABLE products (
    pid text PRIMARY KEY,
    test_pid text NOT NULL UNIQUE,
    owner text NOT NULL REFERENCES customers (cid),
    taca text NOT NULL REFERENCES tacas (hash),
    record jsonb NOT NULL
);

CREATE TABLE meters (
    mid text PRIMARY KEY,
    owner text NOT NULL REFERENCES customers (cid),
    record jsonb NOT NULL
);

CREATE TABLE grants (
    number bigint PRIMARY KEY,
    mid text NOT NULL REFERENCES meters (mid),
    cid text NOT NULL REFERENCES customers (cid),
    record jsonb NOT NULL
);
CREATE INDEX grants_by_meter ON grants (mid, number);
CREATE INDEX grants_by_customer ON grants (cid, number);

-- Every posted transfer; nothing is updated or deleted once written (a
-- correction is a new transfer). Accounts are `B1-C7` for customers and
-- `:name` for the branch's own accounts.
CREATE TABLE transfers (
    id bigint PRIMARY KEY CHECK (id >= 0),
    debit text NOT NULL,
    credit text NOT NULL CHECK (credit <> debit),
    amount numeric(30, 9) NOT NULL CHECK (amount > 0),
    kind text NOT NULL CHECK (kind IN ('deposit', 'withdrawal', 'use', 'correction')),
    pid text,
    batch text,
    uses bigint,
    corrects bigint REFERENCES transfers (id),
    posted_ms bigint NOT NULL,
    CHECK ((kind = 'use') = (pid IS NOT NULL AND batch IS NOT NULL AND uses IS NOT NULL)),
    CHECK ((kind = 'correction') = (corrects IS NOT NULL))
);
CREATE INDEX transfers_by_debit ON transfers (debit, id);
CREATE INDEX transfers_by_credit ON transfers (credit, id);
CREATE FUNCTION refuse_changing_posted_transfers() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'posted transfers are never changed or deleted (post a correction)';
END
$$;
CREATE TRIGGER transfers_are_posted_for_good
    BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION refuse_changing_posted_transfers();
CREATE TRIGGER transfers_are_never_truncated
    BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_changing_posted_transfers();

-- Each account's balance, changed in the same transaction as the transfers
-- that move it; their sum is zero.
CREATE TABLE balances (
    account text PRIMARY KEY,
    balance numeric(30, 9) NOT NULL
);

-- Applied upload batches: applied once, answered the same when retried.
CREATE TABLE batches (
    mid text NOT NULL,
    batch text NOT NULL,
    digest bytea CHECK (digest IS NULL OR length(digest) = 32),
    answer bytea NOT NULL,
    PRIMARY KEY (mid, batch)
);

-- The sequence numbers each applied batch spanned, per meter instance.
CREATE TABLE seq_ranges (
    mid text NOT NULL,
    instance text NOT NULL,
    -- As in suspense: u64 with the sign bit flipped.
    first bigint NOT NULL,
    last bigint NOT NULL CHECK (last >= first),
    PRIMARY KEY (mid, instance, first)
);

-- Uses per payer, product and month (YYYYMM, UTC): all of them, and those
-- that moved no money.
CREATE TABLE period_uses (
    payer text NOT NULL,
    pid text NOT NULL,
    month integer NOT NULL CHECK (month % 100 BETWEEN 1 AND 12),
    uses bigint NOT NULL CHECK (uses >= 0),
    PRIMARY KEY (payer, pid, month)
);
CREATE TABLE free_uses (
    payer text NOT NULL,
    pid text NOT NULL,
    month integer NOT NULL CHECK (month % 100 BETWEEN 1 AND 12),
    uses bigint NOT NULL CHECK (uses >= 0),
    PRIMARY KEY (payer, pid, month)
);

-- Readings that could not be priced, in the store's order.
CREATE TABLE suspense (
    mid text COLLATE "C" NOT NULL,
    batch text COLLATE "C" NOT NULL,
    -- Sequence numbers are u64: stored with the sign bit flipped, so that
    -- bigint order is their order.
    seq bigint NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (mid, batch, seq)
);

-- Every applied reading with what became of it (`itemised` records), oldest
-- first, and how a batch's and a transfer's records are found.
CREATE TABLE itemised (
    arrived_ms bigint NOT NULL,
    mid text NOT NULL,
    batch text NOT NULL,
    part integer NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (arrived_ms, mid, batch, part)
);
CREATE TABLE itemised_batches (
    mid text NOT NULL,
    batch text NOT NULL,
    arrived_ms bigint NOT NULL,
    parts integer NOT NULL,
    PRIMARY KEY (mid, batch)
);
CREATE TABLE itemised_transfers (
    first bigint PRIMARY KEY,
    last bigint NOT NULL CHECK (last >= first),
    arrived_ms bigint NOT NULL,
    mid text NOT NULL,
    batch text NOT NULL
);

-- Deposits by their client's reference (`funding::DepositRecord`).
CREATE TABLE deposits (
    reference text PRIMARY KEY,
    record jsonb NOT NULL
);
