-- Version 6: a counter of money writes, raised by the database itself on
-- every statement that writes transfers or period counts, whoever makes it
-- (any node, any code path, a hand-written statement). A node that takes
-- the ledger lock and finds the counter where its own last write left it
-- knows nobody else wrote since: the ledger and the period counts in its
-- memory are the database's, and it need not read them again. Each raise
-- also draws a new random token, compared with the count: a database whose
-- history went back (restored, or failed over to a replica that missed
-- commits) and then counted up to the same number again is not taken for
-- the one the node saw.
CREATE TABLE ledger_epoch (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    n bigint NOT NULL,
    token text NOT NULL
);
INSERT INTO ledger_epoch VALUES (true, 0, md5(random()::text || clock_timestamp()::text));

CREATE FUNCTION raise_ledger_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ledger_epoch SET n = n + 1, token = md5(random()::text || clock_timestamp()::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER transfers_raise_ledger_epoch AFTER INSERT OR UPDATE OR DELETE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION raise_ledger_epoch();
CREATE TRIGGER period_uses_raise_ledger_epoch AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON period_uses
    FOR EACH STATEMENT EXECUTE FUNCTION raise_ledger_epoch();
