//! Comparing secrets (bearer tokens) without leaking them through timing.

/// Whether `presented` equals `expected`, in time that depends only on
/// their lengths (not on where they first differ).
pub fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    presented
        .iter()
        .zip(expected)
        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
        == 0
}

/// What an HTTP `Authorization` header presents against a bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bearer {
    /// No header, or not `Bearer <token>`.
    Missing,
    /// A token that is not the one expected.
    Wrong,
    /// The expected token.
    Matches,
}

/// Checks the value of an `Authorization` header (`None` when absent or
/// not text) against `expected`, in constant time. The scheme's name is
/// matched in any case (`Bearer`, `bearer`), as HTTP's authentication
/// schemes are (RFC 9110, 11.1).
pub fn check_bearer(authorization: Option<&str>, expected: &str) -> Bearer {
    let presented = authorization.and_then(|value| {
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim_start_matches(' '))
    });
    match presented {
        None => Bearer::Missing,
        Some(presented) if same_secret(presented.as_bytes(), expected.as_bytes()) => {
            Bearer::Matches
        }
        Some(_) => Bearer::Wrong,
    }
}

#[cfg(test)]
mod tests {
    use super::{check_bearer, same_secret, Bearer};

    #[test]
    fn bearer_headers_are_told_apart() {
        assert_eq!(
            check_bearer(Some("Bearer s3cret"), "s3cret"),
            Bearer::Matches
        );
        assert_eq!(check_bearer(Some("Bearer s3cres"), "s3cret"), Bearer::Wrong);
        assert_eq!(
            check_bearer(Some("Basic s3cret"), "s3cret"),
            Bearer::Missing
        );
        assert_eq!(check_bearer(None, "s3cret"), Bearer::Missing);
        assert_eq!(
            check_bearer(Some("bearer s3cret"), "s3cret"),
            Bearer::Matches
        );
        assert_eq!(
            check_bearer(Some("BEARER  s3cret"), "s3cret"),
            Bearer::Matches
        );
        assert_eq!(check_bearer(Some("bearer x"), "s3cret"), Bearer::Wrong);
        assert_eq!(
            check_bearer(Some("Bearers3cret"), "s3cret"),
            Bearer::Missing
        );
    }

    #[test]
    fn secrets_compare_by_every_byte() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cres", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
    }
}
