#![no_main]
// The property checked is documented on moat::fuzz::http_head.
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat::fuzz::http_head(data));
