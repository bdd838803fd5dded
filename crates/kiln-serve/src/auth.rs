//! Bearer-token check for the repository control endpoints (load/unload over HTTP and gRPC).
//! Off unless a token is configured; inference, health, metadata and the index stay open.

use std::sync::Arc;

/// The token a control request must present as `Authorization: Bearer <token>`.
#[derive(Clone)]
pub struct ControlToken(Arc<str>);

impl std::fmt::Debug for ControlToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlToken(<redacted>)")
    }
}

impl ControlToken {
    /// `None` for an empty token (an empty token would accept an empty header).
    pub fn new(token: &str) -> Option<Self> {
        (!token.is_empty()).then(|| ControlToken(token.into()))
    }

    /// Whether an `Authorization` header value carries this token. The comparison takes the
    /// same time wherever the first difference is.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(presented) = authorization.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let (a, b) = (presented.trim().as_bytes(), self.0.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Whether a control request may proceed: no token configured, or the right one presented.
pub fn allowed(token: Option<&ControlToken>, authorization: Option<&str>) -> bool {
    token.is_none_or(|t| t.accepts(authorization))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let t = ControlToken::new("s3cret").unwrap();
        assert!(t.accepts(Some("Bearer s3cret")));
        for bad in [
            None,
            Some(""),
            Some("s3cret"),
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("Basic s3cret"),
        ] {
            assert!(!t.accepts(bad), "{bad:?}");
        }
        assert!(ControlToken::new("").is_none());
        assert!(allowed(None, None));
        assert!(!allowed(Some(&t), None));
        assert!(format!("{t:?}").contains("redacted"));
    }
}
