//! A decoder for pgoutput, PostgreSQL's logical replication output plugin
//! (protocol versions 1 and 2: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>).
//!
//! Pure and stateless except for one bit: whether a v2 streaming block (Stream Start …
//! Stream Stop) is open, because inside one every data message carries an extra xid.
//! Malformed input is an error, never a panic: every read is bounds-checked.

use bytes::{Buf, Bytes};

/// A decoding failure: what was being read, and how the bytes fell short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value (updates only; inserts always carry full values).
    Unchanged,
    /// The value in PostgreSQL's text output format.
    Text(Bytes),
}

/// A column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<Column>,
}

/// A decoded message. Variants the relay does not act on keep only their tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        /// LSN of the commit record.
        final_lsn: u64,
        /// Microseconds since 2000-01-01 UTC.
        commit_ts: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        /// End of the commit record: what to report flushed once the transaction is safe.
        end_lsn: u64,
        commit_ts: i64,
    },
    Relation(Relation),
    Insert {
        /// Set inside a streaming block.
        xid: Option<u32>,
        relation: u32,
        tuple: Vec<Value>,
    },
    /// An UPDATE: the new row, and the old key or row when the replica identity sends it.
    Update {
        xid: Option<u32>,
        relation: u32,
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    /// A DELETE: the old key (replica identity index) or the whole old row (`FULL`).
    Delete {
        xid: Option<u32>,
        relation: u32,
        old: Vec<Value>,
    },
    Message {
        xid: Option<u32>,
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
    },
    /// Aborts transaction `xid`, or only its subtransaction `subxid` (a rolled-back
    /// savepoint) when the two differ.
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
    /// Origin, Type, Truncate: decoded no further.
    Other(u8),
}

/// Decodes pgoutput messages; remembers whether a streaming block is open.
#[derive(Debug, Default)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    pub fn decode(&mut self, data: Bytes) -> Result<Message, DecodeError> {
        let mut r = Reader(data);
        let tag = r.u8("message tag")?;
        let msg = match tag {
            b'B' => Message::Begin {
                final_lsn: r.u64("Begin final LSN")?,
                commit_ts: r.i64("Begin timestamp")?,
                xid: r.u32("Begin xid")?,
            },
            b'C' => {
                r.u8("Commit flags")?;
                Message::Commit {
                    commit_lsn: r.u64("Commit LSN")?,
                    end_lsn: r.u64("Commit end LSN")?,
                    commit_ts: r.i64("Commit timestamp")?,
                }
            }
            b'R' => {
                self.stream_xid(&mut r)?;
                let id = r.u32("Relation id")?;
                let namespace = r.cstr("Relation namespace")?;
                let name = r.cstr("Relation name")?;
                r.u8("Relation replica identity")?;
                let n = r.u16("Relation column count")?;
                let mut columns = Vec::with_capacity(usize::from(n).min(1600));
                for _ in 0..n {
                    r.u8("column flags")?;
                    let name = r.cstr("column name")?;
                    let type_oid = r.u32("column type")?;
                    r.i32("column type modifier")?;
                    columns.push(Column { name, type_oid });
                }
                Message::Relation(Relation {
                    id,
                    namespace,
                    name,
                    columns,
                })
            }
            b'I' => {
                let xid = self.stream_xid(&mut r)?;
                let relation = r.u32("Insert relation")?;
                match r.u8("Insert tuple marker")? {
                    b'N' => {}
                    other => {
                        return Err(DecodeError(format!(
                            "Insert: expected 'N', got {other:#04x}"
                        )))
                    }
                }
                Message::Insert {
                    xid,
                    relation,
                    tuple: r.tuple()?,
                }
            }
            b'U' => {
                let xid = self.stream_xid(&mut r)?;
                let relation = r.u32("Update relation")?;
                let (old, new) = match r.u8("Update tuple marker")? {
                    b'K' | b'O' => {
                        let old = r.tuple()?;
                        match r.u8("Update new tuple marker")? {
                            b'N' => (Some(old), r.tuple()?),
                            other => {
                                return Err(DecodeError(format!(
                                    "Update: expected 'N' after the old tuple, got {other:#04x}"
                                )))
                            }
                        }
                    }
                    b'N' => (None, r.tuple()?),
                    other => {
                        return Err(DecodeError(format!(
                            "Update: expected 'K', 'O' or 'N', got {other:#04x}"
                        )))
                    }
                };
                Message::Update {
                    xid,
                    relation,
                    old,
                    new,
                }
            }
            b'D' => {
                let xid = self.stream_xid(&mut r)?;
                let relation = r.u32("Delete relation")?;
                match r.u8("Delete tuple marker")? {
                    b'K' | b'O' => {}
                    other => {
                        return Err(DecodeError(format!(
                            "Delete: expected 'K' or 'O', got {other:#04x}"
                        )))
                    }
                }
                Message::Delete {
                    xid,
                    relation,
                    old: r.tuple()?,
                }
            }
            b'M' => {
                let xid = self.stream_xid(&mut r)?;
                let flags = r.u8("Message flags")?;
                let lsn = r.u64("Message LSN")?;
                let prefix = r.cstr("Message prefix")?;
                let len = r.u32("Message length")? as usize;
                Message::Message {
                    xid,
                    transactional: flags & 1 == 1,
                    lsn,
                    prefix,
                    content: r.bytes(len, "Message content")?,
                }
            }
            b'S' => {
                let xid = r.u32("Stream Start xid")?;
                let first_segment = r.u8("Stream Start first segment")? == 1;
                self.in_stream = true;
                Message::StreamStart { xid, first_segment }
            }
            b'E' => {
                self.in_stream = false;
                Message::StreamStop
            }
            b'c' => {
                let xid = r.u32("Stream Commit xid")?;
                r.u8("Stream Commit flags")?;
                Message::StreamCommit {
                    xid,
                    commit_lsn: r.u64("Stream Commit LSN")?,
                    end_lsn: r.u64("Stream Commit end LSN")?,
                    commit_ts: r.i64("Stream Commit timestamp")?,
                }
            }
            b'A' => Message::StreamAbort {
                xid: r.u32("Stream Abort xid")?,
                subxid: r.u32("Stream Abort subxid")?,
            },
            b'O' | b'Y' | b'T' => Message::Other(tag),
            other => {
                return Err(DecodeError(format!(
                "unknown message tag {:?} (two-phase and protocol 4 messages are not requested)",
                other as char
            )))
            }
        };
        Ok(msg)
    }

    /// An Insert outside a streaming block, its tuple left unread: [`Tuple::read`] reads
    /// it once, slicing only the columns wanted, straight into what the reader builds
    /// (per event, a list of every column's value made and taken apart again cost more
    /// than the reading). `None` for any other message, which [`Decoder::decode`] reads.
    pub fn insert(&self, data: &Bytes) -> Option<(u32, Tuple)> {
        match **data {
            [b'I', r0, r1, r2, r3, b'N', ..] if !self.in_stream => {
                Some((u32::from_be_bytes([r0, r1, r2, r3]), Tuple(data.slice(6..))))
            }
            _ => None,
        }
    }

    /// Inside a streaming block, data messages start with the transaction's xid.
    fn stream_xid(&self, r: &mut Reader) -> Result<Option<u32>, DecodeError> {
        if self.in_stream {
            Ok(Some(r.u32("streamed xid")?))
        } else {
            Ok(None)
        }
    }
}

/// A tuple as it arrived: its column count, then each column's kind and value.
#[derive(Debug, Clone)]
pub struct Tuple(Bytes);

impl Tuple {
    /// Reads the columns in order: `value` gets each one's index and value, but for a
    /// text value `wanted` says no to, which is skipped without being sliced out of the
    /// message. Malformed bytes are the same errors as in [`Decoder::decode`], whatever
    /// is wanted.
    pub fn read(
        self,
        wanted: impl Fn(usize) -> bool,
        value: impl FnMut(usize, Value),
    ) -> Result<(), DecodeError> {
        read_tuple(&mut Reader(self.0), wanted, value)
    }
}

/// The one reading of a tuple, for [`Reader::tuple`] and [`Tuple::read`].
fn read_tuple(
    r: &mut Reader,
    wanted: impl Fn(usize) -> bool,
    mut value: impl FnMut(usize, Value),
) -> Result<(), DecodeError> {
    let n = r.u16("tuple column count")?;
    for i in 0..usize::from(n) {
        match r.u8("tuple column kind")? {
            b'n' => value(i, Value::Null),
            b'u' => value(i, Value::Unchanged),
            b't' => {
                let len = r.u32("text value length")? as usize;
                if wanted(i) {
                    value(i, Value::Text(r.bytes(len, "text value")?));
                } else {
                    r.need(len, "text value")?;
                    r.0.advance(len);
                }
            }
            // Binary values come only with the `binary` option, which is never asked for.
            b'b' => return Err(DecodeError("binary column value (not requested)".into())),
            other => {
                return Err(DecodeError(format!(
                    "unknown tuple column kind {other:#04x}"
                )))
            }
        }
    }
    Ok(())
}

/// A bounds-checked cursor over one message.
struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize, what: &str) -> Result<(), DecodeError> {
        if self.0.remaining() < n {
            return Err(DecodeError(format!(
                "{what}: needs {n} bytes, {} left",
                self.0.remaining()
            )));
        }
        Ok(())
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }

    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.0.get_u16())
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.0.get_u32())
    }

    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.0.get_i32())
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.0.get_u64())
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.0.get_i64())
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.0.split_to(n))
    }

    fn cstr(&mut self, what: &str) -> Result<String, DecodeError> {
        let end = self
            .0
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| DecodeError(format!("{what}: string without terminator")))?;
        let s = self.0.split_to(end);
        self.0.advance(1);
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError(format!("{what}: not UTF-8")))
    }

    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        // The count, peeked: the list is made once, at its size (at most PostgreSQL's
        // 1,600 columns, whatever a malformed count says).
        let n = self
            .0
            .get(..2)
            .map_or(0, |n| u16::from_be_bytes([n[0], n[1]]));
        let mut values = Vec::with_capacity(usize::from(n).min(1600));
        read_tuple(self, |_| true, |_, v| values.push(v))?;
        Ok(values)
    }
}

#[cfg(test)]
mod tests;
