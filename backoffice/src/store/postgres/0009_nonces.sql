-- Version 9: WS-Security nonces (Parlay X) seen by any node, so that a
-- token replayed to another node of the branch is refused there too.
-- `digest` is SHA-256 of the user name, a zero byte and the nonce; a row
-- is free again once `expires_ms` (the token's window) has passed, and
-- rows past it are deleted now and then by the nodes.
CREATE TABLE wsse_nonces (
    digest bytea PRIMARY KEY CHECK (octet_length(digest) = 32),
    expires_ms bigint NOT NULL
);
CREATE INDEX wsse_nonces_expiry ON wsse_nonces (expires_ms);
