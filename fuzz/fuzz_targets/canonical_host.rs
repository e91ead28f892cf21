#![no_main]
// The property checked is documented on moat::fuzz::canonical_host.
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat::fuzz::canonical_host(data));
