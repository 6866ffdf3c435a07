//! The allowlist: which hosts sandboxed code may reach, as a policy writes
//! it, and the decision for one host.
//!
//! ```toml
//! [sandbox]
//! network = { allow = ["pypi.org", "*.github.com", "10.0.0.7"], deny = ["gist.github.com"] }
//! ```
//!
//! - An entry is a host name (`pypi.org`), a wildcard that matches
//!   subdomains only (`*.github.com` matches `api.github.com` and
//!   `a.b.github.com`, never `github.com`), or an exact address (`10.0.0.7`,
//!   `[fd00::1]`), each with an optional port (`pypi.org:443`).
//! - Deny beats allow; a host no allow entry matches is refused.
//! - Every address a name resolves to is checked again: private, loopback,
//!   link-local, metadata and other special addresses
//!   ([`is_special_address`]) are refused unless an allow entry names that
//!   exact address.
//! - `hosts = { "mirror.internal" = "10.0.0.7" }` pins names to addresses
//!   (like `curl --resolve`); the address checks still apply.
//! - A narrower section (per tool, per language, or a client's session
//!   policy) adds a table, and a connection must pass every table
//!   ([`Allowlist::narrowed`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// A policy entry that is not a host, a wildcard or an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network entry `{entry}`: {problem}")]
pub struct BadEntry {
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub problem: String,
}

/// What an entry matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Pattern {
    /// This one name.
    Name(String),
    /// Names under this domain (not the domain itself).
    Subdomains(String),
    /// This one address.
    Address(IpAddr),
}

/// One allow or deny entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    pattern: Pattern,
    port: Option<u16>,
    text: String,
}

impl Entry {
    /// Parses `pypi.org`, `*.github.com`, `10.0.0.7`, `[fd00::1]:8080`…
    pub fn parse(written: &str) -> Result<Entry, BadEntry> {
        let bad = |problem: &str| BadEntry {
            entry: written.to_string(),
            problem: problem.to_string(),
        };
        let text = written.trim().to_ascii_lowercase();
        if text.is_empty() {
            return Err(bad("empty"));
        }
        if text == "*" || text.starts_with("*:") {
            return Err(bad(
                "a bare `*` would allow every host; write network = \"full\" for that",
            ));
        }
        let (host, port) = split_host_port(&text).map_err(|problem| bad(&problem))?;
        let pattern = if let Ok(address) = host.parse::<IpAddr>() {
            let address = canonical(address);
            if address.is_unspecified() || address.is_multicast() {
                return Err(bad("an unspecified or multicast address names no one host"));
            }
            Pattern::Address(address)
        } else if let Some(domain) = host.strip_prefix("*.") {
            check_name(domain).map_err(|problem| bad(&problem))?;
            Pattern::Subdomains(domain.to_string())
        } else {
            check_name(host).map_err(|problem| bad(&problem))?;
            Pattern::Name(host.to_string())
        };
        Ok(Entry {
            pattern,
            port,
            text,
        })
    }

    /// The entry as written (lower-cased).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn matches(&self, host: &Host, port: u16) -> bool {
        if self.port.is_some_and(|own| own != port) {
            return false;
        }
        match (&self.pattern, host) {
            (Pattern::Name(name), Host::Name(asked)) => name == asked,
            (Pattern::Subdomains(domain), Host::Name(asked)) => asked
                .strip_suffix(domain.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            (Pattern::Address(address), Host::Address(asked)) => address == asked,
            _ => false,
        }
    }

    fn names_address(&self, address: IpAddr, port: u16) -> bool {
        self.matches(&Host::Address(address), port)
    }
}

/// `host` or `host:port`, `[v6]` or `[v6]:port`, or a bare v6 address: the
/// host and the port, if one is given (1-65535).
pub fn split_host_port(text: &str) -> Result<(&str, Option<u16>), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{p}` is not a port (1-65535)"))
    };
    if let Some(rest) = text.strip_prefix('[') {
        let (address, after) = rest
            .split_once(']')
            .ok_or("an opening `[` without its `]`")?;
        return match after {
            "" => Ok((address, None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((address, Some(port(p)?))),
                None => Err(format!("unexpected `{after}` after the address")),
            },
        };
    }
    if text.parse::<Ipv6Addr>().is_ok() {
        return Ok((text, None));
    }
    match text.rsplit_once(':') {
        Some((host, p)) => Ok((host, Some(port(p)?))),
        None => Ok((text, None)),
    }
}

/// A DNS name: labels of letters, digits, `-` and `_`, at most 253 bytes.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("not a host name (1 to 253 characters)".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("`{name}` has an empty or over-long label"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "`{name}` is not a host name (letters, digits, `-`, `.`; a wildcard only as a leading `*.`)"
            ));
        }
    }
    Ok(())
}

/// A host as sandboxed code named it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower-cased, without a trailing dot.
    Name(String),
    /// An address literal.
    Address(IpAddr),
}

impl Host {
    /// Reads what a client sent (`PyPI.org.`, `127.0.0.1`, `[::1]`), or
    /// says why it is not a host.
    pub fn parse(text: &str) -> Result<Host, String> {
        let text = text.trim();
        let bare = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(text);
        if let Ok(address) = bare.parse::<IpAddr>() {
            return Ok(Host::Address(canonical(address)));
        }
        let name = text.trim_end_matches('.').to_ascii_lowercase();
        check_name(&name)?;
        // `0x7f.1`, `2130706433`: spellings of addresses that resolvers
        // accept and a name rule would not catch.
        if name.split('.').all(|label| {
            label.bytes().all(|b| b.is_ascii_digit())
                || label.starts_with("0x") && label[2..].bytes().all(|b| b.is_ascii_hexdigit())
        }) {
            return Err(format!(
                "`{text}` is a numeric spelling of an address; write the address in dotted form"
            ));
        }
        Ok(Host::Name(name))
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Address(IpAddr::V6(address)) => write!(f, "[{address}]"),
            Host::Address(address) => write!(f, "{address}"),
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Whether `address` is anything but a public unicast address: private
/// (10/8, 172.16/12, 192.168/16, fc00::/7), loopback, link-local (which
/// holds the cloud metadata endpoint 169.254.169.254), shared (100.64/10),
/// unspecified, broadcast, multicast, documentation, benchmarking, reserved,
/// and IPv6 addresses that embed one of those (IPv4-mapped, NAT64, 6to4).
pub fn is_special_address(address: IpAddr) -> bool {
    match canonical(address) {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    v4.is_unspecified()
        || v4.is_private()
        || v4.is_loopback()
        || v4.is_link_local()
        || v4.is_broadcast()
        || v4.is_documentation()
        || v4.is_multicast()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19))
}

fn special_v6(v6: Ipv6Addr) -> bool {
    let segments = v6.segments();
    let embedded_v4 = |high: u16, low: u16| {
        Ipv4Addr::new((high >> 8) as u8, high as u8, (low >> 8) as u8, low as u8)
    };
    v6.is_unspecified()
        || v6.is_loopback()
        || v6.is_multicast()
        // fc00::/7 unique local, fe80::/10 link-local
        || (segments[0] & 0xfe00) == 0xfc00
        || (segments[0] & 0xffc0) == 0xfe80
        // fec0::/10 site-local (deprecated, still routed inside sites)
        || (segments[0] & 0xffc0) == 0xfec0
        // 2001::/23 IETF protocol assignments (Teredo, ORCHID…), which
        // covers 2001:db8::/32 documentation too; 100::/64 discard
        || (segments[0] == 0x2001 && segments[1] < 0x0200)
        || (segments[0] == 0x2001 && segments[1] == 0x0db8)
        // 64:ff9b:1::/48 local-use NAT64
        || (segments[0..3] == [0x64, 0xff9b, 1])
        || (segments[0] == 0x0100 && segments[1..4] == [0, 0, 0])
        // 64:ff9b::/96 NAT64 and 2002::/16 6to4 carry an IPv4 address
        || (segments[0..6] == [0x64, 0xff9b, 0, 0, 0, 0]
            && special_v4(embedded_v4(segments[6], segments[7])))
        || (segments[0] == 0x2002 && special_v4(embedded_v4(segments[1], segments[2])))
        // ::a.b.c.d (IPv4-compatible, deprecated)
        || (segments[0..6] == [0, 0, 0, 0, 0, 0])
}

/// One `network = { … }` table as a policy writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WrittenTable {
    allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    deny: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    hosts: BTreeMap<String, IpAddr>,
}

/// One table of rules: allow and deny entries, and pinned names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "WrittenTable", into = "WrittenTable")]
pub struct EgressRules {
    allow: Vec<Entry>,
    deny: Vec<Entry>,
    hosts: BTreeMap<String, IpAddr>,
}

impl TryFrom<WrittenTable> for EgressRules {
    type Error = BadEntry;

    fn try_from(written: WrittenTable) -> Result<Self, Self::Error> {
        let parse = |list: &[String]| -> Result<Vec<Entry>, BadEntry> {
            list.iter().map(|e| Entry::parse(e)).collect()
        };
        let mut hosts = BTreeMap::new();
        for (name, address) in written.hosts {
            match Host::parse(&name) {
                Ok(Host::Name(name)) => {
                    hosts.insert(name, canonical(address));
                }
                _ => {
                    return Err(BadEntry {
                        entry: name,
                        problem: "a `hosts` key must be a host name".into(),
                    })
                }
            }
        }
        Ok(EgressRules {
            allow: parse(&written.allow)?,
            deny: parse(&written.deny)?,
            hosts,
        })
    }
}

impl From<EgressRules> for WrittenTable {
    fn from(rules: EgressRules) -> Self {
        let text = |list: &[Entry]| list.iter().map(|e| e.text.clone()).collect();
        WrittenTable {
            allow: text(&rules.allow),
            deny: text(&rules.deny),
            hosts: rules.hosts,
        }
    }
}

impl EgressRules {
    /// Rules from lists of entries (as a policy would write them).
    pub fn new<S: AsRef<str>>(allow: &[S], deny: &[S]) -> Result<EgressRules, BadEntry> {
        let parse = |list: &[S]| -> Result<Vec<Entry>, BadEntry> {
            list.iter().map(|e| Entry::parse(e.as_ref())).collect()
        };
        Ok(EgressRules {
            allow: parse(allow)?,
            deny: parse(deny)?,
            hosts: BTreeMap::new(),
        })
    }

    /// These rules with `name` pinned to `address`.
    pub fn pin(mut self, name: &str, address: IpAddr) -> Result<EgressRules, BadEntry> {
        match Host::parse(name) {
            Ok(Host::Name(name)) => {
                self.hosts.insert(name, canonical(address));
                Ok(self)
            }
            _ => Err(BadEntry {
                entry: name.to_string(),
                problem: "a `hosts` key must be a host name".into(),
            }),
        }
    }

    /// `{ allow = [...], deny = [...] }`, as a policy would write it.
    pub fn describe(&self) -> String {
        let list = |entries: &[Entry]| {
            entries
                .iter()
                .map(|e| format!("{:?}", e.text))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut text = format!("{{ allow = [{}]", list(&self.allow));
        if !self.deny.is_empty() {
            text.push_str(&format!(", deny = [{}]", list(&self.deny)));
        }
        if !self.hosts.is_empty() {
            let pins: Vec<String> = self
                .hosts
                .iter()
                .map(|(name, address)| format!("{name:?} = \"{address}\""))
                .collect();
            text.push_str(&format!(", hosts = {{ {} }}", pins.join(", ")));
        }
        text.push_str(" }");
        text
    }

    fn decide_name(&self, host: &Host, port: u16) -> Result<String, Refusal> {
        if let Some(entry) = self.deny.iter().find(|e| e.matches(host, port)) {
            return Err(Refusal::new(
                RefusalKind::Denied,
                format!("deny {}", entry.text),
            ));
        }
        match self.allow.iter().find(|e| e.matches(host, port)) {
            Some(entry) => Ok(format!("allow {}", entry.text)),
            None => Err(Refusal::new(
                RefusalKind::NotAllowed,
                "not on the allow list".into(),
            )),
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// A deny entry matched.
    Denied,
    /// No allow entry matched.
    NotAllowed,
    /// Every address the name resolved to is private or special, and no
    /// allow entry names it.
    PrivateAddress,
    /// The name did not resolve.
    Unresolvable,
    /// Not a host (`Host::parse` refused it), or an unsupported request.
    BadRequest,
    /// A plain HTTP request whose `Host` header names another host than
    /// its URL.
    HostMismatch,
    /// Allowed, but the host could not be reached.
    Unreachable,
}

/// A refused connection: why, and the rule in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub kind: RefusalKind,
    /// The rule (`deny gist.github.com`), or what went wrong.
    pub rule: String,
}

impl Refusal {
    /// A refusal of `kind` by `rule`.
    pub fn new(kind: RefusalKind, rule: String) -> Refusal {
        Refusal { kind, rule }
    }
}

/// The rules a connection must pass: one table, or several when narrower
/// sections added theirs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "EgressRules", into = "Vec<EgressRules>")]
pub struct Allowlist {
    tables: Vec<EgressRules>,
}

impl From<EgressRules> for Allowlist {
    fn from(rules: EgressRules) -> Self {
        Allowlist {
            tables: vec![rules],
        }
    }
}

impl From<Allowlist> for Vec<EgressRules> {
    fn from(list: Allowlist) -> Self {
        list.tables
    }
}

impl Allowlist {
    /// Both lists' tables: a connection must pass each.
    pub fn narrowed(&self, by: &Allowlist) -> Allowlist {
        let mut tables = self.tables.clone();
        for table in &by.tables {
            if !tables.contains(table) {
                tables.push(table.clone());
            }
        }
        Allowlist { tables }
    }

    /// The tables.
    pub fn tables(&self) -> &[EgressRules] {
        &self.tables
    }

    /// The decision for `host:port` before any lookup: the rule that
    /// allows it (each table's, joined), or the first refusal.
    pub fn decide(&self, host: &Host, port: u16) -> Result<String, Refusal> {
        let mut rules = Vec::new();
        for table in &self.tables {
            let rule = table.decide_name(host, port)?;
            if !rules.contains(&rule) {
                rules.push(rule);
            }
        }
        if rules.is_empty() {
            return Err(Refusal::new(
                RefusalKind::NotAllowed,
                "not on the allow list".into(),
            ));
        }
        Ok(rules.join(" + "))
    }

    /// Whether the proxy may connect to `address` (one that an allowed
    /// name resolved to, or an allowed literal): a public address, or a
    /// special one that every table names exactly.
    pub fn address_allowed(&self, address: IpAddr, port: u16) -> bool {
        let address = canonical(address);
        let denied = self
            .tables
            .iter()
            .any(|table| table.deny.iter().any(|e| e.names_address(address, port)));
        !denied
            && (!is_special_address(address)
                || self
                    .tables
                    .iter()
                    .all(|table| table.allow.iter().any(|e| e.names_address(address, port))))
    }

    /// The address a name is pinned to, if the first table (the policy's
    /// own, or the host's for a client's session policy) pins it. A
    /// narrower table's `hosts` is not used: pinning a name to an address
    /// the wider table never saw would widen it.
    pub fn pinned(&self, name: &str) -> Option<IpAddr> {
        self.tables
            .first()
            .and_then(|table| table.hosts.get(name).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(allow: &[&str], deny: &[&str]) -> Allowlist {
        Allowlist::from(EgressRules::new(allow, deny).expect("rules"))
    }

    fn host(text: &str) -> Host {
        Host::parse(text).expect("host")
    }

    #[test]
    fn deny_beats_allow_and_wildcards_match_subdomains_only() {
        let rules = list(
            &["pypi.org", "*.github.com", "files.pythonhosted.org:443"],
            &["gist.github.com"],
        );
        let cases: &[(&str, u16, Option<RefusalKind>)] = &[
            ("pypi.org", 443, None),
            ("PyPI.org.", 80, None),
            ("api.github.com", 443, None),
            ("a.b.github.com", 443, None),
            ("github.com", 443, Some(RefusalKind::NotAllowed)),
            ("evilgithub.com", 443, Some(RefusalKind::NotAllowed)),
            ("gist.github.com", 443, Some(RefusalKind::Denied)),
            ("files.pythonhosted.org", 443, None),
            ("files.pythonhosted.org", 80, Some(RefusalKind::NotAllowed)),
            ("pypi.org.evil.com", 443, Some(RefusalKind::NotAllowed)),
            ("127.0.0.1", 80, Some(RefusalKind::NotAllowed)),
        ];
        for (name, port, expected) in cases {
            let got = rules.decide(&host(name), *port).err().map(|r| r.kind);
            assert_eq!(got, *expected, "{name}:{port}");
        }
    }

    #[test]
    fn special_addresses_are_refused_unless_named_exactly() {
        let rules = list(&["internal.test", "10.0.0.7"], &[]);
        for special in [
            "10.1.2.3",
            "127.0.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "fec0::1",
            "2001::1",
            "64:ff9b:1::a00:1",
        ] {
            let address: IpAddr = special.parse().expect("address");
            assert!(is_special_address(address), "{special}");
            assert!(!rules.address_allowed(address, 443), "{special}");
        }
        assert!(rules.address_allowed("10.0.0.7".parse().expect("ip"), 443));
        assert!(rules.address_allowed("151.101.0.223".parse().expect("ip"), 443));
        assert!(rules.address_allowed("2a04:4e42::223".parse().expect("ip"), 443));
    }

    #[test]
    fn address_deny_entries_hold_for_resolved_addresses_and_only_the_first_table_pins() {
        let rules = list(&["pypi.org"], &["151.101.0.223"]);
        assert!(!rules.address_allowed("151.101.0.223".parse().expect("ip"), 443));
        assert!(rules.address_allowed("151.101.64.223".parse().expect("ip"), 443));
        let host = Allowlist::from(EgressRules::new(&["pypi.org"], &[]).expect("rules"));
        let client = Allowlist::from(
            EgressRules::new(&["pypi.org"], &[])
                .expect("rules")
                .pin("pypi.org", "45.33.32.156".parse().expect("ip"))
                .expect("pin"),
        );
        assert_eq!(host.narrowed(&client).pinned("pypi.org"), None);
    }

    #[test]
    fn a_narrower_table_must_also_allow() {
        let wide = list(&["*.github.com", "pypi.org"], &[]);
        let narrow = list(&["api.github.com"], &[]);
        let both = wide.narrowed(&narrow);
        assert!(both.decide(&host("api.github.com"), 443).is_ok());
        assert_eq!(
            both.decide(&host("pypi.org"), 443).err().map(|r| r.kind),
            Some(RefusalKind::NotAllowed)
        );
    }

    #[test]
    fn bad_entries_and_hosts_are_refused_with_a_reason() {
        for bad in [
            "*",
            "",
            "pypi.org:0",
            "pypi.org:99999",
            "bad host",
            "a..b",
            "*.*.x",
        ] {
            assert!(Entry::parse(bad).is_err(), "{bad:?}");
        }
        for bad in ["2130706433", "0x7f.1", "a b", ""] {
            assert!(Host::parse(bad).is_err(), "{bad:?}");
        }
        let table: Result<EgressRules, _> =
            toml::from_str::<EgressRules>("allow = [\"ok.test\"]\nlimit = 3\n");
        assert!(table.is_err());
    }

    #[test]
    fn a_policy_table_reads_and_pins() {
        let rules: EgressRules = toml::from_str(
            "allow = [\"mirror.test\", \"10.0.0.7\"]\ndeny = []\nhosts = { \"Mirror.test\" = \"10.0.0.7\" }\n",
        )
        .expect("table");
        let list = Allowlist::from(rules);
        assert_eq!(
            list.pinned("mirror.test"),
            Some("10.0.0.7".parse().expect("ip"))
        );
    }
}
