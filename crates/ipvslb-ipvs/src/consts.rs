//! Kernel constants, mirrored from `include/uapi/linux/ip_vs.h` and `netinet/in.h`, in one place.

/// `IPPROTO_TCP`
pub const IPPROTO_TCP: u16 = 6;
/// `IPPROTO_UDP`
pub const IPPROTO_UDP: u16 = 17;
/// `IPPROTO_SCTP`
pub const IPPROTO_SCTP: u16 = 132;

/// `IP_VS_SVC_F_PERSISTENT`
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`
pub const IP_VS_SVC_F_HASHED: u32 = 0x0002;
/// `IP_VS_SVC_F_ONEPACKET`
pub const IP_VS_SVC_F_ONEPACKET: u32 = 0x0004;
/// `IP_VS_SVC_F_SCHED1`
pub const IP_VS_SVC_F_SCHED1: u32 = 0x0008;
/// `IP_VS_SVC_F_SCHED2`
pub const IP_VS_SVC_F_SCHED2: u32 = 0x0010;
/// `IP_VS_SVC_F_SCHED3`
pub const IP_VS_SVC_F_SCHED3: u32 = 0x0020;

/// `IP_VS_CONN_F_FWD_MASK`
pub const IP_VS_CONN_F_FWD_MASK: u32 = 0x0007;
/// `IP_VS_CONN_F_MASQ`
pub const IP_VS_CONN_F_MASQ: u32 = 0x0000;
/// `IP_VS_CONN_F_LOCALNODE`
pub const IP_VS_CONN_F_LOCALNODE: u32 = 0x0001;
/// `IP_VS_CONN_F_TUNNEL`
pub const IP_VS_CONN_F_TUNNEL: u32 = 0x0002;
/// `IP_VS_CONN_F_DROUTE`
pub const IP_VS_CONN_F_DROUTE: u32 = 0x0003;
/// `IP_VS_CONN_F_BYPASS`
pub const IP_VS_CONN_F_BYPASS: u32 = 0x0004;
