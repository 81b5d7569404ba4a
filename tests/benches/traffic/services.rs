//! The Services every proxied variant is loaded with: N Services x 10 endpoints, the measured
//! one among them with the real backend pods, plus one single-endpoint Service for iperf3.
//! Each variant renders this one list in its own format, so all of them hold the same rules.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::iperf;

pub const NAMESPACE: &str = "bench";
pub const ENDPOINTS_PER_SERVICE: usize = 10;
/// The Service port clients use and the port the backend servers listen on.
pub const SERVICE_PORT: u16 = 80;
pub const BACKEND_PORT: u16 = 8080;
/// Pod addresses (the masquerade rules' "cluster CIDR": traffic from inside is not SNATed).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// ClusterIPs: 10.96.0.1 and up.
const SERVICE_BASE: u32 = u32::from_be_bytes([10, 96, 0, 1]);
/// The other Services' endpoints: addresses in no route of the node (never used).
const FAKE_ENDPOINT_BASE: u32 = u32::from_be_bytes([10, 128, 0, 1]);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// As in a Service spec and in iptables/nft rules (lowercased there).
    pub fn upper(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }

    pub fn lower(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

pub struct Port {
    pub name: &'static str,
    pub proto: Proto,
    pub port: u16,
    pub target: u16,
}

pub struct Service {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<Port>,
    pub endpoints: Vec<Ipv4Addr>,
}

/// The loaded Services, in the order kube-proxy would list them.
pub struct ServiceSet {
    pub services: Vec<Service>,
    /// Index of the measured Service in `services`.
    pub measured: usize,
    /// Index of the iperf3 Service.
    pub bulk: usize,
}

impl ServiceSet {
    /// `n` Services of [`ENDPOINTS_PER_SERVICE`] endpoints, plus the iperf3 Service right after
    /// the measured one.
    ///
    /// The measured Service sits in the middle of the list: kube-proxy writes Services in Go
    /// map order, which is random, so the middle is where the measured one lands on average
    /// (it matters for iptables, whose `KUBE-SERVICES` chain is walked rule by rule).
    pub fn new(n: usize, backends: &[Ipv4Addr]) -> Self {
        assert_eq!(
            backends.len(),
            ENDPOINTS_PER_SERVICE,
            "one backend pod per endpoint"
        );
        let measured = n / 2;
        let mut services = Vec::with_capacity(n + 1);
        for i in 0..n {
            let (ports, endpoints) = if i == measured {
                (
                    vec![
                        port("http", Proto::Tcp, SERVICE_PORT, BACKEND_PORT),
                        port("udp", Proto::Udp, SERVICE_PORT, BACKEND_PORT),
                    ],
                    backends.to_vec(),
                )
            } else {
                let fake = (0..ENDPOINTS_PER_SERVICE)
                    .map(|j| {
                        Ipv4Addr::from(FAKE_ENDPOINT_BASE + (i * ENDPOINTS_PER_SERVICE + j) as u32)
                    })
                    .collect();
                (
                    vec![port("http", Proto::Tcp, SERVICE_PORT, BACKEND_PORT)],
                    fake,
                )
            };
            services.push(Service {
                name: format!("svc-{i:05}"),
                cluster_ip: Ipv4Addr::from(SERVICE_BASE + i as u32),
                ports,
                endpoints,
            });
            if i == measured {
                services.push(Service {
                    name: "bulk".into(),
                    cluster_ip: Ipv4Addr::from(SERVICE_BASE + n as u32),
                    ports: vec![port("iperf", Proto::Tcp, iperf::PORT, iperf::PORT)],
                    endpoints: vec![backends[0]],
                });
            }
        }
        Self {
            services,
            measured,
            bulk: measured + 1,
        }
    }

    /// Where clients send to reach the measured Service (TCP and UDP).
    pub fn measured_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.services[self.measured].cluster_ip, SERVICE_PORT)
    }

    pub fn bulk_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.services[self.bulk].cluster_ip, iperf::PORT)
    }
}

fn port(name: &'static str, proto: Proto, port: u16, target: u16) -> Port {
    Port {
        name,
        proto,
        port,
        target,
    }
}

/// A 16-character base32 name hash, the length kube-proxy uses for `KUBE-SVC-`/`KUBE-SEP-`
/// chains (8 for nftables chains). kube-proxy hashes with SHA-256; the rules only need the
/// names unique and of the same length, so a 64-bit FNV-1a over the same string, twice with
/// different seeds, does.
pub fn name_hash(text: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        text.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    };
    let bits =
        (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x8422_2325_cbf2_9ce4));
    (0..len.min(25))
        .map(|i| char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]))
        .collect()
}
