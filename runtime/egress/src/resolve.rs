//! Name lookups for the proxy: a name the policy pins (`hosts`) resolves to
//! its pinned address; any other goes to the system resolver
//! (`getaddrinfo`, on tokio's blocking pool, never on a runtime thread),
//! under a deadline.

use std::net::IpAddr;
use std::time::Duration;

use crate::rules::{canonical, Allowlist, Refusal, RefusalKind};

/// How long one lookup may take.
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(5);

/// The addresses `name` resolves to (pinned, or the system resolver's), in
/// the resolver's order, each once.
pub async fn resolve(rules: &Allowlist, name: &str, port: u16) -> Result<Vec<IpAddr>, Refusal> {
    if let Some(address) = rules.pinned(name) {
        return Ok(vec![address]);
    }
    let unresolvable = |why: String| Refusal::new(RefusalKind::Unresolvable, why);
    // Fully qualified (a trailing dot), so that no search domain of the
    // resolver's configuration is tried first.
    let qualified = format!("{name}.");
    let found = tokio::time::timeout(
        LOOKUP_DEADLINE,
        tokio::net::lookup_host((qualified.as_str(), port)),
    )
    .await
    .map_err(|_| {
        unresolvable(format!(
            "looking up {name} took over {} s",
            LOOKUP_DEADLINE.as_secs()
        ))
    })?
    .map_err(|err| unresolvable(format!("{name} did not resolve: {err}")))?;
    let mut addresses: Vec<IpAddr> = Vec::new();
    for address in found.map(|socket| canonical(socket.ip())) {
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    if addresses.is_empty() {
        return Err(unresolvable(format!("{name} has no addresses")));
    }
    Ok(addresses)
}
