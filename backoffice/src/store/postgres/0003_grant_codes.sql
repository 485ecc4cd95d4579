-- Version 3: grant codes waiting for customers' decisions (RFC 8628 device
-- codes), shared by every node of a branch: a meter may ask one node for a
-- code, its customer approve it on another and the meter poll a third.
-- The device code, the meter's secret answer to polls, is kept as its
-- SHA-256 (hex); the user code is useful only to the customer it names,
-- logged in, and lives minutes.
CREATE TABLE grant_codes (
    user_code text PRIMARY KEY,
    device_code_hash text NOT NULL UNIQUE,
    mid text NOT NULL,
    cid text NOT NULL,
    owner text NOT NULL,
    label text NOT NULL,
    scope text NOT NULL,
    expires_ms bigint NOT NULL,
    -- `deciding`: an approval is making the grant; nobody else may decide.
    state text NOT NULL CHECK (state IN ('pending', 'deciding', 'approved', 'denied')),
    granted_ms bigint,
    grant_expires_ms bigint
);
CREATE INDEX grant_codes_by_expiry ON grant_codes (expires_ms);
