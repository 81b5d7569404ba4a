//! The arguments of `svcproxy explain` and `inspect flows --service`, parsed strictly: a typo
//! is an error that says what was expected, never a guess.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgError {
    #[error("{what} {text:?}: {problem}; expected {expected}")]
    Bad {
        what: &'static str,
        text: String,
        problem: String,
        expected: &'static str,
    },
}

fn bad(
    what: &'static str,
    text: &str,
    problem: impl Into<String>,
    expected: &'static str,
) -> ArgError {
    ArgError::Bad {
        what,
        text: text.to_owned(),
        problem: problem.into(),
        expected,
    }
}

const SRC_FORM: &str = "SRC_IP or SRC_IP:PORT, e.g. 10.244.0.2 or 10.244.0.2:40000";
const DST_FORM: &str = "DST_IP:PORT/PROTO, e.g. 10.96.0.10:80/tcp";
const SVC_FORM: &str = "NAMESPACE/NAME, e.g. default/web";

/// An IPv4 address in dotted decimal. Octets with leading zeros are refused (std's parser
/// does), so "010.0.0.1" can never be read as octal (CVE-2021-29923).
fn parse_ip(
    what: &'static str,
    whole: &str,
    text: &str,
    expected: &'static str,
) -> Result<Ipv4Addr, ArgError> {
    text.parse::<Ipv4Addr>().map_err(|_| {
        bad(
            what,
            whole,
            format!("{text:?} is not an IPv4 address (dotted decimal, no leading zeros)"),
            expected,
        )
    })
}

fn parse_port(
    what: &'static str,
    whole: &str,
    text: &str,
    expected: &'static str,
) -> Result<u16, ArgError> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad(
            what,
            whole,
            format!("{text:?} is not a port (1-65535)"),
            expected,
        )),
        Ok(p) => Ok(p),
    }
}

/// Where a packet comes from: the client address, and its port if known (Maglev and
/// conntrack need it; affinity and random selection do not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    pub addr: Ipv4Addr,
    pub port: Option<u16>,
}

impl FromStr for Source {
    type Err = ArgError;

    fn from_str(text: &str) -> Result<Self, ArgError> {
        let what = "source";
        let t = text.trim();
        match t.split_once(':') {
            None => Ok(Self {
                addr: parse_ip(what, text, t, SRC_FORM)?,
                port: None,
            }),
            Some((addr, port)) => Ok(Self {
                addr: parse_ip(what, text, addr, SRC_FORM)?,
                port: Some(parse_port(what, text, port, SRC_FORM)?),
            }),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// Where a packet goes: a frontend's address, port and IP protocol number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl FromStr for Destination {
    type Err = ArgError;

    fn from_str(text: &str) -> Result<Self, ArgError> {
        let what = "destination";
        let t = text.trim();
        let Some((addr_port, proto)) = t.split_once('/') else {
            return Err(bad(what, text, "no /PROTO", DST_FORM));
        };
        let Some((addr, port)) = addr_port.split_once(':') else {
            return Err(bad(what, text, "no :PORT", DST_FORM));
        };
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => 6,
            "udp" => 17,
            "sctp" => 132,
            other => {
                return Err(bad(
                    what,
                    text,
                    format!("{other:?} is not tcp, udp or sctp"),
                    DST_FORM,
                ));
            }
        };
        Ok(Self {
            addr: parse_ip(what, text, addr, DST_FORM)?,
            port: parse_port(what, text, port, DST_FORM)?,
            proto,
        })
    }
}

/// A Service by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl FromStr for ServiceRef {
    type Err = ArgError;

    fn from_str(text: &str) -> Result<Self, ArgError> {
        match text.trim().split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(bad("service", text, "not NAMESPACE/NAME", SVC_FORM)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_with_and_without_port() {
        assert_eq!(
            "10.244.0.2".parse(),
            Ok(Source {
                addr: Ipv4Addr::new(10, 244, 0, 2),
                port: None
            })
        );
        assert_eq!(
            " 10.244.0.2:40000".parse(),
            Ok(Source {
                addr: Ipv4Addr::new(10, 244, 0, 2),
                port: Some(40000)
            })
        );
    }

    #[test]
    fn destinations_take_any_case_of_protocol() {
        for (text, proto) in [
            ("10.96.0.10:80/tcp", 6),
            ("10.96.0.10:80/UDP", 17),
            ("10.96.0.10:80/Sctp", 132),
        ] {
            assert_eq!(
                text.parse(),
                Ok(Destination {
                    addr: Ipv4Addr::new(10, 96, 0, 10),
                    port: 80,
                    proto
                }),
                "{text}"
            );
        }
    }

    /// Each mistake is named, with the form that was expected.
    #[test]
    fn malformed_arguments_say_what_is_wrong() {
        // Only the error text matters here.
        let src = |t: &str| t.parse::<Source>().map(|_| ()).map_err(|e| e.to_string());
        let dst = |t: &str| {
            t.parse::<Destination>()
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        for (got, want) in [
            (src("10.244.0"), "\"10.244.0\" is not an IPv4 address"),
            (src("010.244.0.2"), "no leading zeros"),
            (src("10.244.0.2:0"), "is not a port (1-65535)"),
            (src("10.244.0.2:70000"), "is not a port"),
            (src("10.244.0.2:"), "is not a port"),
            (src("web"), "expected SRC_IP or SRC_IP:PORT"),
            (dst("10.96.0.10:80"), "no /PROTO"),
            (dst("10.96.0.10/tcp"), "no :PORT"),
            (
                dst("10.96.0.10:80/icmp"),
                "\"icmp\" is not tcp, udp or sctp",
            ),
            (
                dst("10.96.0.300:80/tcp"),
                "\"10.96.0.300\" is not an IPv4 address",
            ),
            (dst("10.96.0.10:http/tcp"), "\"http\" is not a port"),
        ] {
            match got {
                Err(e) if e.contains(want) => {}
                other => panic!("want an error mentioning {want:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn services_are_namespace_slash_name() {
        assert_eq!(
            "dev/web".parse(),
            Ok(ServiceRef {
                namespace: "dev".into(),
                name: "web".into()
            })
        );
        for bad in ["web", "/web", "dev/", "a/b/c"] {
            let got = bad.parse::<ServiceRef>();
            assert!(
                got.as_ref()
                    .is_err_and(|e| e.to_string().contains("NAMESPACE/NAME")),
                "{bad}: {got:?}"
            );
        }
    }
}
