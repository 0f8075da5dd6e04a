//! The pgoutput decoder on arbitrary bytes: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outbox_relay::source::logical::pgoutput::Decoder;

fuzz_target!(|data: &[u8]| {
    // Two messages from one decoder: a streaming block's state carries over.
    let (first, second) = data.split_at(data.len() / 2);
    let mut decoder = Decoder::default();
    let _ = decoder.decode(bytes::Bytes::copy_from_slice(first));
    let _ = decoder.decode(bytes::Bytes::copy_from_slice(second));
});
