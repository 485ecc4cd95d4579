-- Version 2: the web pages' state, shared by every node of a branch, so
-- that a visitor logged in on one node is logged in on all, and failed
-- logins, registrations and reset mails are counted across them. Tokens are
-- kept as the SHA-256 of the cookie or link (hex): whoever reads the
-- database cannot use them.

-- Sessions: anonymous visits (with their CSRF token) and logged-in ones.
CREATE TABLE web_sessions (
    token_hash text PRIMARY KEY,
    csrf text NOT NULL,
    cid text,
    last_seen_ms bigint NOT NULL
);
CREATE INDEX web_sessions_by_cid ON web_sessions (cid) WHERE cid IS NOT NULL;
CREATE INDEX web_sessions_by_last_seen ON web_sessions (last_seen_ms);

-- Counted events (failed or reserved logins, registrations, reset mails)
-- by key (`account:...`, `address:...`, `register:...`, `reset:...`).
CREATE TABLE web_events (
    id bigserial PRIMARY KEY,
    key text NOT NULL,
    at_ms bigint NOT NULL
);
CREATE INDEX web_events_by_key ON web_events (key, at_ms);
CREATE INDEX web_events_by_time ON web_events (at_ms);

-- Password reset links outstanding.
CREATE TABLE web_resets (
    token_hash text PRIMARY KEY,
    cid text NOT NULL,
    made_ms bigint NOT NULL
);
CREATE INDEX web_resets_by_cid ON web_resets (cid);
