//! A call's network reach as a policy writes it: `"none"`, `"loopback"`,
//! `"full"`, or an allowlist table (`{ allow = [...], deny = [...] }`)
//! served by an egress proxy (see the `stack-egress` crate).

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use stack_egress::{Allowlist, EgressRules};

use super::spec::NetworkMode;

/// Network reach of a call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// No network at all.
    #[default]
    None,
    /// A private loopback interface only.
    Loopback,
    /// The host's network.
    Full,
    /// Only the hosts the allowlist allows, through the runtime's egress
    /// proxy; no other route out.
    Allowlist(Allowlist),
}

impl Network {
    /// The sandbox mode that carries it (an allowlist runs
    /// [`NetworkMode::Proxied`]).
    pub fn mode(&self) -> NetworkMode {
        match self {
            Network::None => NetworkMode::None,
            Network::Loopback => NetworkMode::Loopback,
            Network::Full => NetworkMode::Full,
            Network::Allowlist(_) => NetworkMode::Proxied,
        }
    }

    /// The allowlist, if it is one.
    pub fn allowlist(&self) -> Option<&Allowlist> {
        match self {
            Network::Allowlist(list) => Some(list),
            _ => None,
        }
    }

    /// `over` layered on `self` (a per-tool or per-language section on the
    /// defaults): an allowlist over an allowlist narrows it (a connection
    /// must pass both); anything else replaces.
    pub fn layered(&self, over: &Network) -> Network {
        match (self, over) {
            (Network::Allowlist(base), Network::Allowlist(narrower)) => {
                Network::Allowlist(base.narrowed(narrower))
            }
            _ => over.clone(),
        }
    }

    /// What both allow (a client's session policy inside a host's): the
    /// narrower of two modes, both allowlists at once, an allowlist within
    /// `full`; an allowlist and `loopback` share nothing, which is `none`.
    pub fn within(&self, outer: &Network) -> Network {
        use Network::*;
        match (self, outer) {
            (None, _) | (_, None) => None,
            (Full, other) | (other, Full) => other.clone(),
            (Loopback, Loopback) => Loopback,
            (Allowlist(inner), Allowlist(outer)) => Allowlist(outer.narrowed(inner)),
            (Loopback, Allowlist(_)) | (Allowlist(_), Loopback) => None,
        }
    }

    /// How it reads in a policy and in `agent policy show`.
    pub fn describe(&self) -> String {
        match self {
            Network::None => "none".into(),
            Network::Loopback => "loopback".into(),
            Network::Full => "full".into(),
            Network::Allowlist(list) => {
                let tables: Vec<String> =
                    list.tables().iter().map(|table| table.describe()).collect();
                format!("allowlist {}", tables.join(" and "))
            }
        }
    }
}

impl From<NetworkMode> for Network {
    fn from(mode: NetworkMode) -> Self {
        match mode {
            NetworkMode::None | NetworkMode::Proxied => Network::None,
            NetworkMode::Loopback => Network::Loopback,
            NetworkMode::Full => Network::Full,
        }
    }
}

impl Serialize for Network {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Network::None => serializer.serialize_str("none"),
            Network::Loopback => serializer.serialize_str("loopback"),
            Network::Full => serializer.serialize_str("full"),
            Network::Allowlist(list) => match list.tables() {
                [one] => one.serialize(serializer),
                many => many.serialize(serializer),
            },
        }
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NetworkVisitor;

        impl<'de> Visitor<'de> for NetworkVisitor {
            type Value = Network;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "\"none\", \"loopback\", \"full\", or an allowlist table { allow = [\"host\", \"*.domain\", …], deny = […] }",
                )
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Network, E> {
                match text {
                    "none" => Ok(Network::None),
                    "loopback" => Ok(Network::Loopback),
                    "full" => Ok(Network::Full),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }

            /// Several tables (as a narrowed allowlist serializes): a
            /// connection must pass each.
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Network, A::Error> {
                let mut list: Option<Allowlist> = None;
                while let Some(rules) = seq.next_element::<EgressRules>()? {
                    let table = Allowlist::from(rules);
                    list = Some(match list {
                        Some(list) => list.narrowed(&table),
                        None => table,
                    });
                }
                list.map(Network::Allowlist)
                    .ok_or_else(|| de::Error::invalid_length(0, &self))
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Network, M::Error> {
                let rules = EgressRules::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Network::Allowlist(Allowlist::from(rules)))
            }
        }

        deserializer.deserialize_any(NetworkVisitor)
    }
}
