//! Caller-supplied names made safe to use as one NATS subject token, consumer name or file
//! name: plain ids pass verbatim, anything else becomes a hash that cannot contain `.`,
//! `*`, `>`, spaces or `$`. Here, below every folder that needs it, so the runtime side
//! (workspace registry, log names) and the bus agree on one encoding.

use std::path::Path;

use sha2::{Digest, Sha256};

/// True when `s` may be used verbatim as a subject token: `[A-Za-z0-9-][A-Za-z0-9_-]{0,63}`.
/// A leading `_` is reserved for encoded and special tokens, so they cannot collide.
pub fn is_plain_token(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0] != b'_'
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
}

/// A caller-supplied id as one safe subject token: verbatim when plain, otherwise
/// `_h` + 32 hex digits of its SHA-256.
pub fn token(id: &str) -> String {
    if is_plain_token(id) {
        id.to_string()
    } else {
        format!("_h{}", hex_prefix(id.as_bytes()))
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The routing key of a canonical workspace root path.
pub fn path_key(canonical_root: &Path) -> String {
    hex_prefix(canonical_root.as_os_str().as_encoded_bytes())
}
