//! [`Ipvs`]: the IPVS table of the running kernel, read and written over generic netlink.

use std::collections::BTreeMap;
use std::time::Duration;

use neli::consts::socket::NlFamily;

use super::codec::{self, AttrWriter, DecodeError, Requests};
use super::socket::{Conn, Failure, Received, SocketError};
use super::{Error, Request, Result};
use crate::consts::*;
use crate::diff::{Op, OpKind, Owner, OwnsAll, Removal, diff};
use crate::model::{Family, ListOrder, ServiceEntry, ServiceKey, SyncDaemon, Table};

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
        let op = Request::GetInfo;
        get_one(
            &mut self.conn,
            (self.family, IPVS_GENL_VERSION),
            IPVS_CMD_GET_INFO,
            |_| {},
            |reply| {
                let mut info = Info {
                    version: 0,
                    connection_table_size: 0,
                };
                for attr in reply.genl_attrs() {
                    let attr = attr?;
                    match attr.kind {
                        IPVS_INFO_ATTR_VERSION => {
                            info.version = codec::u32_of(attr.payload, "version")?;
                        }
                        IPVS_INFO_ATTR_CONN_TAB_SIZE => {
                            info.connection_table_size =
                                codec::u32_of(attr.payload, "connection table size")?;
                        }
                        _ => {}
                    }
                }
                Ok(info)
            },
        )
        .map_err(|failure| Error::of_request(op, String::new(), failure))
    }

    /// The connection sync daemons that run in this network namespace (at most one of each
    /// role).
    pub fn sync_daemons(&mut self) -> Result<Vec<SyncDaemon>> {
        let mut daemons = Vec::new();
        dump(
            &mut self.conn,
            self.family,
            IPVS_CMD_GET_DAEMON,
            |_| {},
            |reply| {
                for attr in reply.genl_attrs() {
                    let attr = attr?;
                    if attr.kind == IPVS_CMD_ATTR_DAEMON {
                        daemons.push(codec::decode_sync_daemon(attr.children())?);
                    }
                }
                Ok(())
            },
        )
        .map_err(|failure| Error::of_request(Request::ListSyncDaemons, String::new(), failure))?;
        Ok(daemons)
    }

    /// Starts the sync daemons of `wanted` that do not run yet; one that runs as asked is left
    /// alone. One of a wanted role that runs with other settings (another interface or sync
    /// id) is refused with [`Error::SyncDaemonRunning`] and left running: it may be keepalived's
    /// or an operator's. A role `wanted` does not name is not touched. Returns the daemons
    /// started.
    pub fn ensure_sync_daemons(&mut self, wanted: &[SyncDaemon]) -> Result<Vec<SyncDaemon>> {
        let running = self.sync_daemons()?;
        let mut started = Vec::new();
        for daemon in wanted {
            match running.iter().find(|r| r.role == daemon.role) {
                Some(r) if r == daemon => continue,
                Some(other) => {
                    return Err(Error::SyncDaemonRunning {
                        running: other.clone(),
                        wanted: daemon.clone(),
                    });
                }
                None => {}
            }
            self.write_one(
                Request::StartSyncDaemon,
                daemon.to_string(),
                IPVS_CMD_NEW_DAEMON,
                |w| codec::put_sync_daemon(w, daemon),
            )?;
            started.push(daemon.clone());
        }
        Ok(started)
    }

    /// Stops the sync daemon of `daemon`'s role.
    pub fn stop_sync_daemon(&mut self, daemon: &SyncDaemon) -> Result<()> {
        let role = daemon.role;
        self.write_one(
            Request::StopSyncDaemon,
            daemon.to_string(),
            IPVS_CMD_DEL_DAEMON,
            |w| codec::put_sync_role(w, role),
        )
    }

    /// Sends one write request of `cmd` and waits for its acknowledgement.
    fn write_one(
        &mut self,
        op: Request,
        key: String,
        cmd: u8,
        body: impl FnOnce(&mut AttrWriter<'_>),
    ) -> Result<()> {
        let seq = self.conn.reserve_seqs(1);
        let mut request = Requests::default();
        request.push(self.family, NLM_F_ACK, seq, cmd, IPVS_GENL_VERSION, body);
        let refused = self
            .conn
            .send_acked(request.bytes(), seq, 1)
            .map_err(|failure| Error::of_request(op, key.clone(), failure))?;
        self.writes += 1;
        match refused.first() {
            Some((_, errno)) => Err(Error::Kernel {
                op,
                key,
                errno: *errno,
            }),
            None => Ok(()),
        }
    }

    /// The whole table: every virtual service the model can hold, with destinations and counters.
    pub fn dump(&mut self) -> Result<Table> {
        self.dump_with_destinations_of(&OwnsAll)
    }

    /// Every virtual service, with destinations only for those `owner` owns: what a diff for
    /// `owner` needs, without reading the destinations of anyone else's services.
    pub fn dump_with_destinations_of(&mut self, owner: &impl Owner) -> Result<Table> {
        let op = Request::DumpServices;
        let mut services = Vec::new();
        dump(
            &mut self.conn,
            self.family,
            IPVS_CMD_GET_SERVICE,
            |_| {},
            |reply| {
                if let Some(entry) = service_of_reply(reply)? {
                    services.push(entry);
                }
                Ok(())
            },
        )
        .map_err(|failure| Error::of_request(op, String::new(), failure))?;
        let (mut owned, others): (Vec<_>, Vec<_>) = services
            .into_iter()
            .partition(|entry| owner.owns(&entry.service.key));
        self.fill_destinations(&mut owned)?;
        let mut table = Table::new();
        for entry in owned.into_iter().chain(others) {
            table.services.insert(entry.service.key, entry);
        }
        Ok(table)
    }

    /// One virtual service with its destinations and counters, or `None` if the kernel has no
    /// service `key`. Costs one request for the service and one dump of its destinations.
    pub fn service(&mut self, key: &ServiceKey) -> Result<Option<ServiceEntry>> {
        let op = Request::GetService;
        let reply = get_one(
            &mut self.conn,
            (self.family, IPVS_GENL_VERSION),
            IPVS_CMD_GET_SERVICE,
            |w| codec::put_service_key(w, key),
            service_of_reply,
        );
        let entry = match reply {
            Ok(entry) => entry,
            Err(Failure::Refused(libc::ESRCH)) => return Ok(None),
            Err(failure) => return Err(Error::of_request(op, key.to_string(), failure)),
        };
        let Some(entry) = entry else {
            return Ok(None);
        };
        let mut entries = [entry];
        self.fill_destinations(&mut entries)?;
        let [entry] = entries;
        Ok(Some(entry))
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
    ///
    /// Each batch is encoded ([`Ipvs::encode`]), then sent ([`Ipvs::send`]); one buffer
    /// serves every batch.
    pub fn apply_each(&mut self, ops: &[Op]) -> Result<Vec<(usize, Error)>> {
        let mut failures = Vec::new();
        let mut batch = EncodedBatch::default();
        for (n, chunk) in ops.chunks(self.batch).enumerate() {
            let offset = n * self.batch;
            self.encode_into(chunk, &mut batch);
            failures.extend(self.send(&batch)?.into_iter().map(|(i, errno)| {
                let op = &chunk[i];
                let error = Error::Kernel {
                    op: Request::Write(op.kind()),
                    key: subject(op),
                    errno,
                };
                (offset + i, error)
            }));
        }
        Ok(failures)
    }

    /// Encodes `ops` as write requests, in batches of the handle's batch size (as
    /// [`Ipvs::apply`] sends them), numbered from the handle's sequence. Nothing is sent:
    /// [`Ipvs::send`] sends each batch, so a caller can time the sending alone.
    pub fn encode(&mut self, ops: &[Op]) -> Vec<EncodedBatch> {
        ops.chunks(self.batch)
            .map(|chunk| {
                let mut batch = EncodedBatch::default();
                self.encode_into(chunk, &mut batch);
                batch
            })
            .collect()
    }

    /// Sends one encoded batch in one `sendmsg` and waits for every acknowledgement. Returns
    /// the refused requests: their index in the batch and the kernel's (positive) error number.
    /// `Err` only when the socket itself failed.
    pub fn send(&mut self, batch: &EncodedBatch) -> Result<Vec<(usize, i32)>> {
        let refused = self
            .conn
            .send_acked(batch.requests.bytes(), batch.first_seq, batch.count)
            .map_err(|failure| {
                Error::of_request(
                    Request::Write(batch.first_kind),
                    format!("(a batch of {} writes)", batch.count),
                    failure,
                )
            })?;
        self.writes += batch.count as u64;
        Ok(refused)
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

    /// Writes `ops` into `batch`, replacing what it held.
    fn encode_into(&mut self, ops: &[Op], batch: &mut EncodedBatch) {
        // Sequence numbers are u32 and a batch is at most a few hundred requests.
        let first_seq = self.conn.reserve_seqs(ops.len() as u32);
        batch.requests.clear();
        for (seq, op) in (first_seq..).zip(ops) {
            let cmd = command_of(op);
            batch
                .requests
                .push(self.family, NLM_F_ACK, seq, cmd, IPVS_GENL_VERSION, |w| {
                    put_request(w, op)
                });
        }
        batch.first_seq = first_seq;
        batch.count = ops.len();
        batch.first_kind = ops.first().map_or(OpKind::AddService, Op::kind);
    }

    /// Adds the destinations (and their counters) of each of `entries`' services to it: one
    /// dump per service.
    ///
    /// One at a time. Sending several per `sendmsg` works (the kernel runs one dump per socket
    /// at a time and refuses the others with `EBUSY` until it ends, so those are sent again),
    /// but made the benchmark's dump of 10,000 services slower, not faster: 1.3–1.4 s with six
    /// in flight against 1.1 s one by one. The system calls it saves cost less than it adds;
    /// each reply is a datagram the kernel allocates at 32 KiB.
    fn fill_destinations(&mut self, entries: &mut [ServiceEntry]) -> Result<()> {
        for entry in entries {
            let key = entry.service.key;
            let family = match key {
                ServiceKey::Addr { address, .. } => Family::of(&address),
                ServiceKey::FwMark { family, .. } => family,
            };
            // The dump walks the kernel's list from its head.
            let mut listed = Vec::new();
            dump(
                &mut self.conn,
                self.family,
                IPVS_CMD_GET_DEST,
                |w| codec::put_service_key(w, &key),
                |reply| {
                    for attr in reply.genl_attrs() {
                        let attr = attr?;
                        if attr.kind != IPVS_CMD_ATTR_DEST {
                            continue;
                        }
                        let (dest, stats) = codec::decode_destination(attr.children(), family)?;
                        entry.destination_stats.insert(dest.key(), stats);
                        listed.push(dest.key());
                        entry.destinations.insert(dest.key(), dest);
                    }
                    Ok(())
                },
            )
            .map_err(|failure| {
                Error::of_request(Request::DumpDestinations, key.to_string(), failure)
            })?;
            entry.order = ListOrder::Listed(listed);
        }
        Ok(())
    }
}

/// Write requests encoded for one `sendmsg` by [`Ipvs::encode`], numbered, ready for
/// [`Ipvs::send`].
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    requests: Requests,
    first_seq: u32,
    count: usize,
    /// What the batch starts with, to name a failure of the whole batch.
    first_kind: OpKind,
}

impl Default for EncodedBatch {
    fn default() -> Self {
        Self {
            // A batch of the default size fills about 18 KiB.
            requests: Requests::with_capacity(DEFAULT_BATCH * 160),
            first_seq: 0,
            count: 0,
            first_kind: OpKind::AddService,
        }
    }
}

impl EncodedBatch {
    /// The number of write requests in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch holds no request.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The size of the batch on the wire, in bytes.
    pub fn bytes(&self) -> usize {
        self.requests.bytes().len()
    }
}

/// Sends one request of `cmd` to generic netlink `family` (its commands of `version`) with the
/// attributes `body` writes, and returns its one answer, read by `read`.
fn get_one<T>(
    conn: &mut Conn,
    (family, version): (u16, u8),
    cmd: u8,
    body: impl FnOnce(&mut AttrWriter<'_>),
    mut read: impl FnMut(Received<'_>) -> std::result::Result<T, DecodeError>,
) -> std::result::Result<T, Failure> {
    let seq = send_request(conn, (family, version), 0, cmd, body)?;
    let mut answer = None;
    conn.answers(seq, 1, |_, reply| match reply.status() {
        Some(0) => Ok(false),
        Some(errno) => Err(Failure::Refused(errno)),
        None => {
            answer = Some(read(reply)?);
            Ok(true)
        }
    })?;
    answer.ok_or_else(|| Failure::Socket(SocketError::Codec("no answer".to_owned())))
}

/// Sends one dump request of `cmd` to IPVS with the attributes `body` writes, and passes every
/// reply to `each` until the dump ends.
fn dump(
    conn: &mut Conn,
    family: u16,
    cmd: u8,
    body: impl FnOnce(&mut AttrWriter<'_>),
    each: impl FnMut(Received<'_>) -> std::result::Result<(), DecodeError>,
) -> std::result::Result<(), Failure> {
    let seq = send_request(conn, (family, IPVS_GENL_VERSION), NLM_F_DUMP, cmd, body)?;
    let mut reader = DumpReader::new(each);
    conn.answers(seq, 1, |_, reply| reader.on(reply))?;
    reader.finish()
}

/// Reads the replies of one dump. A reply that cannot be read ends nothing in the kernel: the
/// dump goes on, and one left running makes the socket's next dump fail with `EBUSY`. So the
/// dump is read to its end, and the first unreadable reply is its error.
struct DumpReader<F> {
    each: F,
    unreadable: Option<DecodeError>,
}

impl<F: FnMut(Received<'_>) -> std::result::Result<(), DecodeError>> DumpReader<F> {
    fn new(each: F) -> Self {
        Self {
            each,
            unreadable: None,
        }
    }

    /// Takes one reply; whether the dump is over.
    fn on(&mut self, reply: Received<'_>) -> std::result::Result<bool, Failure> {
        match reply.status() {
            Some(0) => Ok(reply.nl_type == NLMSG_DONE),
            Some(errno) => Err(Failure::Refused(errno)),
            None => {
                if self.unreadable.is_none() {
                    self.unreadable = (self.each)(reply).err();
                }
                Ok(false)
            }
        }
    }

    fn finish(self) -> std::result::Result<(), Failure> {
        self.unreadable.map_or(Ok(()), |e| Err(Failure::Decode(e)))
    }
}

/// Sends one request of `cmd` to generic netlink `family` (its commands of `version`) with the
/// attributes `body` writes; returns its sequence number.
fn send_request(
    conn: &mut Conn,
    (family, version): (u16, u8),
    flags: u16,
    cmd: u8,
    body: impl FnOnce(&mut AttrWriter<'_>),
) -> std::result::Result<u32, Failure> {
    let seq = conn.next_seq();
    let mut request = Requests::default();
    request.push(family, flags, seq, cmd, version, body);
    conn.send_bytes(request.bytes())?;
    Ok(seq)
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

/// The command that performs `op`.
fn command_of(op: &Op) -> u8 {
    match op {
        Op::AddService(_) => IPVS_CMD_NEW_SERVICE,
        Op::EditService(_) => IPVS_CMD_SET_SERVICE,
        Op::DelService(_) => IPVS_CMD_DEL_SERVICE,
        Op::AddDest(..) => IPVS_CMD_NEW_DEST,
        Op::EditDest(..) => IPVS_CMD_SET_DEST,
        Op::DelDest(..) => IPVS_CMD_DEL_DEST,
    }
}

/// The attributes of the request that performs `op`.
fn put_request(w: &mut AttrWriter<'_>, op: &Op) {
    match op {
        Op::AddService(s) | Op::EditService(s) => codec::put_service(w, s),
        Op::DelService(k) => codec::put_service_key(w, k),
        Op::AddDest(k, d) | Op::EditDest(k, d) | Op::DelDest(k, d) => {
            codec::put_service_key(w, k);
            codec::put_destination(w, d);
        }
    }
}

/// The service in a `GET_SERVICE` reply, without destinations; `None` for a service the model
/// cannot hold.
fn service_of_reply(reply: Received<'_>) -> std::result::Result<Option<ServiceEntry>, DecodeError> {
    for attr in reply.genl_attrs() {
        let attr = attr?;
        if attr.kind != IPVS_CMD_ATTR_SERVICE {
            continue;
        }
        return Ok(codec::decode_service(attr.children())?.map(|d| {
            let mut entry = ServiceEntry::new(d.service);
            entry.stats = Some(d.stats);
            entry
        }));
    }
    Err(DecodeError(
        "no IPVS_CMD_ATTR_SERVICE in the reply".to_owned(),
    ))
}

/// The id of the generic netlink family `IPVS`, from the controller.
fn resolve_family(conn: &mut Conn) -> Result<u16> {
    let reply = get_one(
        conn,
        (GENL_ID_CTRL, CTRL_VERSION),
        CTRL_CMD_GETFAMILY,
        |w| w.put_str(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME),
        |reply| {
            for attr in reply.genl_attrs() {
                let attr = attr?;
                if attr.kind == CTRL_ATTR_FAMILY_ID {
                    return codec::u16_of(attr.payload, "CTRL_ATTR_FAMILY_ID");
                }
            }
            Err(DecodeError("no CTRL_ATTR_FAMILY_ID".to_owned()))
        },
    );
    match reply {
        Ok(id) => Ok(id),
        Err(Failure::Refused(libc::ENOENT)) => Err(Error::Unavailable),
        Err(failure) => Err(Error::of_request(
            Request::ResolveFamily,
            IPVS_GENL_NAME.to_owned(),
            failure,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(nl_type: u16, payload: &[u8]) -> Received<'_> {
        Received {
            nl_type,
            seq: 1,
            payload,
        }
    }

    #[test]
    fn a_dump_with_an_unreadable_reply_is_read_to_its_end_and_fails() {
        let mut seen = Vec::new();
        let mut reader = DumpReader::new(|r: Received<'_>| {
            seen.push(r.payload.len());
            if r.payload.len() == 2 {
                Err(DecodeError("unreadable".to_owned()))
            } else {
                Ok(())
            }
        });
        let family = 0x25;
        assert!(!reader.on(reply(family, &[0; 1])).unwrap());
        assert!(!reader.on(reply(family, &[0; 2])).unwrap(), "not over");
        assert!(!reader.on(reply(family, &[0; 3])).unwrap());
        assert!(reader.on(reply(NLMSG_DONE, &[0; 4])).unwrap(), "over");
        assert!(matches!(reader.finish(), Err(Failure::Decode(e)) if e.0 == "unreadable"));
        assert_eq!(
            seen,
            [1, 2],
            "replies after the unreadable one are not decoded"
        );
    }

    #[test]
    fn a_dump_refused_by_the_kernel_says_so() {
        let mut reader = DumpReader::new(|_: Received<'_>| Ok(()));
        let refusal = (-libc::ENOENT).to_ne_bytes();
        assert!(matches!(
            reader.on(reply(NLMSG_ERROR, &refusal)),
            Err(Failure::Refused(e)) if e == libc::ENOENT
        ));
    }
}
