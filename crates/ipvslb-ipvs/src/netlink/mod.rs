//! The kernel half: IPVS over generic netlink ([`Ipvs`]), the VIP addresses on a dummy
//! interface over rtnetlink ([`Vips`]), and the gratuitous ARP and Neighbor Advertisement frames
//! that announce a VIP on a segment ([`Announcer`]). Linux only.
//!
//! Every request and reply goes through one socket wrapper (`socket.rs`); encoding and decoding of
//! IPVS attributes live apart from the handles (`codec.rs`), with all numbers from
//! [`crate::consts`].

mod codec;
mod ipvs;
mod neighbour;
mod socket;
mod vip;

use std::fmt;
use std::io;

use crate::diff::OpKind;

pub use ipvs::{EncodedBatch, Info, Ipvs, SyncReport};
pub use neighbour::{Announcer, arp_announcement, hardware_address, neighbour_advertisement};
pub use vip::{DEFAULT_INTERFACE, INTERFACE_ALIAS, Vips};

/// `type Result<T, E = Error>` for the kernel handles.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a handle was doing when the kernel or the socket said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// Opening a netlink socket.
    Open,
    /// Looking up the generic netlink family `IPVS`.
    ResolveFamily,
    /// `IPVS_CMD_GET_INFO`.
    GetInfo,
    /// `IPVS_CMD_GET_SERVICE` with `NLM_F_DUMP`.
    DumpServices,
    /// `IPVS_CMD_GET_SERVICE` for one key.
    GetService,
    /// `IPVS_CMD_GET_DEST` with `NLM_F_DUMP`.
    DumpDestinations,
    /// A write to the IPVS table.
    Write(OpKind),
    /// Looking up or creating the dummy interface.
    Link,
    /// Listing addresses (`RTM_GETADDR`).
    ListAddresses,
    /// Adding an address (`RTM_NEWADDR`).
    AddAddress,
    /// Deleting an address (`RTM_DELADDR`).
    DelAddress,
    /// `IPVS_CMD_GET_DAEMON`.
    ListSyncDaemons,
    /// `IPVS_CMD_NEW_DAEMON`.
    StartSyncDaemon,
    /// `IPVS_CMD_DEL_DAEMON`.
    StopSyncDaemon,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Open => f.write_str("opening a netlink socket"),
            Request::ResolveFamily => f.write_str("looking up the IPVS netlink family"),
            Request::GetInfo => f.write_str("reading the IPVS version"),
            Request::DumpServices => f.write_str("listing virtual services"),
            Request::GetService => f.write_str("reading virtual service"),
            Request::DumpDestinations => f.write_str("listing the destinations of"),
            Request::Write(kind) => kind.fmt(f),
            Request::Link => f.write_str("setting up interface"),
            Request::ListAddresses => f.write_str("listing the addresses of"),
            Request::AddAddress => f.write_str("adding address"),
            Request::DelAddress => f.write_str("deleting address"),
            Request::ListSyncDaemons => f.write_str("listing the connection sync daemons"),
            Request::StartSyncDaemon => f.write_str("starting the"),
            Request::StopSyncDaemon => f.write_str("stopping the"),
        }
    }
}

/// An error of the kernel handles.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel has no generic netlink family `IPVS`.
    #[error("IPVS is not available: load the ip_vs module")]
    Unavailable,
    /// A sync daemon of the role asked for already runs, with other settings: someone else's,
    /// or this director's from before its settings changed. It is left alone.
    #[error("{running} already runs, not the {wanted} asked for: stop it first (ipvsadm --stop-daemon {role})", role = .running.role)]
    SyncDaemonRunning {
        /// The one that runs.
        running: crate::SyncDaemon,
        /// The one asked for.
        wanted: crate::SyncDaemon,
    },
    /// The kernel refused a request: `errno` is its (positive) error number.
    #[error("{op} {key}: {}{}", io::Error::from_raw_os_error(*errno), hint(*op, *errno))]
    Kernel {
        /// What was asked.
        op: Request,
        /// The service, destination, interface or address it was about.
        key: String,
        /// The error number (`EEXIST`, `ENOENT`, `ESRCH`, `EINVAL`, `EPERM`, ...).
        errno: i32,
    },
    /// The socket failed, or no reply came in time.
    #[error("{op} {key}: {source}")]
    Socket {
        /// What was asked.
        op: Request,
        /// What it was about (may be empty).
        key: String,
        /// The failure.
        #[source]
        source: socket::SocketError,
    },
    /// A reply that does not decode.
    #[error("{op} {key}: the kernel's reply does not decode: {reason}")]
    Decode {
        /// What was asked.
        op: Request,
        /// What it was about (may be empty).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The interface named for the VIP addresses exists and is not a dummy interface: it is
    /// someone else's, and is left alone.
    #[error(
        "interface {interface} is {kind}, not a dummy interface: VIP addresses go only on an interface of ipvslb's own"
    )]
    NotDummy {
        /// The interface's name.
        interface: String,
        /// Its kind (`IFLA_INFO_KIND`).
        kind: String,
    },
    /// The interface named for the VIP addresses is a dummy interface ipvslb did not create
    /// (it lacks [`vip::INTERFACE_ALIAS`]): it is someone else's, and is left alone.
    #[error(
        "interface {interface} exists and was not created by ipvslb (alias {}, not {:?}): VIP addresses go only on an interface of ipvslb's own; name another one, or, if ipvslb made this one (before the mark, or stopped while making it), mark it with `ip link set {interface} alias ipvslb` or delete it",
        .alias.as_deref().map_or("none".to_owned(), |a| format!("{a:?}")),
        vip::INTERFACE_ALIAS
    )]
    NotOurs {
        /// The interface's name.
        interface: String,
        /// Its alias, if it has one.
        alias: Option<String>,
    },
    /// Some writes of a batch failed; the others were made.
    #[error("{} of {total} IPVS writes failed; the first: {}", .failures.len(), first(.failures))]
    Apply {
        /// How many writes were sent.
        total: usize,
        /// One error per failed write, in the order of the operations.
        failures: Vec<Error>,
    },
}

impl Error {
    /// The error of request `op` about `key` that failed with `failure`.
    fn of_request(op: Request, key: String, failure: socket::Failure) -> Self {
        match failure {
            socket::Failure::Socket(source) => Error::Socket { op, key, source },
            socket::Failure::Refused(errno) => Error::Kernel { op, key, errno },
            socket::Failure::Decode(e) => Error::Decode {
                op,
                key,
                reason: e.0,
            },
        }
    }

    /// The kernel's error number, for [`Error::Kernel`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether the kernel said the thing to add exists already (`EEXIST`).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// Whether the kernel said the thing to change is not there (`ESRCH` for a service, `ENOENT`
    /// for a destination or address, `ENODEV` for an interface).
    pub fn is_missing(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ESRCH) | Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::EADDRNOTAVAIL)
        )
    }
}

/// A hint appended to an errno where the bare message misleads.
fn hint(op: Request, errno: i32) -> &'static str {
    match (op, errno) {
        (_, libc::EPERM) => " (needs CAP_NET_ADMIN)",
        (Request::Write(OpKind::AddService | OpKind::EditService), libc::ENOENT) => {
            " (no such scheduler: is its ip_vs_<name> module available?)"
        }
        (Request::Write(_), libc::ESRCH) => " (no such virtual service)",
        (Request::StartSyncDaemon, libc::ENODEV) => " (no such interface)",
        (Request::StartSyncDaemon, libc::EEXIST) => " (one with this role already runs)",
        _ => "",
    }
}

fn first(failures: &[Error]) -> String {
    failures
        .first()
        .map(ToString::to_string)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_operation_the_object_and_the_errno() {
        let e = Error::Kernel {
            op: Request::Write(OpKind::AddService),
            key: "TCP 10.0.0.1:80 (scheduler rr)".to_owned(),
            errno: libc::EEXIST,
        };
        assert_eq!(
            e.to_string(),
            format!(
                "adding virtual service TCP 10.0.0.1:80 (scheduler rr): {}",
                io::Error::from_raw_os_error(libc::EEXIST)
            )
        );
        assert!(e.is_exists());
        assert!(!e.is_missing());
    }

    #[test]
    fn eperm_says_what_capability_is_missing() {
        let e = Error::Kernel {
            op: Request::DumpServices,
            key: String::new(),
            errno: libc::EPERM,
        };
        assert!(e.to_string().ends_with("(needs CAP_NET_ADMIN)"), "{e}");
    }

    #[test]
    fn a_missing_scheduler_module_is_named_as_such() {
        let e = Error::Kernel {
            op: Request::Write(OpKind::AddService),
            key: "TCP 10.0.0.1:80 (scheduler nosuch)".to_owned(),
            errno: libc::ENOENT,
        };
        assert!(e.to_string().contains("no such scheduler"), "{e}");
    }

    #[test]
    fn a_batch_failure_counts_and_shows_the_first() {
        let first = Error::Kernel {
            op: Request::Write(OpKind::DelDest),
            key: "10.0.0.2:80 of TCP 10.0.0.1:80".to_owned(),
            errno: libc::ENOENT,
        };
        let e = Error::Apply {
            total: 10,
            failures: vec![first],
        };
        assert!(
            e.to_string()
                .starts_with("1 of 10 IPVS writes failed; the first: deleting destination"),
            "{e}"
        );
    }

    #[test]
    fn a_kernel_without_ipvs_is_told_to_load_the_module() {
        assert_eq!(
            Error::Unavailable.to_string(),
            "IPVS is not available: load the ip_vs module"
        );
    }
}
