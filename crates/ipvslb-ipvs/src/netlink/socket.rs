//! One netlink socket: numbered requests out, several per `sendmsg`, replies in, with a deadline.

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

use crate::consts::NLMSG_DONE;

/// The largest datagram the kernel sends us (it caps dump messages at 32 KiB).
const RECV_BUFFER: usize = 64 * 1024;

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
        // Room for the acknowledgements of a whole batch; the kernel may grant less.
        let _ = socket.set_recv_buffer_size(4 << 20);
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUFFER],
            timeout,
        })
    }

    /// The next sequence number (never 0, which the kernel uses for notifications).
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
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
        let bytes = bytes.into_inner();
        let sent = self.socket.send(&bytes, Msg::empty())?;
        if sent != bytes.len() {
            return Err(SocketError::Codec(format!(
                "sent {sent} of {} bytes",
                bytes.len()
            )));
        }
        Ok(())
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
        let bytes = &self.buf[..read];
        NlBuffer::from_bytes_with_input(&mut Cursor::new(bytes), read)
            .map_err(|e| SocketError::Codec(format!("parsing a reply of {read} bytes: {e}")))
    }
}
