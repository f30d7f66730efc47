-- Nonces of signed bridge requests already accepted: a replayed request is refused. Shared by every replica, because
-- the same signed request could be replayed against any of them. Rows expire with the signature window.
CREATE TABLE bridge_nonces (
    run_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, nonce)
) STRICT;

CREATE INDEX bridge_nonces_expiry ON bridge_nonces (expires_at);
