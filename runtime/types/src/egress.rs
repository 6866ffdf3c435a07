//! What sandboxed code did on the network: one record per connection it
//! asked the egress proxy for, allowed or refused (see the `stack-egress`
//! crate).

use serde::{Deserialize, Serialize};

/// How the sandboxed program asked for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressProtocol {
    /// An HTTP `CONNECT` tunnel (HTTPS through `HTTPS_PROXY`).
    HttpConnect,
    /// A plain HTTP request in absolute form (`HTTP_PROXY`).
    Http,
    /// A SOCKS5 `CONNECT` (`ALL_PROXY=socks5h://…`).
    Socks5,
}

impl EgressProtocol {
    /// Its name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            EgressProtocol::HttpConnect => "http_connect",
            EgressProtocol::Http => "http",
            EgressProtocol::Socks5 => "socks5",
        }
    }
}

/// Whether the proxy let the connection through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressDecision {
    /// Connected to the address the proxy checked.
    Allowed,
    /// Refused; nothing left the machine for it.
    Refused,
    /// Allowed, but no address of the host could be reached (or the name
    /// did not resolve).
    Unreachable,
}

/// One connection sandboxed code asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRecord {
    /// The host it named (a name, or an address written as one).
    pub host: String,
    /// The port it named.
    pub port: u16,
    /// The address the proxy connected to (allowed), or the one it refused
    /// (a name that resolved to a private address); `None` when no address
    /// was looked at.
    pub address: Option<std::net::IpAddr>,
    /// How it asked.
    pub protocol: EgressProtocol,
    /// Allowed or refused.
    pub decision: EgressDecision,
    /// The rule that decided, in words: `allow pypi.org`, `deny
    /// gist.github.com`, `not on the allow list`, `private address`…
    pub rule: String,
    /// Bytes sent to the host.
    pub bytes_out: u64,
    /// Bytes received from the host.
    pub bytes_in: u64,
}

impl EgressRecord {
    /// One line for the model and the user: `refused gist.github.com:443
    /// (deny gist.github.com)`.
    pub fn summary(&self) -> String {
        let verb = match self.decision {
            EgressDecision::Allowed => "allowed",
            EgressDecision::Refused => "refused",
            EgressDecision::Unreachable => "unreachable",
        };
        let address = match self.address {
            Some(address) if address.to_string() != self.host => format!(" [{address}]"),
            _ => String::new(),
        };
        format!(
            "{verb} {}:{}{address} ({})",
            self.host, self.port, self.rule
        )
    }
}
