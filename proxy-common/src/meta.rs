//! What the kernel maps cannot say by themselves, for inspection: which Service a service id
//! belongs to, and why its frontend has the backends and flags it has. The datapath never reads
//! this map; it lives in the eBPF object only so that it carries BTF like the others
//! (`bpftool map dump` shows its field names). The controller's map writer writes a frontend's
//! record before the frontend itself and removes it after, so whatever a frontend names has a
//! record.

use bytemuck::{Pod, Zeroable};

/// `HashMap<u32, ServiceMeta>`: service id -> names and selection reasons.
pub const SVC_META: &str = "SVC_META";

/// Room for a namespace or Service name: Kubernetes allows 63 bytes (a DNS label).
pub const META_NAME_LEN: usize = 64;
/// Room for a port name: Kubernetes allows 15 bytes (an IANA service name).
pub const META_PORT_NAME_LEN: usize = 16;
/// Room for a zone name: label values are at most 63 bytes.
pub const META_ZONE_LEN: usize = 64;

/// The frontend's address is one of the Service's `spec.clusterIPs`.
pub const META_ADDR_CLUSTER_IP: u8 = 0;
/// ... one of its `spec.externalIPs`.
pub const META_ADDR_EXTERNAL_IP: u8 = 1;
/// ... one of its `status.loadBalancer.ingress[].ip` (ipMode VIP).
pub const META_ADDR_LOAD_BALANCER: u8 = 2;

/// `internalTrafficPolicy: Local`: only endpoints on this node are used.
pub const META_R_NODE_LOCAL: u32 = 1;
/// Topology-aware routing narrowed the endpoints to this node's zone (`zone`).
pub const META_R_TOPOLOGY: u32 = 2;
/// The Service asks for topology-aware routing, but the hints do not allow it (a ready
/// endpoint without hint, or no hint for this zone): every zone's endpoints are used.
pub const META_R_TOPOLOGY_IGNORED: u32 = 4;
/// No endpoint is ready: the serving and terminating ones take new flows.
pub const META_R_TERMINATING_FALLBACK: u32 = 8;
/// `externalTrafficPolicy: Local` is not applied here: traffic from pods to an external or
/// load-balancer IP uses every endpoint, as with kube-proxy.
pub const META_R_EXTERNAL_LOCAL_NOT_APPLIED: u32 = 16;
/// Some text field was longer than its room and was cut (at a character boundary).
pub const META_R_TRUNCATED: u32 = 32;

/// Value of [`SVC_META`]. Text fields are UTF-8, padded with NULs (a field that fills its room
/// has none).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceMeta {
    pub namespace: [u8; META_NAME_LEN],
    pub name: [u8; META_NAME_LEN],
    pub port_name: [u8; META_PORT_NAME_LEN],
    /// The zone topology-aware routing keeps (with [`META_R_TOPOLOGY`]).
    pub zone: [u8; META_ZONE_LEN],
    /// `META_R_*` bits.
    pub reasons: u32,
    /// The Maglev table size the datapath indexes with (with `SVC_F_MAGLEV`): it is a load-time
    /// global of the program, which no pinned map holds.
    pub maglev_table_size: u32,
    /// `META_ADDR_*`.
    pub addr_kind: u8,
    pub _pad: [u8; 3],
}

impl Default for ServiceMeta {
    fn default() -> Self {
        Self::zeroed()
    }
}

const _: () = assert!(size_of::<ServiceMeta>() == 220);

crate::impl_user_pod!(ServiceMeta);

/// The text of a NUL-padded field: its bytes up to the first NUL.
pub fn text(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    &field[..end]
}
