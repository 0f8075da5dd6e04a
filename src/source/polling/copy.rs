//! Polling's batch read as `COPY (SELECT …) TO STDOUT (FORMAT binary)`.
//!
//! Why COPY rather than a prepared query: tokio-postgres hands a query's rows out one
//! `Row` at a time, each with its own list of column ranges and a typed lookup per
//! column, and lends a column only as a borrow of its row, so the relay had to copy every
//! column out. A COPY row arrives as one `CopyData` message, a slice of the connection's
//! read buffer: the events' fields are slices of it, with no copy and no allocation per
//! row. Measured with callgrind, the client's work per row fell from ~3,500 to ~1,700
//! instructions (BENCHMARKS.md). The price is on the server: COPY takes no parameters,
//! so each batch's statement carries its bounds as literals and is planned anew.
//!
//! The format (PostgreSQL's "Binary Format" of COPY): a header (signature, flags,
//! extension), then per row a 16-bit field count and per field a 32-bit length (-1 for
//! NULL) and that many bytes, then a count of -1. The server sends each row as one
//! message, the header with the first. Anything else is an error naming what was found.

use bytes::Bytes;
use bytestring::ByteString;
use futures::StreamExt;
use tokio_postgres::Client;

use crate::event::{OutboxEvent, Position};
use crate::source::table;

/// The signature that opens a binary COPY.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// The fields of a row of [`table::select_list`], in order.
const FIELDS: usize = table::SELECTED.len();

/// A read that ended early: the events of the rows that came before the failure (a
/// prefix of the batch, in order), and the failure.
pub(super) struct Partial {
    pub events: Vec<OutboxEvent>,
    pub error: Failure,
}

pub(super) enum Failure {
    /// The server's error (or the connection's).
    Pg(tokio_postgres::Error),
    /// Bytes that are not the binary COPY format the read asked for.
    Format(String),
}

impl Failure {
    /// The server failed on a row's data (see [`table::is_bad_row`]).
    pub(super) fn bad_row(&self) -> Option<&tokio_postgres::Error> {
        match self {
            Failure::Pg(e) if table::is_bad_row(e) => Some(e),
            _ => None,
        }
    }
}

/// `select` (its bounds written in as literals) as a binary COPY.
pub(super) fn copy_sql(select: &str) -> String {
    format!("COPY ({select}) TO STDOUT (FORMAT binary)")
}

/// Runs `copy` (from [`copy_sql`]) and turns its rows into events, as
/// [`table::rows_to_events`] would have turned the same SELECT's rows. `room` is how
/// many rows are expected (the list is made that large at once, up to [`MAX_ROOM`]).
pub(super) async fn read(
    client: &Client,
    copy: &str,
    room: usize,
    payload_is_json: bool,
) -> Result<Vec<OutboxEvent>, Partial> {
    let mut events = Vec::with_capacity(room.min(MAX_ROOM));
    let fail = |events, error| Err(Partial { events, error });
    let mut stream = match client.copy_out(copy).await {
        Ok(stream) => std::pin::pin!(stream),
        Err(e) => return fail(events, Failure::Pg(e)),
    };
    let mut first = true;
    while let Some(message) = stream.next().await {
        let message = match message {
            Ok(message) => message,
            Err(e) => return fail(events, Failure::Pg(e)),
        };
        if let Err(why) = row(
            message,
            std::mem::take(&mut first),
            payload_is_json,
            &mut events,
        ) {
            return fail(events, Failure::Format(why.to_string()));
        }
    }
    Ok(events)
}

/// The most events [`read`] makes room for before the rows arrive.
const MAX_ROOM: usize = 10_000;

/// One `CopyData` message: a row's event, pushed onto `events`, or the trailer.
fn row(
    message: Bytes,
    first: bool,
    payload_is_json: bool,
    events: &mut Vec<OutboxEvent>,
) -> Result<(), Malformed> {
    let mut fields = Fields {
        buf: &message,
        at: 0,
    };
    if first {
        fields.header()?;
    }
    let count = fields.i16()?;
    if count == -1 {
        return Ok(());
    }
    if count as usize != FIELDS {
        return Err(Malformed::Count(count));
    }
    let mut spans: [Option<(usize, usize)>; FIELDS] = [None; FIELDS];
    for span in &mut spans {
        *span = fields.field()?;
    }
    let int8 = |k: usize| -> Result<Option<i64>, Malformed> {
        match spans[k] {
            None => Ok(None),
            Some((start, end)) => <[u8; 8]>::try_from(&message[start..end])
                .map(|b| Some(i64::from_be_bytes(b)))
                .map_err(|_| Malformed::Int8(k, end - start)),
        }
    };
    let seq = int8(0)?;
    let timestamp_ms = int8(7)?;
    let position = Position::Seq(seq.unwrap_or(i64::MAX));
    let mut unreadable: Vec<&str> = Vec::new();
    // Every field but `payload` was selected as text (and a JSON payload is text too). A
    // field that is not UTF-8 goes into the dead letter lossily. (The same rule as
    // `table::rows_to_events`, written out again on purpose: one function for both,
    // taking the columns as a list, cost ~350 instructions per event, 8 % of the relay's
    // own work in polling; `not_utf8` is shared so the dead letter's reason is one.)
    let mut text = |k: usize| -> Option<ByteString> {
        let (start, end) = spans[k]?;
        ByteString::try_from(message.slice(start..end))
            .ok()
            .or_else(|| {
                unreadable.push(table::SELECTED[k]);
                Some(ByteString::from(
                    String::from_utf8_lossy(&message[start..end]).into_owned(),
                ))
            })
    };
    let id = text(1);
    let aggregate_type = text(2);
    let aggregate_id = text(3);
    let event_type = text(4);
    let headers = text(6);
    let topic = text(8);
    let payload = spans[5].map(|(start, end)| message.slice(start..end));
    if payload_is_json
        && payload
            .as_deref()
            .is_some_and(|p| std::str::from_utf8(p).is_err())
    {
        unreadable.push(table::SELECTED[5]);
    }
    events.push(OutboxEvent {
        id,
        aggregate_type,
        aggregate_id,
        event_type,
        payload,
        payload_is_json,
        headers,
        topic,
        timestamp_ms,
        invalid: table::not_utf8(position, &unreadable),
        ..OutboxEvent::blank(position)
    });
    Ok(())
}

/// What in a `CopyData` message is not the format the read asked for.
#[derive(Debug)]
enum Malformed {
    /// `wanted` bytes at byte `at` of a message of `len`.
    Cut {
        wanted: usize,
        at: usize,
        len: usize,
    },
    Count(i16),
    Length(i32),
    /// A field selected as `int8` (by its index) with this many bytes.
    Int8(usize, usize),
    Signature,
    Flags(i32),
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Malformed::Cut { wanted, at, len } => write!(
                f,
                "a row cut short ({wanted} bytes wanted at byte {at} of {len})"
            ),
            Malformed::Count(n) => write!(f, "a row of {n} fields, where {FIELDS} were selected"),
            Malformed::Length(n) => write!(f, "a field of length {n}"),
            Malformed::Int8(k, n) => {
                write!(f, "{}: {n} bytes for an int8", table::SELECTED[*k])
            }
            Malformed::Signature => write!(f, "no binary COPY signature"),
            Malformed::Flags(flags) => write!(f, "binary COPY flags {flags:#x}"),
        }
    }
}

/// A cursor over one `CopyData` message.
struct Fields<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Fields<'_> {
    /// The next `n` bytes, as a span of the message.
    #[inline]
    fn take(&mut self, n: usize) -> Result<(usize, usize), Malformed> {
        let start = self.at;
        match start.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                self.at = end;
                Ok((start, end))
            }
            _ => Err(Malformed::Cut {
                wanted: n,
                at: start,
                len: self.buf.len(),
            }),
        }
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let (start, end) = self.take(N)?;
        <[u8; N]>::try_from(&self.buf[start..end]).map_err(|_| Malformed::Cut {
            wanted: N,
            at: start,
            len: self.buf.len(),
        })
    }

    #[inline]
    fn i16(&mut self) -> Result<i16, Malformed> {
        self.array().map(i16::from_be_bytes)
    }

    #[inline]
    fn i32(&mut self) -> Result<i32, Malformed> {
        self.array().map(i32::from_be_bytes)
    }

    /// A field's bytes, `None` for NULL.
    #[inline]
    fn field(&mut self) -> Result<Option<(usize, usize)>, Malformed> {
        match self.i32()? {
            -1 => Ok(None),
            n => match usize::try_from(n) {
                Ok(n) => self.take(n).map(Some),
                Err(_) => Err(Malformed::Length(n)),
            },
        }
    }

    /// The signature, the flags (none are defined that the relay could honour, so any
    /// is refused) and the header extension, skipped.
    fn header(&mut self) -> Result<(), Malformed> {
        if self.array::<11>()? != *SIGNATURE {
            return Err(Malformed::Signature);
        }
        let flags = self.i32()?;
        if flags != 0 {
            return Err(Malformed::Flags(flags));
        }
        let extension = self.i32()?;
        let extension = usize::try_from(extension).map_err(|_| Malformed::Length(extension))?;
        self.take(extension).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`row`]'s event, if the message is a row.
    fn parsed(m: Bytes, first: bool, json: bool) -> Result<Option<OutboxEvent>, String> {
        let mut events = Vec::new();
        row(m, first, json, &mut events).map_err(|e| e.to_string())?;
        Ok(events.pop())
    }

    /// A row message as the server sends it; `None` is NULL.
    fn message(header: bool, fields: &[Option<&[u8]>]) -> Bytes {
        let mut m = Vec::new();
        if header {
            m.extend_from_slice(SIGNATURE);
            m.extend_from_slice(&0i32.to_be_bytes());
            m.extend_from_slice(&0i32.to_be_bytes());
        }
        m.extend_from_slice(&(fields.len() as i16).to_be_bytes());
        for f in fields {
            match f {
                None => m.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(b) => {
                    m.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    m.extend_from_slice(b);
                }
            }
        }
        Bytes::from(m)
    }

    fn fields<'a>(
        seq: &'a [u8; 8],
        payload: &'a [u8],
        created: Option<&'a [u8]>,
    ) -> Vec<Option<&'a [u8]>> {
        vec![
            Some(seq),
            Some(b"e-1"),
            Some(b"order"),
            Some(b"o-1"),
            Some(b"Placed"),
            Some(payload),
            None,
            created,
            None,
        ]
    }

    #[test]
    fn rows_become_events_whose_fields_are_slices_of_the_message() {
        let seq = 42i64.to_be_bytes();
        let created = 1_700_000_000_000i64.to_be_bytes();
        let m = message(true, &fields(&seq, br#"{"n":1}"#, Some(&created)));
        let e = parsed(m.clone(), true, true).unwrap().unwrap();
        assert_eq!(e.position, Position::Seq(42));
        assert_eq!(e.id.as_deref(), Some("e-1"));
        assert_eq!(e.aggregate_type.as_deref(), Some("order"));
        assert_eq!(e.aggregate_id.as_deref(), Some("o-1"));
        assert_eq!(e.event_type.as_deref(), Some("Placed"));
        assert_eq!(e.payload.as_deref(), Some(&br#"{"n":1}"#[..]));
        assert_eq!((e.headers, e.topic), (None, None));
        assert_eq!(e.timestamp_ms, Some(1_700_000_000_000));
        assert!(e.invalid.is_none());
        let payload = e.payload.unwrap();
        assert!(m.as_ptr_range().contains(&payload.as_ptr()), "no copy");
        // Without the header (every row but the first), and with a NULL timestamp.
        let e = parsed(message(false, &fields(&seq, b"{}", None)), false, true)
            .unwrap()
            .unwrap();
        assert_eq!(e.timestamp_ms, None);
    }

    #[test]
    fn text_that_is_not_utf8_makes_an_invalid_event_naming_the_columns() {
        let seq = 7i64.to_be_bytes();
        let mut f = fields(&seq, b"caf\xe9", None);
        f[3] = Some(b"o-\xff");
        let e = parsed(message(false, &f), false, true).unwrap().unwrap();
        let invalid = e.invalid.unwrap();
        assert!(
            invalid.contains("source.columns.aggregate_id, source.columns.payload"),
            "{invalid}"
        );
        assert_eq!(e.aggregate_id.as_deref(), Some("o-\u{fffd}"));
        assert_eq!(
            e.payload.as_deref(),
            Some(&b"caf\xe9"[..]),
            "bytes as stored"
        );
        // A payload that is not JSON is bytes, valid or not.
        let e = parsed(
            message(false, &fields(&seq, b"caf\xe9", None)),
            false,
            false,
        )
        .unwrap()
        .unwrap();
        assert!(e.invalid.is_none());
    }

    #[test]
    fn the_trailer_ends_the_rows() {
        assert!(parsed(Bytes::from_static(&[0xff, 0xff]), false, true)
            .unwrap()
            .is_none());
    }

    #[test]
    fn anything_but_the_format_asked_for_is_an_error_naming_it() {
        let seq = 1i64.to_be_bytes();
        let good = message(true, &fields(&seq, b"{}", None));
        let cases: Vec<(Bytes, bool, &str)> = vec![
            (good.slice(..good.len() - 3), true, "cut short"),
            (good.slice(1..), true, "signature"),
            (
                message(false, &fields(&seq, b"{}", None)),
                true,
                "signature",
            ),
            (message(false, &[Some(&seq)]), false, "1 fields"),
            (
                message(false, &fields(&[0; 8], b"{}", None)[..8]),
                false,
                "8 fields",
            ),
            (Bytes::from_static(&[0]), false, "cut short"),
        ];
        for (m, first, expected) in cases {
            let err = parsed(m, first, true).unwrap_err();
            assert!(err.contains(expected), "{err} (expected {expected})");
        }
        let mut f = fields(&seq, b"{}", None);
        f[0] = Some(b"1234");
        let err = parsed(message(false, &f), false, true).unwrap_err();
        assert!(err.contains("seq: 4 bytes for an int8"), "{err}");
        let mut flagged = good.to_vec();
        flagged[SIGNATURE.len() + 3] = 1;
        let err = parsed(Bytes::from(flagged), true, true).unwrap_err();
        assert!(err.contains("flags 0x1"), "{err}");
    }
}
