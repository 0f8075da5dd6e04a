//! The configuration loader on arbitrary text: a configuration or an error naming the
//! problem, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = outbox_relay::config::from_toml_str(text);
    }
});
