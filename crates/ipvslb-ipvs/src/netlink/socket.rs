//! One netlink socket: numbered requests out, several per `sendmsg`, replies in, with a deadline.
//!
//! Two ways in: messages of neli's types (the rtnetlink requests of the VIP handle), and requests
//! already written as bytes by the IPVS codec, whose replies are read in place.

use std::fmt::Debug;
use std::io::{self, Cursor};
use std::time::{Duration, Instant};

use neli::consts::nl::NlmF;
use neli::consts::socket::{Msg, NlFamily};
use neli::nl::{NlPayload, Nlmsghdr, NlmsghdrBuilder};
use neli::socket::NlSocket;
use neli::types::NlBuffer;
use neli::utils::Groups;
use neli::{FromBytesWithInput, Size, ToBytes};

use super::codec::{self, DecodeError};
use crate::consts::{GENL_HDRLEN, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, NLMSG_MIN_TYPE};

/// The largest datagram the kernel sends us (it caps dump messages at 32 KiB).
const RECV_BUFFER: usize = 64 * 1024;
/// The receive buffer asked for: room for the acknowledgements of a whole batch.
const RECV_SOCKET_BUFFER: usize = 4 << 20;

/// What went wrong on the socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A system call failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// No reply within the deadline.
    #[error("no reply from the kernel within {0:?}")]
    Timeout(Duration),
    /// A message could not be serialized or parsed.
    #[error("{0}")]
    Codec(String),
}

/// What a request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The kernel's acknowledgement (a write, sent with `NLM_F_ACK`).
    Ack,
    /// One answer (a get).
    One,
    /// Every answer up to `NLMSG_DONE` (a dump, sent with `NLM_F_DUMP`).
    All,
}

/// Why one request failed.
#[derive(Debug)]
pub enum Failure {
    /// The socket failed, or no reply came in time.
    Socket(SocketError),
    /// The kernel refused it with this (positive) error number.
    Refused(i32),
    /// Its reply does not decode.
    Decode(DecodeError),
}

impl From<SocketError> for Failure {
    fn from(e: SocketError) -> Self {
        Failure::Socket(e)
    }
}

impl From<DecodeError> for Failure {
    fn from(e: DecodeError) -> Self {
        Failure::Decode(e)
    }
}

/// One message of a datagram from the kernel, read in place.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// `nlmsg_type`: the protocol's (a generic netlink family) or `NLMSG_ERROR`, `NLMSG_DONE`.
    pub nl_type: u16,
    /// The sequence number of the request it answers.
    pub seq: u32,
    /// What follows the `nlmsghdr`.
    pub payload: &'a [u8],
}

impl<'a> Received<'a> {
    /// For `NLMSG_ERROR` and `NLMSG_DONE`, the (positive) error number they carry: 0 for an
    /// acknowledgement or the end of a dump. `None` for a message of the protocol.
    pub fn status(&self) -> Option<i32> {
        if self.nl_type != NLMSG_ERROR && self.nl_type != NLMSG_DONE {
            return None;
        }
        // Both start with an `int`, the negated errno (a bare `NLMSG_DONE` may have none);
        // [`messages`] lets through only numbers that negate.
        let error = self
            .payload
            .get(..4)
            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        Some(error.checked_neg().unwrap_or(i32::MAX))
    }

    /// Whether this is a control message other than `NLMSG_ERROR` and `NLMSG_DONE`.
    fn is_other_control(&self) -> bool {
        self.nl_type < NLMSG_MIN_TYPE && self.status().is_none()
    }

    /// The attributes of a generic netlink message, after its `genlmsghdr`.
    pub fn genl_attrs(&self) -> codec::Attrs<'a> {
        codec::attrs(self.payload.get(GENL_HDRLEN..).unwrap_or_default())
    }
}

/// The messages of one datagram, read in place.
pub fn messages(datagram: &[u8]) -> impl Iterator<Item = Result<Received<'_>, SocketError>> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let header = rest.get(..NLMSG_HDRLEN);
        let len = header.map_or(0, |h| u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize);
        let Some(header) = header.filter(|_| (NLMSG_HDRLEN..=rest.len()).contains(&len)) else {
            let left = rest.len();
            rest = &[];
            return Some(Err(SocketError::Codec(format!(
                "a truncated netlink message ({left} bytes left)"
            ))));
        };
        let message = Received {
            nl_type: u16::from_ne_bytes([header[4], header[5]]),
            seq: u32::from_ne_bytes([header[8], header[9], header[10], header[11]]),
            payload: &rest[NLMSG_HDRLEN..len],
        };
        rest = rest.get((len + 3) & !3..).unwrap_or_default();
        Some(valid_status(message))
    })
}

/// `message`, if its error number (of `NLMSG_ERROR`, or of `NLMSG_DONE` when it carries
/// one) is one: zero or a negated errno. An error message too short to hold one, or holding a
/// positive number, is not an acknowledgement.
fn valid_status(message: Received<'_>) -> Result<Received<'_>, SocketError> {
    let error = message
        .payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let valid = match (message.nl_type, error) {
        (NLMSG_ERROR, None) => false,
        (NLMSG_ERROR | NLMSG_DONE, Some(e)) => e <= 0 && e != i32::MIN,
        _ => true,
    };
    if valid {
        Ok(message)
    } else {
        Err(SocketError::Codec(format!(
            "a netlink {} message of sequence {} without a valid error number ({} bytes)",
            if message.nl_type == NLMSG_ERROR {
                "error"
            } else {
                "done"
            },
            message.seq,
            message.payload.len()
        )))
    }
}

/// A netlink socket of one protocol.
pub struct Conn {
    socket: NlSocket,
    seq: u32,
    buf: Vec<u8>,
    timeout: Duration,
}

impl Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("seq", &self.seq)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// A socket for `protocol`, non-blocking so that every receive has a deadline.
    pub fn open(protocol: NlFamily, timeout: Duration) -> Result<Self, SocketError> {
        let socket = NlSocket::connect(protocol, None, Groups::empty())?;
        socket.nonblock()?;
        // The kernel may grant less (`net.core.rmem_max`).
        let _ = socket.set_recv_buffer_size(RECV_SOCKET_BUFFER);
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUFFER],
            timeout,
        })
    }

    /// The next sequence number (never 0, which the kernel uses for notifications).
    pub fn next_seq(&mut self) -> u32 {
        self.reserve_seqs(1)
    }

    /// Reserves `count` consecutive sequence numbers and returns the first: the replies to a
    /// batch are then told apart by subtraction. The range never holds 0.
    pub fn reserve_seqs(&mut self, count: u32) -> u32 {
        let rest = count.saturating_sub(1);
        let first = match self.seq.checked_add(1) {
            Some(first) if first.checked_add(rest).is_some() => first,
            _ => 1,
        };
        self.seq = first + rest;
        first
    }

    /// Sends requests already written as bytes, in one `sendmsg`. The kernel handles a netlink
    /// request while the sender is in `sendmsg`, so every reply that does not wait for a read
    /// (a dump's later parts do) is queued by the time this returns.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), SocketError> {
        let sent = self.socket.send(bytes, Msg::empty())?;
        if sent != bytes.len() {
            return Err(SocketError::Codec(format!(
                "sent {sent} of {} bytes",
                bytes.len()
            )));
        }
        Ok(())
    }

    /// Sends `count` write requests numbered from `first`, written as bytes, in one `sendmsg`,
    /// and waits for every acknowledgement. Returns the refused ones: their index in the batch
    /// and the (positive) error number, in order.
    pub fn send_acked(
        &mut self,
        bytes: &[u8],
        first: u32,
        count: usize,
    ) -> Result<Vec<(usize, i32)>, Failure> {
        self.send_bytes(bytes)?;
        let mut refused = Vec::new();
        self.answers(first, count, |i, message| {
            let status = message.status();
            if let Some(errno) = status.filter(|errno| *errno != 0) {
                refused.push((i, errno));
            }
            Ok(status.is_some())
        })?;
        refused.sort_unstable();
        Ok(refused)
    }

    /// Reads datagrams until each of the `count` requests numbered from `first` is answered.
    /// `on` sees every message that answers one still waiting, with the request's index, and
    /// says whether that message completes it; messages of other requests are skipped.
    pub fn answers(
        &mut self,
        first: u32,
        count: usize,
        mut on: impl FnMut(usize, Received<'_>) -> Result<bool, Failure>,
    ) -> Result<(), Failure> {
        let mut answered = vec![false; count];
        let mut left = count;
        while left > 0 {
            for message in messages(self.recv_bytes()?) {
                let message = message?;
                let i = message.seq.wrapping_sub(first) as usize;
                // `NLMSG_NOOP` and the other control types below `NLMSG_MIN_TYPE` answer nothing.
                if i >= count || answered[i] || message.is_other_control() {
                    continue;
                }
                if on(i, message)? {
                    answered[i] = true;
                    left -= 1;
                }
            }
        }
        Ok(())
    }

    /// A request message.
    pub fn message<P: Size>(
        nl_type: u16,
        flags: NlmF,
        seq: u32,
        payload: P,
    ) -> Result<Nlmsghdr<u16, P>, SocketError> {
        NlmsghdrBuilder::default()
            .nl_type(nl_type)
            .nl_flags(NlmF::REQUEST | flags)
            .nl_seq(seq)
            .nl_payload(NlPayload::Payload(payload))
            .build()
            .map_err(|e| SocketError::Codec(e.to_string()))
    }

    /// Sends `messages` in one `sendmsg`. The kernel handles a netlink request while the sender
    /// is in `sendmsg`, so every reply is queued by the time this returns.
    pub fn send<P: Size + ToBytes + Debug>(
        &mut self,
        messages: &[Nlmsghdr<u16, P>],
    ) -> Result<(), SocketError> {
        let size = messages.iter().map(Size::padded_size).sum();
        let mut bytes = Cursor::new(Vec::with_capacity(size));
        for message in messages {
            message
                .to_bytes(&mut bytes)
                .map_err(|e| SocketError::Codec(e.to_string()))?;
        }
        self.send_bytes(&bytes.into_inner())
    }

    /// Sends one request of type `nl_type` and reads the replies to it until `expect` is met;
    /// returns the answers (none for [`Expect::Ack`], one for [`Expect::One`]).
    pub fn request<P>(
        &mut self,
        nl_type: u16,
        flags: NlmF,
        payload: P,
        expect: Expect,
    ) -> Result<Vec<P>, Failure>
    where
        P: Size + ToBytes + FromBytesWithInput<Input = usize> + Debug + Clone,
    {
        let flags = match expect {
            Expect::Ack => flags | NlmF::ACK,
            Expect::One => flags,
            Expect::All => flags | NlmF::DUMP,
        };
        let seq = self.next_seq();
        let message = Self::message(nl_type, flags, seq, payload).map_err(Failure::Socket)?;
        self.send(&[message]).map_err(Failure::Socket)?;
        let mut answers = Vec::new();
        loop {
            let replies = self.recv::<P>().map_err(Failure::Socket)?;
            for reply in replies.iter().filter(|m| *m.nl_seq() == seq) {
                match reply.nl_payload() {
                    NlPayload::Err(e) => return Err(Failure::Refused(-e.error())),
                    NlPayload::DumpExtAck(e) if *e.error() != 0 => {
                        return Err(Failure::Refused(-e.error()));
                    }
                    _ if expect == Expect::All && *reply.nl_type() == NLMSG_DONE => {
                        return Ok(answers);
                    }
                    NlPayload::Ack(_) if expect == Expect::Ack => return Ok(answers),
                    NlPayload::Payload(p) => {
                        answers.push(p.clone());
                        if expect == Expect::One {
                            return Ok(answers);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends one request and returns its one answer.
    pub fn get<P>(&mut self, nl_type: u16, flags: NlmF, payload: P) -> Result<P, Failure>
    where
        P: Size + ToBytes + FromBytesWithInput<Input = usize> + Debug + Clone,
    {
        // `Expect::One` returns right after its answer: the list is never empty.
        self.request(nl_type, flags, payload, Expect::One)?
            .pop()
            .ok_or_else(|| Failure::Socket(SocketError::Codec("no answer".into())))
    }

    /// The messages of the next datagram from the kernel.
    pub fn recv<P: Size + FromBytesWithInput<Input = usize> + Debug>(
        &mut self,
    ) -> Result<NlBuffer<u16, P>, SocketError> {
        let bytes = self.recv_bytes()?;
        let read = bytes.len();
        NlBuffer::from_bytes_with_input(&mut Cursor::new(bytes), read)
            .map_err(|e| SocketError::Codec(format!("parsing a reply of {read} bytes: {e}")))
    }

    /// The next datagram from the kernel, waiting for it up to the deadline.
    pub fn recv_bytes(&mut self) -> Result<&[u8], SocketError> {
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_micros(50);
        let read = loop {
            match self.socket.recv(&mut self.buf[..], Msg::empty()) {
                Ok((read, _)) => break read,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(SocketError::Timeout(self.timeout));
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        };
        Ok(&self.buf[..read])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message of `nl_type` answering `seq`, with `payload`.
    fn message(nl_type: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&len.to_ne_bytes());
        bytes.extend_from_slice(&nl_type.to_ne_bytes());
        bytes.extend_from_slice(&0u16.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize((bytes.len() + 3) & !3, 0);
        bytes
    }

    #[test]
    fn acknowledgements_refusals_and_the_end_of_a_dump_are_told_apart() {
        let mut datagram = message(NLMSG_ERROR, 7, &[0; 20]);
        datagram.extend(message(NLMSG_ERROR, 8, &(-libc::ENOENT).to_ne_bytes()));
        datagram.extend(message(0x25, 9, &[1, 1, 0, 0, 5]));
        datagram.extend(message(NLMSG_DONE, 9, &0i32.to_ne_bytes()));
        datagram.extend(message(NLMSG_DONE, 10, &[]));
        let read: Vec<(u16, u32, Option<i32>, usize)> = messages(&datagram)
            .map(|m| m.unwrap())
            .map(|m| (m.nl_type, m.seq, m.status(), m.payload.len()))
            .collect();
        assert_eq!(
            read,
            [
                (NLMSG_ERROR, 7, Some(0), 20),
                (NLMSG_ERROR, 8, Some(libc::ENOENT), 4),
                (0x25, 9, None, 5),
                (NLMSG_DONE, 9, Some(0), 4),
                (NLMSG_DONE, 10, Some(0), 0),
            ]
        );
    }

    #[test]
    fn an_error_message_without_a_valid_error_number_is_an_error_not_an_acknowledgement() {
        for payload in [
            Vec::new(),
            vec![0, 0],
            i32::MIN.to_ne_bytes().to_vec(),
            5i32.to_ne_bytes().to_vec(),
        ] {
            let datagram = message(NLMSG_ERROR, 7, &payload);
            let read: Vec<_> = messages(&datagram).collect();
            assert!(
                matches!(read.as_slice(), [Err(_)]),
                "{payload:?} read as {read:?}"
            );
        }
        let datagram = message(NLMSG_DONE, 7, &i32::MIN.to_ne_bytes());
        assert!(messages(&datagram).next().unwrap().is_err());
    }

    #[test]
    fn a_truncated_datagram_is_an_error_not_a_panic() {
        let whole = message(NLMSG_ERROR, 7, &[0; 20]);
        for cut in [3, NLMSG_HDRLEN - 1, whole.len() - 1] {
            let results: Vec<_> = messages(&whole[..cut]).collect();
            assert!(results.last().unwrap().is_err(), "cut at {cut}");
        }
        let mut claims_too_little = whole.clone();
        claims_too_little[..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(messages(&claims_too_little).next().unwrap().is_err());
    }

    #[test]
    fn a_batch_of_sequence_numbers_never_holds_zero() {
        let socket = NlSocket::new(NlFamily::Generic).unwrap();
        let mut conn = Conn {
            socket,
            seq: u32::MAX - 3,
            buf: Vec::new(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(conn.reserve_seqs(3), u32::MAX - 2);
        assert_eq!(
            conn.reserve_seqs(3),
            1,
            "past the largest, a batch starts at 1"
        );
        assert_eq!(conn.next_seq(), 4);
    }
}
