-- Version 11: the canonical form a payment request's digest was made from
-- (`proto::parlayx::CANONICAL_FORM`). 0 marks requests stored before forms
-- were numbered, whose digest is of form 1 or form 2: a retry of one is
-- compared with both. Adding a column with a default changes no row, so
-- the trigger that refuses changes to requests is not involved.
-- No CHECK: it would scan the whole table under an exclusive lock, holding
-- payments up while it runs; the store writes a u8 and refuses what does
-- not read as one.
ALTER TABLE payment_requests ADD COLUMN form smallint NOT NULL DEFAULT 0;
