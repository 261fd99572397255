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

/// A workspace's identity on the bus: the first 32 hex digits of SHA-256 of
/// `<host id> NUL <canonical root path>`. The same path on two hosts is two workspaces,
/// and a path's routing key (`req.path.<key>`, `jobs.path.<key>.<class>`) is this value.
pub fn fingerprint(host: &str, canonical_root: &Path) -> String {
    let mut bytes = host.as_bytes().to_vec();
    bytes.push(0);
    bytes.extend_from_slice(canonical_root.as_os_str().as_encoded_bytes());
    hex_prefix(&bytes)
}

/// The routing key of a canonical workspace root path on a host: its [`fingerprint`].
pub fn path_key(host: &str, canonical_root: &Path) -> String {
    fingerprint(host, canonical_root)
}

/// A host name made one plain token: letters, digits and `-` kept, anything else `-`,
/// at most 64 characters; `host` when nothing is left.
pub fn host_token(raw: &str) -> String {
    let slug = slug(raw, 64);
    if slug.is_empty() {
        "host".to_string()
    } else {
        slug
    }
}

/// The id of a workspace configured without one: `<dir-slug>-<8 hex of its fingerprint>`,
/// so two unnamed workspaces on a shared bus never share an id (`default` did).
pub fn unnamed_workspace_id(canonical_root: &Path, fingerprint: &str) -> String {
    let name = canonical_root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let slug = slug(&name, 55);
    let slug = if slug.is_empty() {
        "ws".to_string()
    } else {
        slug
    };
    format!("{slug}-{}", &fingerprint[..8.min(fingerprint.len())])
}

/// Lower-case letters, digits and single `-`, trimmed, at most `max` characters.
fn slug(raw: &str, max: usize) -> String {
    let mut out = String::new();
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= max {
            break;
        }
    }
    out.trim_end_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_host_and_path() {
        let a = fingerprint("h1", Path::new("/srv/shop"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, fingerprint("h2", Path::new("/srv/shop")));
        assert_ne!(a, fingerprint("h1", Path::new("/srv/shop2")));
        let id = unnamed_workspace_id(Path::new("/srv/My Shop!"), &a);
        assert_eq!(id, format!("my-shop-{}", &a[..8]));
        assert!(is_plain_token(&id));
        assert!(is_plain_token(&unnamed_workspace_id(Path::new("/"), &a)));
        let long = "x".repeat(200);
        assert!(is_plain_token(&unnamed_workspace_id(
            Path::new(&format!("/{long}")),
            &a
        )));
        assert_eq!(host_token("Box.local"), "box-local");
        assert_eq!(host_token("__"), "host");
        assert!(is_plain_token(&host_token(&"é".repeat(100))));
    }
}
