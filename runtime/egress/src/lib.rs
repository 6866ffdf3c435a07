//! Network egress by name: sandboxed code reaches only the hosts its policy
//! allows, through a proxy the runtime runs outside the sandbox.
//!
//! # How it fits
//! A call whose policy has a network allowlist runs in a network namespace
//! of its own with only a loopback interface and no route out. Inside it,
//! the sandbox binds one listening socket on `127.0.0.1` and hands it to
//! the runtime, which serves it with an [`EgressProxy`]; landlock lets the
//! sandboxed process connect to that one port and bind none, and
//! `HTTP_PROXY`, `HTTPS_PROXY` and `ALL_PROXY` name it. The proxy decides
//! each connection ([`Allowlist`]), resolves names itself, checks every
//! address it got, connects to an address it checked, and records it
//! ([`stack_types::EgressRecord`]).
//!
//! # Threat model
//! The adversary is the code in the sandbox (a model's, or what it
//! downloaded), which wants to reach a host the policy does not allow: to
//! exfiltrate the workspace, reach the cloud metadata endpoint or the LAN,
//! or fetch a second stage. It controls every byte it sends the proxy and
//! every name it asks for, and may control DNS answers for names it owns.
//! - **Ignoring the proxy variables gets nowhere.** There is no other
//!   route: the namespace has no interface but loopback, and landlock
//!   refuses TCP connects to any port but the proxy's, so a direct connect
//!   to an address fails, IPv4 or IPv6. UDP (DNS to an outside resolver,
//!   QUIC) has no route either, and SOCKS5 `UDP ASSOCIATE` is refused.
//! - **Names are decided, then their addresses.** Deny beats allow;
//!   wildcards match subdomains only. The proxy resolves a name once,
//!   drops every private, loopback, link-local or otherwise special address
//!   ([`rules::is_special_address`]) that no allow entry names exactly, and
//!   connects to an address that passed: a DNS answer that changes between
//!   check and connect (rebinding) cannot slip a private address in.
//!   Numeric spellings of addresses (`2130706433`, `0x7f.1`) are refused as
//!   names.
//! - **What is decided is what is reached.** A `CONNECT` tunnel goes to the
//!   checked address of the name it named, whatever the bytes inside say; a
//!   plain HTTP request whose `Host` header names another host than its
//!   URL is refused; each request on a kept-alive connection is decided on
//!   its own, so a redirect to a denied host is refused when followed.
//! - **Parsing is hyper's.** HTTP on both sides goes through hyper; SOCKS5
//!   is three fixed-size messages, each read whole under a deadline. A
//!   plain request must carry one `Host` naming its URL's host, and the
//!   upstream gets exactly that one.
//! - **Bounded.** A proxy serves at most 64 connections at once (more wait
//!   in the listener's backlog, not in the runtime) and runs at most 8 name
//!   lookups; a request head is capped at 64 KiB and must arrive within
//!   10 s; deciding and opening a connection has a 15 s deadline. Refusals
//!   kept per call are capped (the rest are counted,
//!   [`EgressReport::dropped`]) and cannot push allowed connections out of
//!   the record. Everything the proxy holds for a call ends with the call.
//! - **Calls do not share a way out.** Landlock's TCP rules do not cover
//!   MPTCP or SMC sockets, so the sandbox's seccomp filter refuses them,
//!   and calls under different allowlists never share a network namespace
//!   (the allowlist is part of the zygote's key).
//! - **Pins cannot widen.** Only the first table's `hosts` (the policy's
//!   own, or the host's over a client's session policy) pin names; address
//!   deny entries hold for resolved addresses too.
//!
//! Not in scope: what an allowed host does with what it gets (allowing a
//! host that echoes data back to anyone, a paste site say, allows
//! exfiltration through it, and a CDN that routes by SNI or `Host` inside
//! a tunnel allows its other customers: domain fronting), TLS inspection
//! (`CONNECT` is opaque; the proxy decides by the name the client asked
//! for, not the SNI), and WASI guests, which have no network at all. An
//! exact loopback entry (`127.0.0.1`) names the runtime host's loopback,
//! not the sandbox's.

pub mod proxy;
pub mod resolve;
pub mod rules;

pub use proxy::{vet, EgressProxy, EgressReport, Refused, Vetted};
pub use rules::{Allowlist, BadEntry, EgressRules, Host, Refusal, RefusalKind};
