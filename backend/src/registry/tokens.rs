//! Credential hashing: tokens are stored only as SHA-256 (hex) and compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use crate::secrets::random_token;

/// Lowercase hex SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `presented` hashes to `stored_hash`, compared in constant time.
pub fn verify(presented: &[u8], stored_hash: &str) -> bool {
    let presented = Sha256::digest(presented);
    let Ok(stored) = hex::decode(stored_hash) else {
        return false;
    };
    stored.len() == presented.len() && bool::from(presented[..].ct_eq(&stored[..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_against_its_hash_only() {
        let t = random_token();
        let h = hash_token(&t);
        assert_eq!(h.len(), 64);
        assert!(verify(t.as_bytes(), &h));
        assert!(!verify(b"other", &h));
        assert!(!verify(t.as_bytes(), "not-hex"));
        assert!(!verify(t.as_bytes(), ""));
    }
}
