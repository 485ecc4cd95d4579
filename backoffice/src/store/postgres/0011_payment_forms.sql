-- Version 11: the canonical form a payment request's digest was made from
-- (`proto::parlayx::CANONICAL_FORM`). 0 marks requests stored before forms
-- were numbered, whose digest is of form 1 or form 2: a retry of one is
-- compared with both. Adding a column with a default changes no row, so
-- the trigger that refuses changes to requests is not involved.
ALTER TABLE payment_requests ADD COLUMN form smallint NOT NULL DEFAULT 0
    CHECK (form BETWEEN 0 AND 255);
