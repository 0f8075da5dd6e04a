//! The replication connection's framing and CopyData parsing, as if the server had sent
//! these bytes: messages or errors, never a panic or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    outbox_relay::source::logical::fuzz_stream_bytes(data);
});
