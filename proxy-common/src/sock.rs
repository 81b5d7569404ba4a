//! Socket-level load balancing: cgroup hooks translate a ClusterIP to a backend when a socket
//! connects (or, for unconnected UDP, on each send), so the node's own processes and pods reach
//! Services without per-packet NAT. This module holds what the hooks and the controller share.

use bytemuck::{Pod, Zeroable};

/// `LruHashMap<SockRevKey4, SockRevEntry4>`: for each socket (by cookie) and each backend it was
/// sent to, the frontend it asked for. `getpeername()` and `recvmsg()` answer with the frontend,
/// so the application only ever sees the address it connected to. LRU: a full table forgets the
/// least recent socket, whose peer then reads as the backend (it still works).
pub const SOCK_REVNAT4: &str = "SOCK_REVNAT4";
pub const DEFAULT_SOCK_REVNAT: u32 = 65_536;

/// Global variable in the object: which sockets the hooks translate (`SOCK_LB_*`), set at load.
pub const SOCK_LB_MODE_GLOBAL: &str = "SOCK_LB_MODE";
/// Global variable in the object: the cookie of the node's network namespace (`SO_NETNS_COOKIE`),
/// set at load. Session affinity is per client address, which only the node's own sockets
/// share; pods' sockets to such Services are left to the per-packet path, which sees the pod IP.
pub const NODE_NETNS_COOKIE_GLOBAL: &str = "NODE_NETNS_COOKIE";

/// No socket is translated (the hooks are not even attached).
pub const SOCK_LB_OFF: u32 = 0;
/// TCP sockets are translated at `connect()`.
pub const SOCK_LB_TCP: u32 = 1;
/// TCP and UDP: connected UDP sockets at `connect()`, unconnected ones on every send.
pub const SOCK_LB_ALL: u32 = 2;

/// Key of [`SOCK_REVNAT4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevKey4 {
    /// `bpf_get_socket_cookie`: unique per socket for the life of the kernel.
    pub cookie: u64,
    /// The backend the socket was sent to.
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub _pad: u16,
}

/// Value of [`SOCK_REVNAT4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockRevEntry4 {
    /// The frontend the socket asked for.
    pub frontend_addr_be: u32,
    pub frontend_port_be: u16,
    pub _pad: u16,
    /// The Service it belongs to.
    pub svc_id: u32,
}

const _: () = assert!(size_of::<SockRevKey4>() == 16);
const _: () = assert!(size_of::<SockRevEntry4>() == 12);

crate::impl_user_pod!(SockRevKey4, SockRevEntry4);
