#![no_main]
// The property checked is documented on moat::fuzz::chunked_body.
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat::fuzz::chunked_body(data));
