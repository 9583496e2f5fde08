//! md5 password authentication on both sides: the challenge a client must answer and
//! the answer pgrelay gives a server, from a password or a stored `md5<hex>` hash.

use md5::{Digest, Md5};

/// `md5(password || user)`: what PostgreSQL stores as `md5<hex>`.
pub fn stored_hash(user: &str, password: &[u8]) -> [u8; 16] {
    let mut hasher = Md5::new();
    hasher.update(password);
    hasher.update(user.as_bytes());
    hasher.finalize().into()
}

/// The PasswordMessage text for a salt: `md5` + hex(md5(hex(stored) || salt)).
pub fn response(stored: &[u8; 16], salt: [u8; 4]) -> String {
    let mut hasher = Md5::new();
    hasher.update(hex(stored).as_bytes());
    hasher.update(salt);
    format!("md5{}", hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    /// Expected values computed with Python's hashlib the way PostgreSQL does.
    fn matches_postgres() {
        let stored = stored_hash("postgres", b"postgres");
        assert_eq!(hex(&stored), "3175bce1d3201d16594cebf9d7eb3f9d");
        assert_eq!(
            response(&stored, [1, 2, 3, 4]),
            "md568be9ed08db75f318087ab337aaea044"
        );
    }
}
