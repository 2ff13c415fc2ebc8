//! [`Ipvs`]: the IPVS table of the running kernel, read and written over generic netlink.

use std::collections::BTreeMap;
use std::time::Duration;

use neli::consts::nl::NlmF;
use neli::consts::socket::NlFamily;
use neli::genl::{Genlmsghdr, GenlmsghdrBuilder};
use neli::nl::NlPayload;

use super::codec::{self, Attrs};
use super::socket::{Conn, Expect, Failure, SocketError};
use super::{Error, Request, Result};
use crate::consts::*;
use crate::diff::{Op, OpKind, Owner, OwnsAll, Removal, diff};
use crate::model::{Family, ServiceEntry, ServiceKey, Table};

/// A generic netlink message with IPVS commands and attributes.
type GenlMsg = Genlmsghdr<u8, u16>;

/// How long a reply may take before the request counts as failed.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests per `sendmsg`: their acknowledgements must fit the socket's receive buffer.
const DEFAULT_BATCH: usize = 128;

/// What `IPVS_CMD_GET_INFO` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    /// The IPVS version, `major << 16 | minor << 8 | patch`.
    pub version: u32,
    /// The size of the connection hash table.
    pub connection_table_size: u32,
}

impl Info {
    /// The version as `ipvsadm` prints it, e.g. `1.2.1`.
    pub fn version_string(&self) -> String {
        format!(
            "{}.{}.{}",
            self.version >> 16,
            (self.version >> 8) & 0xff,
            self.version & 0xff
        )
    }
}

/// What one [`Ipvs::sync`] or [`Ipvs::converge`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Operations applied, by kind.
    pub ops: BTreeMap<OpKind, usize>,
    /// Netlink write requests sent (one per operation).
    pub writes: u64,
}

impl SyncReport {
    /// All operations applied.
    pub fn total(&self) -> usize {
        self.ops.values().sum()
    }

    /// Operations of `kind` applied.
    pub fn count(&self, kind: OpKind) -> usize {
        self.ops.get(&kind).copied().unwrap_or(0)
    }
}

/// A handle on the kernel's IPVS table.
///
/// Reads dump the table (or one service) into the model; writes are [`Op`]s from [`diff`], sent
/// many per `sendmsg`, each acknowledged, and every refusal comes back as an [`Error::Kernel`]
/// naming the operation, the service or destination and the errno. The handle never sends
/// `IPVS_CMD_FLUSH`: [`Ipvs::sync`] with an empty desired table removes only owned services.
#[derive(Debug)]
pub struct Ipvs {
    conn: Conn,
    family: u16,
    writes: u64,
    batch: usize,
}

impl Ipvs {
    /// Opens a generic netlink socket and looks up the `IPVS` family.
    pub fn open() -> Result<Self> {
        Self::open_with_timeout(DEFAULT_TIMEOUT)
    }

    /// Like [`Ipvs::open`], with `timeout` for every reply.
    pub fn open_with_timeout(timeout: Duration) -> Result<Self> {
        let mut conn = Conn::open(NlFamily::Generic, timeout).map_err(|source| Error::Socket {
            op: Request::Open,
            key: String::new(),
            source,
        })?;
        let family = resolve_family(&mut conn)?;
        Ok(Self {
            conn,
            family,
            writes: 0,
            batch: DEFAULT_BATCH,
        })
    }

    /// Sets how many write requests go in one `sendmsg` (at least 1).
    pub fn set_batch_size(&mut self, requests: usize) {
        self.batch = requests.max(1);
    }

    /// Write requests sent through this handle so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// The kernel's IPVS version and connection table size.
    pub fn info(&mut self) -> Result<Info> {
        let reply = self.get(
            Request::GetInfo,
            String::new(),
            IPVS_CMD_GET_INFO,
            Attrs::new(),
        )?;
        let mut info = Info {
            version: 0,
            connection_table_size: 0,
        };
        for attr in reply.attrs().iter() {
            let value = || {
                let bytes = neli::attr::Attribute::payload(attr).as_ref();
                bytes
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_ne_bytes)
                    .unwrap_or(0)
            };
            match codec::kind(attr) {
                IPVS_INFO_ATTR_VERSION => info.version = value(),
                IPVS_INFO_ATTR_CONN_TAB_SIZE => info.connection_table_size = value(),
                _ => {}
            }
        }
        Ok(info)
    }

    /// The whole table: every virtual service the model can hold, with destinations and counters.
    pub fn dump(&mut self) -> Result<Table> {
        self.dump_with_destinations_of(&OwnsAll)
    }

    /// Every virtual service, with destinations only for those `owner` owns: what a diff for
    /// `owner` needs, without reading the destinations of anyone else's services.
    pub fn dump_with_destinations_of(&mut self, owner: &impl Owner) -> Result<Table> {
        let replies = self.dump_request(
            Request::DumpServices,
            String::new(),
            IPVS_CMD_GET_SERVICE,
            Attrs::new(),
        )?;
        let mut table = Table::new();
        for reply in replies {
            if let Some(mut entry) = service_of_reply(&reply, Request::DumpServices)? {
                if owner.owns(&entry.service.key) {
                    self.fill_destinations(&mut entry)?;
                }
                table.services.insert(entry.service.key, entry);
            }
        }
        Ok(table)
    }

    /// One virtual service with its destinations and counters, or `None` if the kernel has no
    /// service `key`. Costs one request for the service and one dump of its destinations.
    pub fn service(&mut self, key: &ServiceKey) -> Result<Option<ServiceEntry>> {
        let mut attrs = Attrs::new();
        attrs.push(codec::service_key(key).map_err(|e| decode(Request::GetService, key, e))?);
        let reply = match self.get(
            Request::GetService,
            key.to_string(),
            IPVS_CMD_GET_SERVICE,
            attrs,
        ) {
            Ok(reply) => reply,
            Err(e) if e.errno() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(e),
        };
        match service_of_reply(&reply, Request::GetService)? {
            Some(mut entry) => {
                self.fill_destinations(&mut entry)?;
                Ok(Some(entry))
            }
            None => Ok(None),
        }
    }

    /// Applies `ops` in order, [`DEFAULT_BATCH`] requests per `sendmsg`. Every operation is tried;
    /// if any failed, [`Error::Apply`] lists each failure (an [`Error::Kernel`]).
    pub fn apply(&mut self, ops: &[Op]) -> Result<()> {
        let failures = self.apply_each(ops)?;
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::Apply {
                total: ops.len(),
                failures: failures.into_iter().map(|(_, e)| e).collect(),
            })
        }
    }

    /// Applies `ops` in order as [`Ipvs::apply`] does, and returns each refused operation's
    /// index in `ops` with its error (an [`Error::Kernel`]): a caller can tell which virtual
    /// services were not programmed. `Err` only when the socket itself failed.
    pub fn apply_each(&mut self, ops: &[Op]) -> Result<Vec<(usize, Error)>> {
        let mut failures = Vec::new();
        for (n, chunk) in ops.chunks(self.batch).enumerate() {
            let offset = n * self.batch;
            failures.extend(
                self.write_batch(chunk)?
                    .into_iter()
                    .map(|(i, e)| (offset + i, e)),
            );
        }
        Ok(failures)
    }

    /// Makes the kernel's owned services equal to `desired`: dumps the table, diffs it against
    /// `desired` for the services `owner` owns, applies the difference. Services `owner` does not
    /// own are never touched. A second call with the same input sends no write.
    pub fn sync(
        &mut self,
        owner: &impl Owner,
        desired: &Table,
        removal: Removal,
    ) -> Result<SyncReport> {
        let actual = self.dump_with_destinations_of(owner)?;
        let ops = diff(&actual, desired, owner, removal);
        self.apply_reported(&ops)
    }

    /// Removes every service `owner` owns, and nothing else (never `IPVS_CMD_FLUSH`).
    pub fn flush_owned(&mut self, owner: &impl Owner) -> Result<SyncReport> {
        self.sync(owner, &Table::new(), Removal::Delete)
    }

    /// Makes the one service `key` equal to `desired` (`None`: remove it), reading only that
    /// service and its destinations from the kernel. The caller owns `key`.
    pub fn converge(
        &mut self,
        key: &ServiceKey,
        desired: Option<&ServiceEntry>,
        removal: Removal,
    ) -> Result<SyncReport> {
        let mut actual = Table::new();
        if let Some(entry) = self.service(key)? {
            actual.services.insert(*key, entry);
        }
        let mut wanted = Table::new();
        if let Some(entry) = desired {
            wanted.services.insert(*key, entry.clone());
        }
        let only = |k: &ServiceKey| k == key;
        let ops = diff(&actual, &wanted, &only, removal);
        self.apply_reported(&ops)
    }

    fn apply_reported(&mut self, ops: &[Op]) -> Result<SyncReport> {
        let before = self.writes;
        self.apply(ops)?;
        let mut report = SyncReport {
            writes: self.writes - before,
            ..SyncReport::default()
        };
        for op in ops {
            *report.ops.entry(op.kind()).or_default() += 1;
        }
        Ok(report)
    }

    /// Adds the destinations (and their counters) of `entry`'s service to it.
    fn fill_destinations(&mut self, entry: &mut ServiceEntry) -> Result<()> {
        let key = entry.service.key;
        let mut attrs = Attrs::new();
        attrs.push(
            codec::service_key(&key).map_err(|e| decode(Request::DumpDestinations, &key, e))?,
        );
        let replies = self.dump_request(
            Request::DumpDestinations,
            key.to_string(),
            IPVS_CMD_GET_DEST,
            attrs,
        )?;
        let family = match key {
            ServiceKey::Addr { address, .. } => Family::of(&address),
            ServiceKey::FwMark { family, .. } => family,
        };
        for reply in replies {
            for attr in reply.attrs().iter() {
                if codec::kind(attr) != IPVS_CMD_ATTR_DEST {
                    continue;
                }
                let (dest, stats) = codec::children(attr)
                    .and_then(|attrs| codec::decode_destination(&attrs, family))
                    .map_err(|e| decode(Request::DumpDestinations, &key, e))?;
                entry.destination_stats.insert(dest.key(), stats);
                entry.destinations.insert(dest.key(), dest);
            }
        }
        Ok(())
    }

    /// Sends one request and returns its one reply.
    fn get(&mut self, op: Request, key: String, cmd: u8, attrs: Attrs) -> Result<GenlMsg> {
        let genl = genl(cmd, IPVS_GENL_VERSION, attrs).map_err(|source| Error::Socket {
            op,
            key: key.clone(),
            source,
        })?;
        self.conn
            .get(self.family, NlmF::empty(), genl)
            .map_err(|failure| Error::of_request(op, key, failure))
    }

    /// Sends one dump request and returns every reply until `NLMSG_DONE`.
    fn dump_request(
        &mut self,
        op: Request,
        key: String,
        cmd: u8,
        attrs: Attrs,
    ) -> Result<Vec<GenlMsg>> {
        let genl = genl(cmd, IPVS_GENL_VERSION, attrs).map_err(|source| Error::Socket {
            op,
            key: key.clone(),
            source,
        })?;
        self.conn
            .request(self.family, NlmF::empty(), genl, Expect::All)
            .map_err(|failure| Error::of_request(op, key, failure))
    }

    /// Sends `ops` in one `sendmsg`, each acknowledged, and returns the failures.
    /// The refused operations of one batch, by their index in `ops`.
    fn write_batch(&mut self, ops: &[Op]) -> Result<Vec<(usize, Error)>> {
        let batch_error = |source| Error::Socket {
            op: Request::Write(ops.first().map(Op::kind).unwrap_or(OpKind::AddService)),
            key: format!("(a batch of {} writes)", ops.len()),
            source,
        };
        let mut messages = Vec::with_capacity(ops.len());
        let mut seqs = Vec::with_capacity(ops.len());
        for op in ops {
            let (cmd, attrs) = request_of(op)
                .map_err(|e| decode(Request::Write(op.kind()), op.service_key(), e))?;
            let seq = self.conn.next_seq();
            let genl = genl(cmd, IPVS_GENL_VERSION, attrs).map_err(batch_error)?;
            messages.push(Conn::message(self.family, NlmF::ACK, seq, genl).map_err(batch_error)?);
            seqs.push(seq);
        }
        self.conn.send(&messages).map_err(batch_error)?;
        self.writes += ops.len() as u64;

        let index_of: BTreeMap<u32, usize> =
            seqs.iter().enumerate().map(|(i, s)| (*s, i)).collect();
        let mut answered = vec![false; ops.len()];
        let mut left = ops.len();
        let mut failures = Vec::new();
        while left > 0 {
            let replies = self.conn.recv::<GenlMsg>().map_err(batch_error)?;
            for reply in replies.iter() {
                let Some(&i) = index_of.get(reply.nl_seq()) else {
                    continue;
                };
                let errno = match reply.nl_payload() {
                    NlPayload::Ack(_) => 0,
                    NlPayload::Err(e) => -e.error(),
                    _ => continue,
                };
                if answered[i] {
                    continue;
                }
                answered[i] = true;
                left -= 1;
                if errno != 0 {
                    failures.push((i, errno));
                }
            }
        }
        failures.sort_unstable();
        Ok(failures
            .into_iter()
            .map(|(i, errno)| {
                (
                    i,
                    Error::Kernel {
                        op: Request::Write(ops[i].kind()),
                        key: subject(&ops[i]),
                        errno,
                    },
                )
            })
            .collect())
    }
}

/// What an operation is about, for its error message.
fn subject(op: &Op) -> String {
    match op {
        Op::AddService(s) | Op::EditService(s) => {
            format!("{} (scheduler {})", s.key, s.scheduler)
        }
        Op::DelService(k) => k.to_string(),
        Op::AddDest(k, d) | Op::EditDest(k, d) | Op::DelDest(k, d) => {
            format!("{} of {k}", d.key())
        }
    }
}

/// The command and attributes that perform `op`.
fn request_of(op: &Op) -> std::result::Result<(u8, Attrs), codec::DecodeError> {
    let mut attrs = Attrs::new();
    let cmd = match op {
        Op::AddService(s) => {
            attrs.push(codec::service(s)?);
            IPVS_CMD_NEW_SERVICE
        }
        Op::EditService(s) => {
            attrs.push(codec::service(s)?);
            IPVS_CMD_SET_SERVICE
        }
        Op::DelService(k) => {
            attrs.push(codec::service_key(k)?);
            IPVS_CMD_DEL_SERVICE
        }
        Op::AddDest(k, d) | Op::EditDest(k, d) | Op::DelDest(k, d) => {
            attrs.push(codec::service_key(k)?);
            attrs.push(codec::destination(d)?);
            match op {
                Op::AddDest(..) => IPVS_CMD_NEW_DEST,
                Op::EditDest(..) => IPVS_CMD_SET_DEST,
                _ => IPVS_CMD_DEL_DEST,
            }
        }
    };
    Ok((cmd, attrs))
}

/// The service in a `GET_SERVICE` reply, without destinations.
fn service_of_reply(reply: &GenlMsg, op: Request) -> Result<Option<ServiceEntry>> {
    for attr in reply.attrs().iter() {
        if codec::kind(attr) != IPVS_CMD_ATTR_SERVICE {
            continue;
        }
        let decoded = codec::children(attr)
            .and_then(|attrs| codec::decode_service(&attrs))
            .map_err(|e| Error::Decode {
                op,
                key: String::new(),
                reason: e.0,
            })?;
        return Ok(decoded.map(|d| {
            let mut entry = ServiceEntry::new(d.service);
            entry.stats = Some(d.stats);
            entry
        }));
    }
    Err(Error::Decode {
        op,
        key: String::new(),
        reason: "no IPVS_CMD_ATTR_SERVICE in the reply".to_owned(),
    })
}

fn decode(op: Request, key: &ServiceKey, e: codec::DecodeError) -> Error {
    Error::Decode {
        op,
        key: key.to_string(),
        reason: e.0,
    }
}

/// A generic netlink message of command `cmd`.
fn genl(cmd: u8, version: u8, attrs: Attrs) -> std::result::Result<GenlMsg, SocketError> {
    GenlmsghdrBuilder::default()
        .cmd(cmd)
        .version(version)
        .attrs(attrs)
        .build()
        .map_err(|e| SocketError::Codec(e.to_string()))
}

/// The id of the generic netlink family `IPVS`, from the controller.
fn resolve_family(conn: &mut Conn) -> Result<u16> {
    let op = Request::ResolveFamily;
    let key = || IPVS_GENL_NAME.to_owned();
    let decode = |reason: String| Error::Decode {
        op,
        key: key(),
        reason,
    };
    let mut name = IPVS_GENL_NAME.as_bytes().to_vec();
    name.push(0);
    let mut attrs = Attrs::new();
    attrs.push(codec::attr(CTRL_ATTR_FAMILY_NAME, &name).map_err(|e| decode(e.0))?);
    let request = genl(CTRL_CMD_GETFAMILY, 1, attrs).map_err(|source| Error::Socket {
        op,
        key: key(),
        source,
    })?;
    let reply = match conn.get(GENL_ID_CTRL, NlmF::empty(), request) {
        Ok(reply) => reply,
        Err(Failure::Refused(libc::ENOENT)) => return Err(Error::Unavailable),
        Err(failure) => return Err(Error::of_request(op, key(), failure)),
    };
    let id = reply
        .attrs()
        .iter()
        .find(|a| codec::kind(a) == CTRL_ATTR_FAMILY_ID)
        .ok_or_else(|| decode("no CTRL_ATTR_FAMILY_ID".to_owned()))?;
    codec::u16_of(
        neli::attr::Attribute::payload(id).as_ref(),
        "CTRL_ATTR_FAMILY_ID",
    )
    .map_err(|e| decode(e.0))
}
