//! Any datagram or TCP message through the whole request path: parsing, zone lookup, negative
//! answers, the cache, answer rewriting, and the upstream-response parser. Must never panic.
//!
//!   cd dns/fuzz && cargo +nightly fuzz run request
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    netd_dns::fuzzing::request_path(data);
});
